"""Frame sampling and bounded video decoding with PyAV or decord.

LAVIS's ``load_video`` asks decord for ``len(vr)`` and samples indices from it. decord trusts the
container's frame count, so on a file that over-reports it (truncated, or packets that never
become frames) the indices point past the last decodable frame and ``get_batch`` can spin forever
in native code while holding the GIL, where no Python timeout can stop it.

Here every index refers to a frame that the file can actually deliver:

1. ``probe`` demuxes the whole video stream once without decoding (cheap: bytes are read, nothing
   is decoded) and keeps the complete packets in display order: their count, timestamps and which
   ones are keyframes. Corrupt, discarded and empty packets are not counted, and a read error
   (truncated file) ends the index where it happened.
2. ``sample_indices`` picks frame indices from that count.
3. The PyAV backend decodes the chosen frames, seeking to the keyframe before a target when a
   keyframe lies between the current position and the target (a seek skips decoding), and
   decoding straight on otherwise; frames before a target that no other frame references
   (typically half the B-frames) are dropped by the decoder instead of decoded. If the decoder
   still runs dry before a target (a packet that demuxed but does not decode), the count is
   lowered to what did decode and the indices are sampled again. Every packet read checks a
   wall-clock deadline, so a call never runs much longer than ``timeout_s`` (one packet's work).
   It uses FFmpeg's frame threads, which deadlock when PyAV forwards FFmpeg's log messages to
   Python (torchvision turns that on at import); ``read_frames`` therefore turns that forwarding
   off (``av.logging.set_level(None)``, PyAV's own default).
4. The decord backend uses the same index. If decord refuses the file (e.g. a cut inside a
   packet) or ``len(VideoReader)`` disagrees with the decodable count, decord's indices cannot be
   trusted on that file (and it may hang), so that file is decoded with PyAV instead, with a
   warning. Once decord runs it cannot be interrupted: the index check is its only bound.

``av`` and ``decord`` are imported inside functions: neither is needed to import this module.
"""
from __future__ import annotations

import bisect
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Literal, NamedTuple, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from lavis_plugins.common.errors import UserError, unknown_name

logger = logging.getLogger(__name__)

SamplingStrategy = Literal["uniform", "uniform_endpoints", "random", "headtail"]
Backend = Literal["pyav", "decord"]
STRATEGIES: Tuple[str, ...] = ("uniform", "uniform_endpoints", "random", "headtail")
BACKENDS: Tuple[str, ...] = ("pyav", "decord")

# Chosen by measurement (benchmarks/bench_video_decode.py, docs/benchmarks_video_decode.md):
# PyAV with keyframe seeking is as fast as decord or faster on every benchmark clip, is bounded by
# the deadline, and has wheels where decord has none.
DEFAULT_BACKEND: Backend = "pyav"
# Wall-clock bound of one read_frames call, in seconds.
DEFAULT_TIMEOUT_S: float = 60.0
# How many times read_frames lowers the frame count and samples again when the decoder delivers
# fewer frames than the demuxer indexed (each retry strictly lowers the count).
_MAX_RESAMPLES = 3


class VideoDecodeError(UserError):
    """A video that cannot deliver the requested frames.

    ``kind`` names the reason for callers that count skipped files: ``missing``, ``unreadable``
    (truncated, corrupt or not a media file), ``no_video_stream`` (e.g. audio only),
    ``unsupported_codec``, ``no_frames``, ``too_short``, ``timeout`` or ``decode_failed``.
    """

    def __init__(self, path: Optional[str], kind: str = "decode_failed",
                 reason: Optional[str] = None) -> None:
        if reason is None:
            # one argument: a finished message, as PyTorch's DataLoader re-raises a worker's
            # exception (``type(e)(message)``); keeping the type keeps it a UserError
            self.path, self.kind, self.reason = None, kind, str(path)
            super().__init__(str(path))
            return
        self.path = None if path is None else os.fspath(path)
        self.kind = kind
        self.reason = reason
        where = f"video file {self.path!r}" if self.path is not None else "video"
        super().__init__(f"cannot read {where}: {reason}")

    def __reduce__(self):  # pickles with its fields (the default would pass only the message)
        if self.path is None and str(self) == self.reason:
            return (VideoDecodeError, (self.reason, self.kind))
        return (VideoDecodeError, (self.path, self.kind, self.reason))

    def with_path(self, path: str) -> "VideoDecodeError":
        """The same error naming ``path`` (``sample_indices`` does not know the file)."""
        return VideoDecodeError(path, self.kind, self.reason)


