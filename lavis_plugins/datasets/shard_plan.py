"""Shard sets and the deterministic partition of their samples over (rank, dataloader worker).

A shard set is a list of webdataset tar files (img2dataset's layout) with the number of samples
in each, taken from an index so that nothing has to be read to plan an epoch:

- ``shards.json`` beside the shards, written by ``lavis-plugins make-shards``:
  ``{"format": "lavis_plugins.shards/1", "shards": [{"file", "samples", "bytes"}]}``;
- else img2dataset's ``<shard>_stats.json`` (``"successes"``);
- else the shard is counted by reading it once (with webdataset), with a warning.

Missing shards are left out of the plan and counted as bad; a shard whose size differs from the
index (truncated copy) is counted by reading it, and the samples it lost are counted as bad.

Partition of one epoch (:func:`plan_epoch`), from ``(seed, epoch)`` only:

1. the shards are put in an order drawn from ``(seed, epoch)`` and their samples concatenated
   into one stream of N positions;
2. each of the W ranks gets K = N // (W * B) batches of B samples: rank r takes the contiguous
   stream range ``[r K B, (r + 1) K B)``. The tail, the last ``N - W K B < W B`` positions of the
   epoch's shard order, is not used in that epoch (as ``drop_last``); the shard order changes
   every epoch, so the tail is a different set of samples each epoch;
3. a rank's K batches are split over its dataloader workers in contiguous runs (worker w gets
   ``K // nw`` batches, one more for the first ``K % nw``), so each worker reads its own shards
   (at most two of them are shared with a neighbour, each reading only its part);
4. inside a worker's run, samples are shuffled within windows of ``shuffle_buffer`` positions
   (a permutation drawn from ``(seed, epoch, rank, worker, window)``): a bounded sample shuffle
   whose state at any batch is known without reading data, which makes resume exact and cheap.

So in an epoch every used sample goes to exactly one (rank, worker, batch), and every rank runs
the same number of steps.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from lavis_plugins.common.errors import UserError

logger = logging.getLogger(__name__)

INDEX_FILE = "shards.json"
INDEX_FORMAT = "lavis_plugins.shards/1"


# ------------------------------------------------------------------------------ shard lists


def expand_shard_spec(spec: Union[str, Sequence[str]], what: str) -> List[str]:
    """Shard paths from a brace pattern (``/data/{00000..00099}.tar``) or a list of patterns."""
    import braceexpand

    specs = [spec] if isinstance(spec, str) else list(spec or [])
    if not specs:
        raise UserError(f"{what} is empty: give a shard pattern such as "
                        "/data/laion/{00000..09999}.tar or a list of tar paths")
    paths: List[str] = []
    for s in specs:
        if not isinstance(s, str) or not s:
            raise UserError(f"{what}: {s!r} is not a path or brace pattern")
        if os.path.isdir(os.path.expanduser(s)):  # a folder: the shards its index lists, or all
            folder = Path(s).expanduser()
            listed = _index_of_folder(folder, {})
            found = [str(folder / f) for f in listed] or sorted(map(str, folder.glob("*.tar")))
            if not found:
                raise UserError(f"{what}: folder {s} holds no .tar shard")
            paths.extend(found)
            continue
        try:
            expanded = list(braceexpand.braceexpand(os.path.expanduser(s)))
        except braceexpand.UnbalancedBracesError:
            raise UserError(f"{what}: bad brace pattern {s!r} (unbalanced braces); write ranges "
                            "as {00000..00099}") from None
        paths.extend(expanded)
    not_tar = [p for p in paths if not p.endswith(".tar")]
    if not_tar:
        raise UserError(f"{what}: {not_tar[0]!r} is not a .tar shard (patterns must expand to "
                        ".tar files)")
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise UserError(f"{what}: shard {dup} is listed twice; each shard must appear once")
    return paths


@dataclass
class ShardSet:
    """Shards with their sample counts (only readable shards), and what was lost at build."""

    paths: List[str]  # shards in the plan, in listing order
    sizes: List[int]  # samples per shard (readable ones)
    bad: int = 0  # samples known lost at build time (missing or truncated shards)
    problems: List[str] = field(default_factory=list)  # one line per missing/truncated shard

    @property
    def total(self) -> int:
        return int(sum(self.sizes))

    def fingerprint(self) -> Dict[str, int]:
        """What a resume checks: same shards and sizes give the same data order."""
        import hashlib

        h = hashlib.sha256()
        for p, n in zip(self.paths, self.sizes):
            h.update(f"{os.path.basename(p)}:{n};".encode())
        return {"shards": len(self.paths), "samples": self.total,
                "digest": int(h.hexdigest()[:12], 16)}


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _index_of_folder(folder: Path, cache: Dict[Path, Dict[str, dict]]) -> Dict[str, dict]:
    """``{file name: {"samples", "bytes"}}`` from ``folder/shards.json`` (empty if none)."""
    if folder not in cache:
        data = _read_json(folder / INDEX_FILE)
        entries = {}
        if isinstance(data, dict) and data.get("format") == INDEX_FORMAT:
            for e in data.get("shards", []):
                entries[str(e["file"])] = {"samples": int(e["samples"]),
                                           "bytes": int(e.get("bytes", -1))}
        elif data is not None:
            logger.warning("%s is not a %s index; ignoring it", folder / INDEX_FILE, INDEX_FORMAT)
        cache[folder] = entries
    return cache[folder]


def count_shard_samples(path: str) -> Tuple[int, Optional[str]]:
    """Samples readable in a tar shard (read with webdataset), and the error that ended it early."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    n = 0
    try:
        with open(path, "rb") as fh:
            for _ in group_by_keys(tar_file_expander([{"url": path, "stream": fh}])):
                n += 1
    except Exception as e:  # noqa: BLE001 - tarfile raises several types on damaged archives
        return n, f"{type(e).__name__}: {e}"
    return n, None


