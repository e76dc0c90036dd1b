"""Decoded-frame cache for repeated evaluation: a video's sampled frames, decoded once.

Evaluating several prompts, scorers or checkpoints on one benchmark decodes the same frames each
time, and decoding is the largest stage of zero-shot video QA on a CPU (docs/benchmarks.md). With
``frame_cache: <folder>`` on ``lp_video_eval`` the (T, H, W, 3) uint8 frames and their indices are
stored once per (video file, its size and modification time, n_frms, sampling, allow_repeat) as an
``.npz`` (numpy arrays only, read with ``allow_pickle=False``), written to a temporary name and
renamed into place, so concurrent workers and ranks never read half an entry. Only deterministic
sampling is cached: ``random`` draws other frames each epoch, so caching it would change the data.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from lavis_plugins.common.errors import UserError
from lavis_plugins.video._common import DecodedFrames

logger = logging.getLogger(__name__)

# strategies whose frame indices depend only on the file and n_frms
CACHEABLE_STRATEGIES = ("uniform", "uniform_endpoints", "headtail")


def check_frame_cache(folder: Optional[str], sampling: str, processor: str) -> None:
    """Refuse a ``frame_cache`` that cannot work, before any video is read."""
    if folder is None:
        return
    if sampling not in CACHEABLE_STRATEGIES:
        raise UserError(f"processor {processor}: frame_cache needs deterministic sampling "
                        f"({', '.join(CACHEABLE_STRATEGIES)}); sampling={sampling!r} draws other "
                        "frames each time. Remove frame_cache or change sampling.")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"processor {processor}: frame_cache {folder!r} is a file, not a folder; "
                        "give a folder path (it is created if missing)")


class FrameCache:
    """``get(path, decode)``: the cached frames of ``path``, else ``decode()``'s, stored."""

    def __init__(self, folder: str, n_frms: int, sampling: str, allow_repeat: bool) -> None:
        self.folder = Path(folder)
        self._settings = {"n_frms": n_frms, "sampling": sampling, "allow_repeat": allow_repeat}

    def entry(self, path: "str | os.PathLike[str]") -> Path:
        """Where ``path``'s frames live: keyed by its absolute path, size and mtime (a changed
        file gets a new entry) and the sampling settings."""
        p = os.path.abspath(os.fspath(path))
        st = os.stat(p)  # a missing video raises here, and decoding reports it as usual
        key = json.dumps([p, st.st_size, st.st_mtime_ns, self._settings], sort_keys=True)
        return self.folder / f"{hashlib.sha1(key.encode()).hexdigest()}.npz"

    def get(self, path: "str | os.PathLike[str]", decode: Callable[[], DecodedFrames]
            ) -> DecodedFrames:
        try:
            entry = self.entry(path)
        except OSError:
            return decode()  # the decoder names the missing/unreadable file
        if entry.is_file():
            try:
                with np.load(entry, allow_pickle=False) as z:
                    return DecodedFrames(torch.from_numpy(z["frames"].copy()),
                                         [int(i) for i in z["indices"]])
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                logger.warning("frame cache entry %s of %s is unreadable (%s); decoding again",
                               entry, path, e)
        out = decode()
        self._write(entry, out)
        return out

    def _write(self, entry: Path, out: DecodedFrames) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".npz")
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, frames=out.frames.numpy(), indices=np.asarray(out.indices))
                os.replace(tmp, entry)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as e:  # a full or read-only disk costs speed, not the run
            logger.warning("frame cache: cannot write %s (%s); frames not cached", entry, e)
