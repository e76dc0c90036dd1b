"""The PyAV backend: opening, indexing (demux only) and bounded decoding with keyframe seeks
(see :mod:`lavis_plugins.video.decode` for the design)."""
from __future__ import annotations

import logging
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from lavis_plugins.video._common import (
    _MAX_RESAMPLES,
    DecodedFrames,
    VideoIndex,
    _deadline_check,
    _Request,
)
from lavis_plugins.video.errors import VideoDecodeError

logger = logging.getLogger("lavis_plugins.video.decode")


def _open_pyav(path: str):
    """Open ``path`` with PyAV; return (container, first video stream) or raise VideoDecodeError."""
    import av

    if not os.path.exists(path):
        raise VideoDecodeError(path, "missing",
                               "no such file; check the videos root in the dataset config")
    if os.path.isdir(path):
        raise VideoDecodeError(path, "missing", "it is a directory, not a video file")
    try:
        container = av.open(path, mode="r")
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as e:
        raise VideoDecodeError(
            path, "unreadable", f"not a readable media container, it is truncated or corrupt ({e})"
        ) from e
    if not container.streams.video:
        kinds = ", ".join(f"{s.type}" for s in container.streams) or "none"
        container.close()
        raise VideoDecodeError(path, "no_video_stream",
                               f"it has no video stream (streams: {kinds})")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        container.close()
        raise VideoDecodeError(
            path, "unsupported_codec",
            "its video codec is unknown to FFmpeg (no decoder in this PyAV build); re-encode it, "
            "e.g. `ffmpeg -i in -c:v libx264 out.mp4`",
        )
    return container, stream


def _build_index(container, stream, path: str, deadline: float, timeout_s: float) -> VideoIndex:
    import av

    entries: List[Tuple[Optional[int], bool]] = []  # (pts, is_keyframe) in decoding order
    demux_error = None
    demuxer = container.demux(stream)
    while True:
        _deadline_check(deadline, path, timeout_s, "indexing the video")
        try:
            pkt = next(demuxer)
        except StopIteration:
            break
        except av.error.FFmpegError as e:  # truncated or damaged: what came before still decodes
            demux_error = str(e)
            break
        if pkt.size == 0 or pkt.is_corrupt or pkt.is_discard:
            continue
        entries.append((pkt.pts, bool(pkt.is_keyframe)))

    pts_list = [p for p, _ in entries]
    usable = bool(entries) and None not in pts_list and len(set(pts_list)) == len(pts_list)
    if usable:
        order = sorted(range(len(entries)), key=lambda i: pts_list[i])
        rank = {i: r for r, i in enumerate(order)}
        pts: Optional[Tuple[int, ...]] = tuple(pts_list[i] for i in order)
        keyframes = tuple(sorted(rank[i] for i, (_, key) in enumerate(entries) if key))
    else:
        pts = None
        keyframes = tuple(i for i, (_, key) in enumerate(entries) if key)
    ctx = stream.codec_context
    rate = stream.average_rate
    return VideoIndex(
        path=path,
        num_frames=len(entries),
        reported_frames=int(stream.frames or 0),
        pts=pts,
        keyframes=keyframes,
        demux_error=demux_error,
        codec=str(ctx.name),
        width=int(ctx.width),
        height=int(ctx.height),
        fps=float(rate) if rate else 0.0,
    )


def _require_frames(index: VideoIndex) -> None:
    if index.num_frames == 0:
        why = f" (demuxing failed: {index.demux_error})" if index.demux_error else ""
        raise VideoDecodeError(index.path, "no_frames",
                               f"its video stream has no decodable frames{why}")


class _Shortfall(Exception):
    """The decoder ran dry before a target: only ``decodable`` frames can be delivered."""

    def __init__(self, decodable: int) -> None:
        super().__init__(decodable)
        self.decodable = decodable


