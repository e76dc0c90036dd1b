"""Video decoding and frame sampling for the video processors.

A plain sub-package: ``import lavis_plugins`` does not import it, and PyAV / decord are imported
only inside the functions that decode, so importing this package stays cheap.
"""
from __future__ import annotations

from lavis_plugins.video.decode import (
    BACKENDS,
    DEFAULT_BACKEND,
    STRATEGIES,
    Backend,
    DecodedFrames,
    SamplingStrategy,
    VideoDecodeError,
    VideoIndex,
    probe,
    read_frames,
    sample_indices,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "STRATEGIES",
    "Backend",
    "DecodedFrames",
    "SamplingStrategy",
    "VideoDecodeError",
    "VideoIndex",
    "probe",
    "read_frames",
    "sample_indices",
]
