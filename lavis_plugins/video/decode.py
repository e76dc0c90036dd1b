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

import logging
import os
import time
from typing import Literal, Optional, Tuple

from lavis_plugins.common.errors import UserError, unknown_name
from lavis_plugins.video._common import DecodedFrames, VideoIndex, _Request
from lavis_plugins.video.decord_backend import _read_decord
from lavis_plugins.video.errors import VideoDecodeError
from lavis_plugins.video.pyav_backend import (
    _allow_frame_threads,
    _build_index,
    _open_pyav,
    _read_pyav,
    _require_frames,
)
from lavis_plugins.video.torchcodec_backend import _read_torchcodec, torchcodec_problem
from lavis_plugins.video.sampling import STRATEGIES, SamplingStrategy, _Rng, sample_indices

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "DEFAULT_TIMEOUT_S", "STRATEGIES", "Backend",
           "DecodedFrames", "SamplingStrategy", "VideoDecodeError", "VideoIndex", "probe",
           "read_frames", "sample_indices"]

logger = logging.getLogger(__name__)

Backend = Literal["auto", "pyav", "torchcodec", "decord"]
# "auto": torchcodec where it loads (FFmpeg's shared libraries present), else PyAV
BACKENDS: Tuple[str, ...] = ("auto", "pyav", "torchcodec", "decord")

# Chosen by measurement (benchmarks/bench_video_decode.py, docs/benchmarks_video_decode.md):
# PyAV with keyframe seeking is as fast as decord or faster on every benchmark clip, is bounded by
# the deadline, and has wheels where decord has none.
DEFAULT_BACKEND: Backend = "pyav"
# Wall-clock bound of one read_frames call, in seconds.
DEFAULT_TIMEOUT_S: float = 60.0


def probe(path: "str | os.PathLike[str]", timeout_s: float = DEFAULT_TIMEOUT_S) -> VideoIndex:
    """Index the decodable frames of ``path``'s first video stream (no decoding).

    Raises ``VideoDecodeError`` for a missing, unreadable or audio-only file, an unknown codec,
    or a video stream with no complete packet.
    """
    path = os.fspath(path)
    deadline = time.monotonic() + timeout_s
    _allow_frame_threads()
    container, stream = _open_pyav(path)
    try:
        index = _build_index(container, stream, path, deadline, timeout_s)
    finally:
        container.close()
    _require_frames(index)
    return index


def read_frames(
    path: "str | os.PathLike[str]",
    n: int,
    strategy: SamplingStrategy = "uniform",
    backend: Backend = DEFAULT_BACKEND,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    rng: Optional[_Rng] = None,
    allow_repeat: bool = True,
    threads: int = 0,
) -> DecodedFrames:
    """Decode ``n`` frames of ``path`` sampled by ``strategy``.

    Returns ``DecodedFrames(frames, indices)``: ``frames`` is a (n, H, W, 3) uint8 RGB tensor,
    ``indices`` the display-order index of each frame among the decodable frames (see
    ``sample_indices`` for the strategies, ``allow_repeat`` and ``rng``).

    Raises ``VideoDecodeError`` (a ``UserError``) naming the file and the reason: missing,
    truncated/corrupt, audio-only, unknown codec, no decodable frames, fewer frames than ``n``
    with ``allow_repeat=False``, or decoding past ``timeout_s`` seconds (PyAV decoding is checked
    against the deadline at every packet; decord runs uninterrupted, guarded by the frame-count
    check described in the module docstring). ``threads``: decoder threads (0: the
    decoder's own choice, one per core for FFmpeg; 1 is often fastest for small clips on a
    busy machine, and with DataLoader workers that already use every core).
    """
    if backend not in BACKENDS:
        raise unknown_name("video backend", backend, BACKENDS)
    if strategy not in STRATEGIES:
        raise unknown_name("sampling strategy", strategy, STRATEGIES)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise UserError(f"decoding threads must be an integer >= 0 (0: the decoder's own "
                        f"choice), got {threads!r}")
    path = os.fspath(path)
    deadline = time.monotonic() + timeout_s
    _allow_frame_threads()  # before opening: FFmpeg's lines about a damaged file stay out of logs
    container, stream = _open_pyav(path)
    try:
        index = _build_index(container, stream, path, deadline, timeout_s)
        _require_frames(index)
    except BaseException:
        container.close()
        raise
    req = _Request(n, strategy, rng, allow_repeat, deadline, timeout_s, threads)
    if backend == "auto":
        backend = "torchcodec" if torchcodec_problem() is None else "pyav"
    if backend == "pyav":  # decodes from the container the index came from (closes it)
        return _read_pyav(index, (container, stream), req)
    container.close()
    if backend == "torchcodec":
        return _read_torchcodec(index, req)
    if index.demux_error:
        logger.warning("%s: the file breaks off after %d frames (%s); sampling from those",
                       path, index.num_frames, index.demux_error)
    return _read_decord(index, req)
