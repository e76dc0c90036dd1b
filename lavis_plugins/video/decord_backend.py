"""The decord backend (LAVIS's decoder), guarded by the PyAV index: files whose frame count
decord gets wrong are decoded with PyAV instead."""
from __future__ import annotations

import logging

import torch

from lavis_plugins.video._common import DecodedFrames, VideoIndex, _deadline_check, _Request
from lavis_plugins.video.errors import VideoDecodeError
from lavis_plugins.video.pyav_backend import _read_pyav

logger = logging.getLogger("lavis_plugins.video.decode")


def _read_decord(index: VideoIndex, req: _Request) -> DecodedFrames:
    import decord

    path = index.path
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=req.threads)
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
        raise VideoDecodeError(path, "decode_failed",
                               f"decord failed to decode frames {indices} ({e})") from e
    # LAVIS switches decord's global bridge to torch when its data_utils is imported
    frames = batch if torch.is_tensor(batch) else torch.from_numpy(batch.asnumpy())
    return DecodedFrames(frames.contiguous(), list(indices))
