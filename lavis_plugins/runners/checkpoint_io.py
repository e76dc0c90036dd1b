"""The runner's files: checkpoints written so nothing is lost, and the run folder's lock.

- :func:`save_checkpoint_file` writes to a temp file and renames it, so a kill never leaves a
  half-written checkpoint; a failed write (disk full, read-only folder) removes the temp file,
  leaves the previous checkpoints as they were and is one ``UserError`` line.
- :func:`point_latest` replaces ``checkpoint_latest.pth`` atomically (a new link renamed over
  the old one): it is never absent, whatever the moment of a kill.
- :func:`pack_rng` / :func:`unpack_rng`: RNG state in tensors, numbers and tuples only, so the
  runner's checkpoints load with ``torch.load(weights_only=True)`` and still resume exactly.
- :class:`RunFolder`: refuses to overwrite a run's folder (resume into it is allowed, or
  ``--force``), and holds a lock file naming the process that writes into it; a lock left by a
  dead process is taken over; stale temp files of a killed run are removed.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from lavis_plugins.common.errors import UserError

logger = logging.getLogger(__name__)

LATEST = "checkpoint_latest.pth"
LOCK = ".lavis_plugins.lock"
FINISHED = "run_finished.json"  # written when train()/evaluate() ends normally
TMP_SUFFIX = ".tmp"


# ------------------------------------------------------------------------------------ RNG
def pack_rng() -> Dict[str, Any]:
    """This process's RNG states as weights-only-loadable data (numpy's key array as a tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                       float(cached)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def unpack_rng(state: Dict[str, Any]) -> None:
    """Restore what :func:`pack_rng` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- checkpoints
def write_error(path: Path, err: BaseException) -> UserError:
    reason = getattr(err, "strerror", None) or str(err).splitlines()[0][:200]
    full = isinstance(err, OSError) and err.errno == errno.ENOSPC or "No space" in str(err)
    fix = ("free disk space or set run.output_dir on a larger disk" if full
           else "check that run.output_dir is writable")
    return UserError(f"cannot write checkpoint {path}: {reason}; {fix}. The previous checkpoints "
                     f"in {path.parent} are intact (resume from {path.parent / LATEST})")


def save_checkpoint_file(obj: Dict[str, Any], path: Path) -> None:
    """``torch.save`` to ``path`` through a temp file in the same folder and a rename."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch wraps write errors in RuntimeError
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            logger.warning("could not remove the partial file %s", tmp)
        raise write_error(path, e) from None


def point_latest(folder: Path, target: str) -> None:
    """Make ``folder/checkpoint_latest.pth`` name ``target`` (a file in ``folder``), atomically:
    the new link is made under a temp name and renamed over the old one."""
    latest = folder / LATEST
    tmp = folder / f".{LATEST}.{os.getpid()}{TMP_SUFFIX}"
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.symlink(target, tmp)
        except OSError:  # file systems without symlinks: a hard link to the same file
            os.link(folder / target, tmp)
        os.replace(tmp, latest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        logger.warning("could not update %s (%s); the checkpoint itself is %s", latest, e, target)


def replace_folder(tmp: Path, folder: Path) -> None:
    """Put the complete folder ``tmp`` at ``folder`` (a sharded checkpoint). A rename cannot
    replace a non-empty folder, so an old one (``checkpoint_best``) is renamed aside first and
    removed after: a kill in between leaves the new folder under its temp name."""
    old = folder.with_name(folder.name + ".old" + TMP_SUFFIX)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def clean_stale_tmp(folder: Path) -> None:
    """Remove temp files and folders a killed run left (``*.tmp``); only called while holding
    the lock."""
    for p in list(folder.glob("*" + TMP_SUFFIX)) + list(folder.glob(".*" + TMP_SUFFIX)):
        logger.warning("removing %s, left by an interrupted run", p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ run folder
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holds_run(folder: Path) -> bool:
    return any(folder.glob("checkpoint_*.pth")) or (folder / "log.txt").exists() or \
        (folder / "train_log.jsonl").exists() or (folder / FINISHED).exists()


class RunFolder:
    """The lock and overwrite protection of one run folder (used by the main process only).

    Args:
        folder: the run's output folder (``output_dir/job_id``).
        resume_path: ``run.resume_ckpt_path`` (resuming into the same folder is allowed).
        force: overwrite a previous run's files (``--force``).
    """

    def __init__(self, folder: Path, resume_path: Optional[str], force: bool) -> None:
        self.folder, self.resume_path, self.force = Path(folder), resume_path, force
        self.lock_path = self.folder / LOCK
        self._held = False

    def _resuming_here(self) -> bool:
        if not self.resume_path:
            return False
        here = os.path.realpath(self.folder)
        return os.path.dirname(os.path.realpath(os.path.abspath(self.resume_path))) == here

    def acquire(self) -> None:
        """Take the lock, then check the folder may be written (raises ``UserError``)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            self._check_overwrite()
            clean_stale_tmp(self.folder)
        except BaseException:
            self.release()
            raise

    def _take_lock(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None or self._stale(holder):
                    logger.warning("taking over the lock of %s from %s (process gone)",
                                   self.folder, holder or "an unreadable lock file")
                    self.lock_path.unlink(missing_ok=True)
                    continue
                since = time.strftime("%Y-%m-%d %H:%M:%S",
                                      time.localtime(float(holder.get("started", 0))))
                raise UserError(
                    f"run folder {self.folder} is in use by process {holder.get('pid')} on "
                    f"{holder.get('host')} (since {since}); wait for it to end or use another "
                    f"--job-id (if that process is gone, delete {self.lock_path})") from None
            except OSError as e:
                raise UserError(f"cannot create {self.lock_path}: {e.strerror}; check that "
                                "run.output_dir is writable") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return
        raise UserError(f"cannot take the lock {self.lock_path}: other processes keep taking it")

    def _holder(self) -> Optional[Dict[str, Any]]:
        try:
            data = json.loads(self.lock_path.read_text())
            return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def _stale(holder: Dict[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname():
            return False  # cannot see another machine's processes
        pid = int(holder["pid"])
        # our own pid: a lock an earlier runner in this process did not release
        return pid == os.getpid() or not _pid_alive(pid)

    def _check_overwrite(self) -> None:
        if not _holds_run(self.folder) or self._resuming_here():
            return
        state = "finished" if (self.folder / FINISHED).exists() else "unfinished"
        if not self.force:
            raise UserError(
                f"{self.folder} already holds a {state} run; use another --job-id, resume it "
                f"with --options run.resume_ckpt_path={self.folder / LATEST}, or pass --force "
                "to replace it")
        logger.warning("--force: replacing the %s run in %s", state, self.folder)
        for p in self.folder.iterdir():
            if p == self.lock_path:
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def mark_finished(self) -> None:
        (self.folder / FINISHED).write_text(json.dumps({"finished": time.time()}))

    def release(self) -> None:
        if self._held:
            holder = self._holder()
            if holder is None or holder.get("pid") == os.getpid():
                self.lock_path.unlink(missing_ok=True)
            self._held = False