def load_shard_set(paths: Sequence[str], what: str, progress: bool = True) -> ShardSet:
    """Counts of every shard (index, img2dataset stats, or reading it); missing and truncated
    shards are reported (warning) and counted as bad."""
    cache: Dict[Path, Dict[str, dict]] = {}
    kept, sizes, problems, bad = [], [], [], 0
    to_count = []
    for p in paths:
        path = Path(p)
        entry = _index_of_folder(path.parent, cache).get(path.name)
        if entry is None:
            stats = _read_json(path.with_name(path.stem + "_stats.json"))  # img2dataset
            if isinstance(stats, dict) and "successes" in stats:
                entry = {"samples": int(stats["successes"]), "bytes": -1}
        if not path.is_file():
            lost = entry["samples"] if entry else 0
            bad += lost
            problems.append(f"shard {p} is missing ({lost if entry else 'unknown'} samples lost)")
            continue
        if entry is not None and entry["bytes"] >= 0 and path.stat().st_size != entry["bytes"]:
            to_count.append((p, entry))
        elif entry is not None and entry["bytes"] < 0 and not ends_like_a_tar(p):
            to_count.append((p, entry))  # img2dataset stats carry no size: a cut-off end shows
        elif entry is None:
            to_count.append((p, None))
        kept.append(p)
        sizes.append(entry["samples"] if entry else -1)
    if to_count:
        it = to_count
        if progress and len(to_count) > 1:
            from lavis_plugins.common.progress import track

            it = track(to_count, len(to_count), "counting shard samples", unit="shard")
        counted = {}
        for p, entry in it:
            n, err = count_shard_samples(p)
            counted[p] = n
            if entry is not None:
                lost = max(entry["samples"] - n, 0)
                bad += lost
                size = (f"index says {entry['bytes']}" if entry["bytes"] >= 0
                        else "no end-of-archive blocks")
                problems.append(f"shard {p} is truncated: {path_size(p)} bytes, {size}; {n} of "
                                f"{entry['samples']} samples readable")
            elif err is not None:
                problems.append(f"shard {p} is damaged ({err}); its first {n} samples are used")
        if any(e is None for _, e in to_count):
            logger.warning("%s: %d shard(s) have no index (%s or img2dataset *_stats.json): "
                           "counted by reading them; write an index with `lavis-plugins "
                           "make-shards` to skip this", what, sum(e is None for _, e in to_count),
                           INDEX_FILE)
        sizes = [counted.get(p, n) for p, n in zip(kept, sizes)]
    for line in problems:
        logger.warning("%s: %s", what, line)
    if not kept:
        raise UserError(f"{what}: none of the {len(paths)} shard(s) exists (first: {paths[0]}); "
                        "check the path or brace pattern")
    return ShardSet(kept, [int(s) for s in sizes], bad, problems)