class _PyavDecoder:
    """Decodes forward from the container's position; skips frames no target needs.

    ``skip_below_pts``: packets whose timestamp is below it are decoded with
    ``skip_frame="NONREF"``, so the decoder drops the frames nothing refers to (B-frames, usually
    half of an x264 stream) before the target instead of decoding them for nothing. Frames at or
    after the target, and every reference frame, are decoded normally.
    """

    def __init__(self, container, stream, path: str, deadline: float, timeout_s: float) -> None:
        self.container, self.stream, self.path = container, stream, path
        self.deadline, self.timeout_s = deadline, timeout_s
        self.skip_below_pts: Optional[int] = None
        self._skipping = False

    def seek(self, pts: Optional[int]) -> Iterator:
        """Seek to the keyframe at or before ``pts`` (the start when None); frames from there."""
        if pts is None:
            self.container.seek(0)
        else:
            self.container.seek(pts, stream=self.stream, backward=True, any_frame=False)
        self.stream.codec_context.flush_buffers()
        return self._frames()

    def _set_skipping(self, skip: bool) -> None:
        if skip != self._skipping:
            self.stream.codec_context.skip_frame = "NONREF" if skip else "DEFAULT"
            self._skipping = skip

    def _frames(self) -> Iterator:
        import av

        demuxer = self.container.demux(self.stream)
        ctx = self.stream.codec_context
        while True:
            _deadline_check(self.deadline, self.path, self.timeout_s, "decoding")
            try:
                pkt = next(demuxer)
            except StopIteration:
                return
            except av.error.FFmpegError:
                # the file ends or breaks here: hand out the frames the decoder still holds
                self._set_skipping(False)
                try:
                    yield from ctx.decode(None)
                except av.error.FFmpegError:
                    pass
                return
            threshold = self.skip_below_pts
            self._set_skipping(threshold is not None and pkt.pts is not None
                               and pkt.pts < threshold)
            try:
                frames = pkt.decode()
            except av.error.FFmpegError:
                # a damaged packet: its frame is missing (the caller substitutes the next frame)
                logger.debug("%s: skipping a packet that does not decode", self.path)
                continue
            yield from frames


def _decode_pyav(
    decoder: _PyavDecoder, index: VideoIndex, wanted: Sequence[int]
) -> Dict[int, Tuple[int, np.ndarray]]:
    """Decode the frames ``wanted`` (display indices): {wanted index: (index decoded, RGB array)}.

    A wanted frame whose packet does not decode is replaced by the next frame that does (its
    index is reported). Raises ``_Shortfall`` when the stream ends before a wanted frame.
    """
    targets = sorted(set(wanted))
    rank = {p: i for i, p in enumerate(index.pts)} if index.pts is not None else None
    can_seek = rank is not None
    got: Dict[int, Tuple[int, np.ndarray]] = {}
    frames_it: Optional[Iterator] = None
    pos = -1  # display index of the last frame the decoder handed out
    counter = 0  # frames handed out since the start (no-timestamp mode counts them)
    fresh = False  # nothing decoded since the last seek
    j = 0
    while j < len(targets):
        target = targets[j]
        start = index.keyframe_at_or_before(target) if can_seek else 0
        # Seek when a keyframe lies between where the decoder is and the target: decoding from
        # it is cheaper than decoding every frame up to it. Otherwise keep decoding forward.
        if frames_it is None or (can_seek and start > pos):
            frames_it = decoder.seek(index.pts[start] if can_seek else None)
            fresh, pos, counter = True, -1, 0
        decoder.skip_below_pts = index.pts[target] if index.pts is not None else None
        for frame in frames_it:
            if rank is not None:
                idx = rank.get(frame.pts)
                if idx is None:  # a frame the index does not know: not one we can name
                    continue
            else:
                idx, counter = counter, counter + 1
            if fresh and can_seek and idx > target:
                # the seek landed after the target (unreliable container index): from here on,
                # decode from the start without seeking
                logger.warning("%s: seeking is unreliable, decoding from the start", decoder.path)
                can_seek, frames_it = False, None
                break
            fresh = False
            pos = idx
            if idx < target:
                continue
            rgb = frame.to_ndarray(format="rgb24")
            while j < len(targets) and targets[j] <= idx:
                got[targets[j]] = (idx, rgb)
                j += 1
            break
        else:
            # the stream ended before the target: frames from here on do not decode
            raise _Shortfall(pos + 1 if pos >= 0 else start)
    return got