class _Rng(Protocol):
    def randrange(self, start: int, stop: int) -> int: ...

    def sample(self, population: Sequence[int], k: int) -> List[int]: ...


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
def sample_indices(
    num_frames_available: int,
    n: int,
    strategy: SamplingStrategy = "uniform",
    rng: Optional[_Rng] = None,
    allow_repeat: bool = True,
) -> List[int]:
    """``n`` frame indices in ``[0, num_frames_available)``, in ascending order.

    Strategies (N = ``num_frames_available``):

    - ``uniform``: the midpoint of each of ``n`` equal segments, ``floor((k + 0.5) * N / n)``.
      (LAVIS's ``load_video`` takes segment starts, ``np.arange(0, N, N / n)``.)
    - ``uniform_endpoints``: ``round(linspace(0, N - 1, n))``, so the first and last frames are
      included; ``n = 1`` gives frame 0, as ``numpy.linspace`` does.
    - ``random``: one uniformly random index inside each of ``n`` equal segments (training).
    - ``headtail``: LAVIS/ALPRO's: sorted distinct random indices, ``n // 2`` from the first half
      ``[0, N // 2)`` and the rest from the second half ``[N // 2, N)``. LAVIS returns only
      ``2 * (n // 2)`` frames for odd ``n``; here the extra frame comes from the second half.

    When ``n > N`` every strategy repeats frames (indices stay sorted, each frame used about
    ``n / N`` times) if ``allow_repeat``; otherwise it raises ``VideoDecodeError(kind="too_short")``.
    ``N = 0`` raises ``VideoDecodeError(kind="no_frames")``. ``rng`` is a ``random.Random`` (or
    anything with ``randrange`` and ``sample``); ``None`` uses the ``random`` module, which
    PyTorch's DataLoader seeds in every worker.
    """
    if strategy not in STRATEGIES:
        raise unknown_name("sampling strategy", strategy, STRATEGIES)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(f"the number of frames to sample (n_frms) must be an integer >= 1, got {n!r}")
    n, total = int(n), int(num_frames_available)
    if total <= 0:
        raise VideoDecodeError(None, "no_frames", "the video has no decodable frames")
    if n > total and not allow_repeat:
        raise VideoDecodeError(
            None, "too_short",
            f"it has {total} decodable frames, fewer than the {n} requested; "
            "set allow_repeat: true to repeat frames, or lower n_frms",
        )
    rng = random if rng is None else rng

    if strategy == "uniform":
        # integer form of floor((k + 0.5) * total / n): no float rounding at segment boundaries
        return [((2 * k + 1) * total) // (2 * n) for k in range(n)]
    if strategy == "uniform_endpoints":
        if n == 1:
            return [0]
        # round-half-up of k * (total - 1) / (n - 1), in integers
        return [(2 * k * (total - 1) + (n - 1)) // (2 * (n - 1)) for k in range(n)]
    if strategy == "random":
        out = []
        for k in range(n):
            lo, hi = (k * total) // n, ((k + 1) * total) // n
            out.append(rng.randrange(lo, hi) if hi > lo else lo)  # empty segment when n > total
        return out
    # headtail
    mid = total // 2
    n_head = n // 2
    head_hi = mid if mid > 0 else 1  # a 1-frame video: both halves are frame 0
    return _pick_sorted(0, head_hi, n_head, rng) + _pick_sorted(mid, total, n - n_head, rng)


def _pick_sorted(lo: int, hi: int, k: int, rng) -> List[int]:
    """``k`` sorted distinct random indices from ``[lo, hi)``; evenly repeated ones if too few."""
    if k <= hi - lo:
        return sorted(rng.sample(range(lo, hi), k))
    return [lo + ((2 * j + 1) * (hi - lo)) // (2 * k) for j in range(k)]


# --------------------------------------------------------------------------------------------
# Index: what the file can actually deliver
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoIndex:
    """What one demux pass found in a file's first video stream."""

    path: str
    # complete packets of the video stream: the frames that sampled indices refer to
    num_frames: int
    # frame count in the container's header (0 when the container does not store one)
    reported_frames: int
    # display-order timestamps (stream time base) of the indexed frames; None when some packet
    # has no timestamp or two share one, and frames are then counted in decoding order
    pts: Optional[Tuple[int, ...]]
    # display-order indices of the keyframes, ascending
    keyframes: Tuple[int, ...]
    # why demuxing stopped before the end of the file (truncated or damaged), None if it did not
    demux_error: Optional[str]
    codec: str
    width: int
    height: int
    # average frame rate from the container (0.0 when unknown)
    fps: float

    def keyframe_at_or_before(self, i: int) -> int:
        """Display index of the last keyframe at or before frame ``i`` (0 if there is none)."""
        k = bisect.bisect_right(self.keyframes, i) - 1
        return self.keyframes[k] if k >= 0 else 0


class DecodedFrames(NamedTuple):
    """Frames returned by ``read_frames``."""

    frames: torch.Tensor  # (T, H, W, 3) uint8 RGB, T = the n requested
    indices: List[int]  # display-order index of each returned frame in the decodable frames


def _deadline_check(deadline: float, path: str, timeout_s: float, doing: str) -> None:
    if time.monotonic() > deadline:
        raise VideoDecodeError(
            path, "timeout",
            f"{doing} took longer than timeout_s={timeout_s:g} s; raise the timeout for very long "
            "or high-resolution videos, or re-encode the file",
        )


def _open_pyav(path: str):
    """Open ``path`` with PyAV; return (container, first video stream) or raise VideoDecodeError."""
    import av

    if not os.path.exists(path):
        raise VideoDecodeError(path, "missing", "no such file; check the videos root in the dataset config")
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
        raise VideoDecodeError(path, "no_video_stream", f"it has no video stream (streams: {kinds})")
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


def probe(path: "str | os.PathLike[str]", timeout_s: float = DEFAULT_TIMEOUT_S) -> VideoIndex:
    """Index the decodable frames of ``path``'s first video stream (no decoding).

    Raises ``VideoDecodeError`` for a missing, unreadable or audio-only file, an unknown codec,
    or a video stream with no complete packet.
    """
    path = os.fspath(path)
    deadline = time.monotonic() + timeout_s
    container, stream = _open_pyav(path)
    try:
        index = _build_index(container, stream, path, deadline, timeout_s)
    finally:
        container.close()
    _require_frames(index)
    return index


def _require_frames(index: VideoIndex) -> None:
    if index.num_frames == 0:
        why = f" (demuxing failed: {index.demux_error})" if index.demux_error else ""
        raise VideoDecodeError(index.path, "no_frames", f"its video stream has no decodable frames{why}")


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------
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
            self._set_skipping(threshold is not None and pkt.pts is not None and pkt.pts < threshold)
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


class _Request(NamedTuple):
    """What ``read_frames`` was asked for, handed to the backend that decodes."""

    n: int  # frames to return
    strategy: SamplingStrategy
    rng: Optional[_Rng]
    allow_repeat: bool
    deadline: float  # ``time.monotonic()`` value after which decoding stops
    timeout_s: float  # the budget ``deadline`` was set from (for messages)

    def sample(self, path: str, available: int) -> List[int]:
        """``n`` indices among ``available`` frames (``sample_indices``); errors name ``path``."""
        try:
            return sample_indices(available, self.n, self.strategy, rng=self.rng,
                                  allow_repeat=self.allow_repeat)
        except VideoDecodeError as e:
            raise e.with_path(path) from None


def _read_pyav(index: VideoIndex, opened, req: _Request) -> DecodedFrames:
    """Decode with PyAV; ``opened`` is the (container, stream) the index came from, or None."""
    path = index.path
    container, stream = opened if opened is not None else _open_pyav(path)
    try:
        _allow_frame_threads()
        stream.thread_type = "AUTO"  # frame and slice threads
        decoder = _PyavDecoder(container, stream, path, req.deadline, req.timeout_s)
        available = index.num_frames
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
        f"the decoder delivers fewer frames than the {available} indexed, even after sampling again",
    )


def _read_decord(index: VideoIndex, req: _Request) -> DecodedFrames:
    import decord

    path = index.path
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0))
    except Exception as e:  # decord raises its own DECORDError / RuntimeError types
        # e.g. a file cut inside a packet: decord refuses the whole file, although the demuxer
        # indexed frames before the cut that decode
        logger.warning("%s: decord cannot open it (%s); decoding its %d indexed frames with PyAV",
                       path, str(e).strip().splitlines()[-1], index.num_frames)
        return _read_pyav(index, None, req)
    if len(reader) != index.num_frames:
        logger.warning(
            "%s: decord counts %d frames but %d are decodable; decord's indices are not "
            "trustworthy on this file (it can hang there), decoding it with PyAV instead",
            path, len(reader), index.num_frames,
        )
        del reader
        return _read_pyav(index, None, req)
    indices = req.sample(path, index.num_frames)
    _deadline_check(req.deadline, path, req.timeout_s, "opening the video")
    try:
        batch = reader.get_batch(indices)
    except Exception as e:
        raise VideoDecodeError(path, "decode_failed", f"decord failed to decode frames {indices} ({e})") from e
    # LAVIS switches decord's global bridge to torch when its data_utils is imported
    frames = batch if torch.is_tensor(batch) else torch.from_numpy(batch.asnumpy())
    return DecodedFrames(frames.contiguous(), list(indices))


