"""The torchcodec backend (PyTorch's decoder), guarded by the PyAV index as decord is.

torchcodec is optional at run time: it needs FFmpeg's shared libraries (libavcodec etc., e.g.
Debian's ``libavcodec-dev``), which its wheel does not bundle. ``torchcodec_problem()`` says why
it cannot load (None when it can); ``read_frames(backend="auto")`` then uses PyAV.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

from lavis_plugins.video._common import DecodedFrames, VideoIndex, _deadline_check, _Request
from lavis_plugins.video.errors import VideoDecodeError
from lavis_plugins.video.pyav_backend import _read_pyav

logger = logging.getLogger("lavis_plugins.video.decode")


@functools.lru_cache(maxsize=1)
def torchcodec_problem() -> Optional[str]:
    """Why torchcodec cannot decode here (not installed, FFmpeg libraries missing), or None."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401  (loads its FFmpeg libraries)
    except Exception as e:  # ImportError, or RuntimeError/OSError when libavcodec is missing
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return None


def _read_torchcodec(index: VideoIndex, req: _Request) -> DecodedFrames:
    """Decode the sampled frames with torchcodec; PyAV decodes a file torchcodec cannot open or
    whose frame count differs from the decodable count (its indices would not be trustworthy),
    and every damaged or over-reporting file (PyAV measures what decodes)."""
    problem = torchcodec_problem()
    if problem is not None:
        raise VideoDecodeError(index.path, "decode_failed",
                               f"backend 'torchcodec' cannot load ({problem}); install FFmpeg's "
                               "shared libraries (e.g. apt-get install libavcodec-dev "
                               "libavformat-dev) or use backend 'pyav' / 'auto'")
    from torchcodec.decoders import VideoDecoder

    path = index.path
    if index.demux_error or (index.reported_frames and index.reported_frames != index.num_frames):
        return _read_pyav(index, None, req)
    try:
        decoder = VideoDecoder(path, dimension_order="NHWC", num_ffmpeg_threads=req.threads)
        count = len(decoder)
    except Exception as e:  # torchcodec raises RuntimeError / ValueError from its C++ core
        logger.warning("%s: torchcodec cannot open it (%s); decoding it with PyAV", path,
                       str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
        return _read_pyav(index, None, req)
    if count != index.num_frames:
        logger.warning("%s: torchcodec counts %d frames but %d are decodable; decoding it with "
                       "PyAV instead", path, count, index.num_frames)
        return _read_pyav(index, None, req)
    indices = req.sample(path, index.num_frames)
    _deadline_check(req.deadline, path, req.timeout_s, "opening the video")
    try:
        frames = decoder.get_frames_at(indices).data  # (n, H, W, 3) uint8
    except Exception as e:
        raise VideoDecodeError(path, "decode_failed",
                               f"torchcodec failed to decode frames {indices} ({e})") from e
    return DecodedFrames(frames.contiguous(), list(indices))