def publish_shard_set(tmp: Path, out: Path, index: dict) -> None:
    """Write ``index`` as the shard set's index in ``tmp`` (the folder the shards were written
    to) and move ``tmp`` to ``out``, replacing an older set there: readers see the old set or
    the whole new one, never a half-written one."""
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def path_size(path: str) -> int:
    return os.stat(path).st_size


def ends_like_a_tar(path: str) -> bool:
    """Whether the file ends with a tar archive's end marker (two 512-byte zero blocks), which a
    copy cut off in the middle lacks. One small read per shard, so it scales to 10k shards."""
    size = path_size(path)
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as fh:
        fh.seek(size - 1024)
        return fh.read(1024) == bytes(1024)


# -------------------------------------------------------------------------------- partition


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` (in file order) of shard ``shard`` (index in the shard set)."""

    shard: int
    start: int
    stop: int


@dataclass(frozen=True)
class WorkerPlan:
    """What one (rank, worker) reads in one epoch: its segments, in order, and its batches."""

    segments: Tuple[Segment, ...]
    batches: int  # batches this worker yields in the epoch
    first_batch: int  # index of its first batch among the rank's batches (contiguous runs)


def batches_per_rank(total: int, world_size: int, batch_size: int) -> int:
    """K = N // (W B): every rank runs this many steps per epoch."""
    return total // (world_size * batch_size)


def worker_batches(k: int, num_workers: int) -> List[int]:
    """Batches of each worker: K // nw each, one more for the first K % nw workers."""
    nw = max(num_workers, 1)
    return [k // nw + (1 if w < k % nw else 0) for w in range(nw)]


def shard_order(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shard order, drawn from (seed, epoch)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), 0x5AD]))
    return rng.permutation(n_shards)


def plan_epoch(sizes: Sequence[int], seed: int, epoch: int, rank: int, world_size: int,
               worker: int, num_workers: int, batch_size: int) -> WorkerPlan:
    """The segments worker ``worker`` of rank ``rank`` reads in ``epoch`` (see module doc)."""
    k = batches_per_rank(int(sum(sizes)), world_size, batch_size)
    per_worker = worker_batches(k, num_workers)
    first = sum(per_worker[:worker])
    lo = (rank * k + first) * batch_size  # stream positions of this worker
    hi = lo + per_worker[worker] * batch_size
    segments = []
    pos = 0
    for s in shard_order(len(sizes), seed, epoch):
        n = int(sizes[s])
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            segments.append(Segment(int(s), a - pos, b - pos))
        pos += n
        if pos >= hi:
            break
    return WorkerPlan(tuple(segments), per_worker[worker], first)


def worker_role(worker_id: int, num_workers: int, start_batch: int) -> Tuple[int, int]:
    """Which worker run a dataloader worker serves after ``start_batch`` batches of the rank were
    consumed, and how many batches of that run were consumed.

    The dataloader takes batch i from worker ``i % nw``; resuming at batch s, its worker j must
    play the run of the worker that served position s + j, so the order is the uninterrupted one.
    Returns ``(role, consumed)``: the run's index and how many of its batches are done.
    """
    nw = max(num_workers, 1)
    role = (worker_id + start_batch) % nw
    consumed = (start_batch - role + nw - 1) // nw if start_batch > role else 0
    return role, consumed


def window_permutation(seed: int, epoch: int, rank: int, role: int, window: int,
                       length: int) -> np.ndarray:
    """The bounded shuffle of one window of a worker's run."""
    rng = np.random.default_rng(np.random.SeedSequence(
        [int(seed), int(epoch), int(rank), int(role), int(window), 0x5B0]))
    return rng.permutation(length)
