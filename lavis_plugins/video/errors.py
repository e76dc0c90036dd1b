"""The error every video reader raises for a file that cannot deliver its frames."""
from __future__ import annotations

import os
from typing import Optional

from lavis_plugins.common.errors import UserError


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
