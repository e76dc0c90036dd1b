"""CapFilt's output folder: per-rank partial files, resume, and the merged annotation files.

Layout of ``run.capfilt.output``::

    capfilt_state.json   the settings and input the folder belongs to (written first)
    parts/rank<R>.jsonl  one line per finished batch: {"batch": b, "records": [...]}
    capfilt.json         merged: one entry per image (annotation fields, "caption": kept
                         captions, "capfilt": candidates with scores and kept indices)
    capfilt_flat.json    merged: one entry per kept caption (LAVIS's caption training format)
    report/              counts, score histogram, example grid (lavis_plugins.capfilt.report)

A batch is the resume unit: its line is written whole and flushed to disk, so a killed run
loses at most the batches in flight; a line cut short by the kill is dropped when the file is
next opened. Ranks write only their own file and a batch is in at most one file; any rank count
can continue any earlier run of the same settings (a batch's captions depend on its index only).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

from lavis_plugins.capfilt.config import SCORE_HEADS
from lavis_plugins.common.errors import UserError

STATE = "capfilt_state.json"
PARTS = "parts"
MERGED = "capfilt.json"
FLAT = "capfilt_flat.json"
STATE_FORMAT = "lavis_plugins.capfilt/1"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON through a temporary file renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def prepare_output(out: Path, state: Mapping[str, Any], force: bool) -> bool:
    """Make ``out`` ready on rank 0; True when it already holds the finished result.

    A folder of another CapFilt run (other settings or input) is refused unless ``force``,
    which clears it; a folder that is not CapFilt's and not empty is always refused.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"run.capfilt.output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / STATE).is_file():
            raise UserError(f"run.capfilt.output {out} is not empty and holds no CapFilt run "
                            f"({STATE}); choose an empty or new folder")
        try:
            old = json.loads((out / STATE).read_text())
        except ValueError:
            old = None
        if force:
            shutil.rmtree(out)
        elif old != dict(state):
            diff = sorted(k for k in set(old or {}) | set(state)
                          if (old or {}).get(k) != state.get(k))
            raise UserError(f"run.capfilt.output {out} holds a CapFilt run with other settings "
                            f"or input ({diff}); choose another folder, or pass --force "
                            "(run.force=True) to replace it")
        elif (out / MERGED).is_file():
            return True
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    if not (out / STATE).is_file():
        write_json_atomic(out / STATE, dict(state))
    return False


def _complete_lines(path: Path) -> Iterator[Dict[str, Any]]:
    """The whole JSON lines of a part file (a last line cut short by a kill is skipped)."""
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                yield json.loads(raw)
            except ValueError:
                raise UserError(f"{path}: a line is not JSON; the part file is damaged. "
                                "Remove the file to redo its batches") from None


def done_batches(out: Path) -> Dict[int, List[Dict[str, Any]]]:
    """``{batch: records}`` of every finished batch in every part file of ``out``."""
    done: Dict[int, List[Dict[str, Any]]] = {}
    for path in sorted((out / PARTS).glob("rank*.jsonl")):
        for line in _complete_lines(path):
            done.setdefault(int(line["batch"]), line["records"])
    return done


class PartWriter:
    """Appends finished batches to ``parts/rank<rank>.jsonl``, one flushed line each."""

    def __init__(self, out: Path, rank: int) -> None:
        self.path = out / PARTS / f"rank{rank}.jsonl"
        self._drop_cut_line()
        self._f = open(self.path, "ab")

    def _drop_cut_line(self) -> None:
        """Truncate a last line without its newline (a kill during the write)."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def write(self, batch: int, records: Sequence[Mapping[str, Any]]) -> None:
        self._f.write((json.dumps({"batch": batch, "records": list(records)}) + "\n").encode())
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge(out: Path, n_batches: int, total: int,
          entries: Optional[Sequence[Mapping[str, Any]]]) -> List[Dict[str, Any]]:
    """Write ``capfilt.json`` and ``capfilt_flat.json`` from the part files, in input order;
    return the merged entries. ``entries``: the input's images (``annotation`` fields), or None
    when each record carries its ``annotation`` (shard input). A sample that could not be read
    is an entry without captions whose ``capfilt`` holds ``bad`` (the problem)."""
    done = done_batches(out)
    missing = sorted(set(range(n_batches)) - set(done))
    if missing:
        raise RuntimeError(f"CapFilt batches {missing[:10]} were written by no rank")
    records = sorted((r for b in range(n_batches) for r in done[b]), key=lambda r: r["index"])
    if [r["index"] for r in records] != list(range(total)):
        raise RuntimeError("CapFilt part files do not hold each input image once")
    merged, flat = [], []
    for i, rec in enumerate(records):
        cands = rec["candidates"]
        kept = [cands[k] for k in rec["kept"]]
        ann = dict(entries[i]["annotation"] if entries is not None else rec.get("annotation", {}))
        info = {"candidates": cands, "kept": rec["kept"]}
        if "bad" in rec:
            info["bad"] = rec["bad"]
        merged.append(dict(ann, caption=[c["caption"] for c in kept], capfilt=info))
        for c in kept:
            flat.append(dict(ann, caption=c["caption"], capfilt_source=c["source"],
                             **{f"capfilt_{k}": c[k] for k in SCORE_HEADS if k in c}))
    write_json_atomic(out / FLAT, flat)
    write_json_atomic(out / MERGED, merged)  # last: its presence marks a finished run
    return merged


def check_shards_folder(out: Path, shards: Path, force: bool) -> None:
    """``shards`` may be replaced: absent, empty, written by this output's CapFilt run, or
    ``force``; anything else is a ``UserError`` (before any work is done)."""
    from lavis_plugins.datasets.shard_plan import INDEX_FILE

    if force or not shards.exists():
        return
    if not shards.is_dir():
        raise UserError(f"run.capfilt.shards {shards} exists and is not a folder")
    if not any(shards.iterdir()):
        return
    try:
        ours = json.loads((shards / INDEX_FILE).read_text()).get("source") == str(out / FLAT)
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise UserError(f"run.capfilt.shards {shards} is not empty and was not written by the "
                        f"CapFilt run in {out}; choose a new folder, or pass --force to replace it")


def write_shards(out: Path, shards: Path, image_root: Path, shard_size: int,
                 force: bool) -> Optional[Dict[str, Any]]:
    """The kept captions as a shard set (one sample per image, its kept captions in
    ``KEY.captions.json``: the streaming builder draws one per epoch); images without a kept
    caption are left out. Returns the shard index, None when no caption was kept."""
    from lavis_plugins.cli.make_shards import make_shards

    check_shards_folder(out, shards, force)
    if not json.loads((out / FLAT).read_text()):
        return None
    return make_shards(out / FLAT, image_root, shards, shard_size, group_by_image=True,
                       force=True, progress=False)


def read_merged(out: Path) -> List[Dict[str, Any]]:
    """The merged entries of a finished run (``capfilt.json``)."""
    try:
        return json.loads((out / MERGED).read_text())
    except ValueError as e:
        raise UserError(f"{out / MERGED} is damaged ({e}); rerun with --force") from None