def read_frames(
    path: "str | os.PathLike[str]",
    n: int,
    strategy: SamplingStrategy = "uniform",
    backend: Backend = DEFAULT_BACKEND,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    rng: Optional[_Rng] = None,
    allow_repeat: bool = True,
) -> DecodedFrames:
    """Decode ``n`` frames of ``path`` sampled by ``strategy``.

    Returns ``DecodedFrames(frames, indices)``: ``frames`` is a (n, H, W, 3) uint8 RGB tensor,
    ``indices`` the display-order index of each frame among the decodable frames (see
    ``sample_indices`` for the strategies, ``allow_repeat`` and ``rng``).

    Raises ``VideoDecodeError`` (a ``UserError``) naming the file and the reason: missing,
    truncated/corrupt, audio-only, unknown codec, no decodable frames, fewer frames than ``n``
    with ``allow_repeat=False``, or decoding past ``timeout_s`` seconds (PyAV decoding is checked
    against the deadline at every packet; decord runs uninterrupted, guarded by the frame-count
    check described in the module docstring).
    """
    if backend not in BACKENDS:
        raise unknown_name("video backend", backend, BACKENDS)
    if strategy not in STRATEGIES:
        raise unknown_name("sampling strategy", strategy, STRATEGIES)
    path = os.fspath(path)
    deadline = time.monotonic() + timeout_s
    container, stream = _open_pyav(path)
    try:
        index = _build_index(container, stream, path, deadline, timeout_s)
        _require_frames(index)
    except BaseException:
        container.close()
        raise
    if index.demux_error:
        logger.warning(
            "%s: the file breaks off after %d frames (%s); sampling from those",
            path, index.num_frames, index.demux_error,
        )
    req = _Request(n, strategy, rng, allow_repeat, deadline, timeout_s)
    if backend == "pyav":  # decodes from the container the index came from (closes it)
        return _read_pyav(index, (container, stream), req)
    container.close()
    return _read_decord(index, req)