def _decodable_count(decoder: _PyavDecoder, index: VideoIndex) -> int:
    """How many of the indexed frames decode: the last keyframe's group is decoded in full (no
    frame skipped) and the highest display index delivered, plus one, is the count."""
    last_index = index.num_frames - 1
    can_seek = index.pts is not None
    start = index.keyframe_at_or_before(last_index) if can_seek else 0
    rank = {p: i for i, p in enumerate(index.pts)} if can_seek else None
    decoder.skip_below_pts = None
    last, counter = -1, 0
    for frame in decoder.seek(index.pts[start] if can_seek else None):
        if rank is not None:
            idx = rank.get(frame.pts)
            if idx is None:
                continue
        else:
            idx, counter = counter, counter + 1
        last = max(last, idx)
    return min(last + 1, index.num_frames) if last >= 0 else start


def _allow_frame_threads() -> None:
    """Turn off PyAV's routing of FFmpeg logs into Python (``av.logging.set_level(None)``).

    torchvision (imported by LAVIS) turns it on at import. With it on, an FFmpeg worker thread
    that logs must take the GIL, while the Python thread holding the GIL waits for that worker
    (flushing or freeing a frame-threaded decoder): a deadlock, reproduced here within seconds of
    sparse sampling (PyAV issue #1861). With it off, FFmpeg's messages are dropped; the
    exceptions PyAV raises still carry the error code and text.
    """
    import av.logging

    if av.logging.get_level() is not None:
        logger.info("turning off PyAV's FFmpeg log routing: it deadlocks frame-threaded decoding")
        av.logging.set_level(None)


def _read_pyav(index: VideoIndex, opened, req: _Request) -> DecodedFrames:
    """Decode with PyAV; ``opened`` is the (container, stream) the index came from, or None."""
    path = index.path
    container, stream = opened if opened is not None else _open_pyav(path)
    try:
        _allow_frame_threads()
        stream.thread_type = "AUTO"  # frame and slice threads
        if req.threads:
            stream.thread_count = req.threads
        decoder = _PyavDecoder(container, stream, path, req.deadline, req.timeout_s)
        available = index.num_frames
        if index.demux_error or (index.reported_frames
                                 and index.reported_frames != index.num_frames):
            # a damaged or over-reporting file: count what decodes before sampling, so that the
            # count (and the indices) do not depend on how many frames are asked for
            available = _decodable_count(decoder, index)
            logger.warning(
                "%s: the header reports %d frames, %d are indexed%s and %d decode; sampling "
                "from those %d", path, index.reported_frames, index.num_frames,
                f" (the file breaks off: {index.demux_error})" if index.demux_error else "",
                available, available)
            if available == 0:
                raise VideoDecodeError(path, "no_frames", "none of its frames decode")
        for _ in range(_MAX_RESAMPLES + 1):
            indices = req.sample(path, available)
            try:
                got = _decode_pyav(decoder, index, indices)
            except _Shortfall as s:
                if s.decodable >= available:  # no progress: something else is wrong
                    break
                logger.warning(
                    "%s: only %d of the %d indexed frames decode; sampling again from %d",
                    path, s.decodable, available, s.decodable,
                )
                available = s.decodable
                if available == 0:
                    raise VideoDecodeError(path, "no_frames", "none of its frames decode") from None
                continue
            frames = np.stack([got[i][1] for i in indices])
            return DecodedFrames(torch.from_numpy(frames), [got[i][0] for i in indices])
    finally:
        container.close()
    raise VideoDecodeError(
        path, "decode_failed",
        f"the decoder delivers fewer frames than the {available} indexed, "
        "even after sampling again",
    )
