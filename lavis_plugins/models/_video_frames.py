"""Video batches as frames: what the frame-sampling video models (``blip2_video``,
``blip2_video_qformer``) share to read a ``(B, C, T, H, W)`` batch from the ``lp_video_*``
processors."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lavis_plugins.common.errors import UserError


def check_video(video: Any, name: str = "samples['video']") -> Tensor:
    """``video`` if it is a (B, C, T, H, W) tensor with T >= 1, else a ``UserError`` naming
    ``name``."""
    if not torch.is_tensor(video) or video.dim() != 5:
        shape = tuple(video.shape) if torch.is_tensor(video) else type(video).__name__
        raise UserError(f"{name} must be a (B, C, T, H, W) tensor (the lp_video_* processors "
                        f"make (C, T, H, W) per video); got {shape}")
    if video.shape[2] < 1:
        raise UserError(f"{name} has no frames (T = 0)")
    return video


def flatten_frames(video: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B * T, C, H, W), video-major: row b * T + t is frame t of video b."""
    b, c, t, h, w = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
