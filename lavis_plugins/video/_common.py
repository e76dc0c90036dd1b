"""What every decoding backend shares: the file's index, the request, the result type."""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch

from lavis_plugins.video.errors import VideoDecodeError
from lavis_plugins.video.sampling import SamplingStrategy, _Rng, sample_indices

# How many times a backend lowers the frame count and samples again when the decoder delivers
# fewer frames than the demuxer indexed (each retry strictly lowers the count).
_MAX_RESAMPLES = 3


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


class _Request(NamedTuple):
    """What ``read_frames`` was asked for, handed to the backend that decodes."""

    n: int  # frames to return
    strategy: SamplingStrategy
    rng: Optional[_Rng]
    allow_repeat: bool
    deadline: float  # ``time.monotonic()`` value after which decoding stops
    timeout_s: float  # the budget ``deadline`` was set from (for messages)
    threads: int = 0  # decoder threads; 0: the library's own choice (FFmpeg: one per core)

    def sample(self, path: str, available: int) -> List[int]:
        """``n`` indices among ``available`` frames (``sample_indices``); errors name ``path``."""
        try:
            return sample_indices(available, self.n, self.strategy, rng=self.rng,
                                  allow_repeat=self.allow_repeat)
        except VideoDecodeError as e:
            raise e.with_path(path) from None
