"""CapFilt's input read from webdataset shards (the streaming builder's format), and the shard
set written from it.

Input: the shards ``lp_webdataset_caption`` reads (``lavis-plugins make-shards`` or img2dataset's
layout; ``KEY.jpg|png|...`` and the captions of ``KEY.captions.json`` / ``KEY.json`` /
``KEY.txt``, see :mod:`lavis_plugins.datasets.webdataset_caption`). Every sample is one image,
its captions are its web captions. Samples are numbered in shard order (the index's order), and
the work is cut into batches that never cross a shard: batch ``b`` of shard ``s`` goes to rank
``s % world_size``, so each rank streams only its own shards, each once, front to back; a batch
is the resume unit (the task's part files), so a killed run redoes at most the batches in flight.

A sample that cannot be read (corrupt image, no caption, a truncated shard) is not processed: its
record carries ``bad`` (one line naming shard, key and problem), it is counted in the report and
logged. A missing shard stops the run before any work (one line naming it): the output would
silently lack its images.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from lavis_plugins.common.errors import UserError
from lavis_plugins.datasets.shard_plan import (INDEX_FORMAT, Segment, ShardSet,
                                               expand_shard_spec, load_shard_set,
                                               publish_shard_set)
from lavis_plugins.datasets.validation import BadSample
from lavis_plugins.datasets.webdataset_caption import (IMAGE_EXTENSIONS, decode_image,
                                                       read_sample, read_segments)

logger = logging.getLogger(__name__)

# annotation fields that hold captions: replaced by the kept ones in the output
CAPTION_FIELDS = ("caption", "captions")


def open_shard_input(spec: Any, what: str) -> ShardSet:
    """The shard set of ``spec`` (folder, brace pattern or list); a missing, truncated or
    damaged shard is a ``UserError`` naming it (CapFilt's output must hold every input image)."""
    shards = load_shard_set(expand_shard_spec(spec, what), what, progress=False)
    if shards.problems:
        more = f" (and {len(shards.problems) - 1} more)" if len(shards.problems) > 1 else ""
        raise UserError(f"{what}: {shards.problems[0]}{more}; restore it or leave it out of the "
                        "list")
    return shards


class CapFiltShardInput:
    """Images and web captions from a shard set, read in batches that never cross a shard.

    Global sample index ``i`` is position ``i - offsets[s]`` of shard ``s``. Items are read with
    :meth:`iter_batches`; ``entries`` is None (a sample's fields are known once it is read).
    """

    entries = None  # the JSON input's per-image list; shards carry their fields in the records

    def __init__(self, shards: ShardSet, vis_processor: Callable,
                 text_processor: Optional[Callable[[str], str]], source: str,
                 caption_key: str = "caption") -> None:
        self.shards = shards
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.caption_key = caption_key
        fp = shards.fingerprint()
        # recorded in the output's state: a resume must read the same shards
        self.source = f"shards {source} ({fp['shards']} shards, {fp['samples']} samples, " \
                      f"{fp['digest']:x})"
        self.offsets = [0]
        for n in shards.sizes:
            self.offsets.append(self.offsets[-1] + n)

    def __len__(self) -> int:
        return self.shards.total

    def locate(self, index: int) -> Tuple[int, int]:
        """(shard, position in the shard) of global sample ``index``."""
        import bisect

        s = bisect.bisect_right(self.offsets, index) - 1
        return s, index - self.offsets[s]

    def work_plan(self, batch_size: int, world: int) -> List[Tuple[List[int], int]]:
        """``(global indices, rank)`` per batch: each shard cut into runs of ``batch_size``
        samples, shard ``s``'s batches to rank ``s % world``."""
        plan = []
        for s, n in enumerate(self.shards.sizes):
            for start in range(0, n, batch_size):
                ix = list(range(self.offsets[s] + start,
                                self.offsets[s] + min(start + batch_size, n)))
                plan.append((ix, s % world))
        return plan

    def iter_batches(self, batches: Sequence[int], plan: Sequence[Tuple[List[int], int]],
                     num_workers: int = 0) -> Iterator[Tuple[int, Dict[str, Any]]]:
        """``(b, batch)`` for the batches ``batches`` (in order); each shard is read once, from
        the first position a batch needs to the last. ``batch``: ``image`` (B', 3, H, W) of the
        readable samples, ``index`` (B'), ``web`` (B' caption lists), ``annotation`` (B'
        dicts), ``bad`` ([(index, message)]). ``num_workers`` is unused (one stream a rank)."""
        by_shard: Dict[int, List[int]] = {}
        for b in batches:
            by_shard.setdefault(self.locate(plan[b][0][0])[0], []).append(b)
        for s in sorted(by_shard):
            todo = by_shard[s]
            first, last = plan[todo[0]][0][0], plan[todo[-1]][0][-1]
            want = {i: b for b in todo for i in plan[b][0]}
            stream = read_segments(self.shards, [Segment(s, first - self.offsets[s],
                                                         last + 1 - self.offsets[s])])
            current: Optional[int] = None
            items: List[Tuple[int, Any]] = []
            for raw in stream:
                index = self.offsets[s] + raw.index
                b = want.get(index)
                if b is None:
                    continue  # a finished batch between two to do (resume)
                if current is not None and b != current:
                    yield current, self._collate(items)
                    items = []
                current = b
                items.append((index, raw))
            if current is not None:
                yield current, self._collate(items)

    def _decode(self, raw) -> Tuple[Any, List[str], Dict[str, Any]]:
        """(image tensor, web captions, annotation) of one raw sample, or ``BadSample``."""
        path = self.shards.paths[raw.shard]
        key, captions, image = read_sample(raw, path, self.caption_key)
        try:
            meta = json.loads(raw.files["json"]) if "json" in raw.files else {}
        except (ValueError, UnicodeDecodeError) as e:
            raise BadSample(f"shard {os.path.basename(path)} key {key}: unreadable caption "
                            f"file ({e})") from None
        ann = {k: v for k, v in (meta if isinstance(meta, dict) else {}).items()
               if k not in CAPTION_FIELDS}
        ann.update(shard=os.path.basename(path), key=key)
        return self.vis_processor(image), captions, ann

    def _collate(self, items: List[Tuple[int, Any]]) -> Dict[str, Any]:
        images, index, web, anns, bad = [], [], [], [], []
        for i, raw in items:
            try:
                image, caps, ann = self._decode(raw)
            except BadSample as e:
                bad.append((i, str(e)))
                continue
            images.append(image)
            index.append(i)
            web.append(caps)
            anns.append(ann)
        return {"image": torch.stack(images) if images else None, "index": index, "web": web,
                "annotation": anns, "bad": bad}

    def example_image(self, index: int, entry: Mapping[str, Any]):
        """The PIL image of sample ``index`` (for the report's example grid)."""
        s, pos = self.locate(index)
        raw = next(read_segments(self.shards, [Segment(s, pos, pos + 1)]))
        ext = next(e for e in IMAGE_EXTENSIONS if e in (raw.files or {}))
        return decode_image(raw.files[ext])


def write_shards_from_input(source: CapFiltShardInput, merged: Sequence[Mapping[str, Any]],
                            out: Path, shard_size: int, origin: str) -> Optional[Dict[str, Any]]:
    """The kept captions as a shard set: each input sample with a kept caption is copied (its
    image bytes unchanged) with ``KEY.captions.json`` (the kept captions, read by the streaming
    builder's multi-caption mode), ``KEY.txt`` (the best one) and ``KEY.json`` (its fields, the
    kept captions and their scores). Written into a temporary folder renamed into place, with
    the ``shards.json`` index; ``origin`` is recorded as its source. None: nothing was kept."""
    import webdataset as wds

    if not any(e["caption"] for e in merged):
        return None
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts: Dict[str, int] = {}
    written: List[str] = []
    try:
        with wds.ShardWriter(str(tmp / "capfilt-%06d.tar"), maxcount=shard_size, verbose=0,
                             mtime=0, post=written.append) as sink:
            segments = [Segment(s, 0, n) for s, n in enumerate(source.shards.sizes)]
            for raw in read_segments(source.shards, segments):
                entry = merged[source.offsets[raw.shard] + raw.index]
                if raw.files is None or not entry["caption"]:
                    continue
                kept = list(entry["caption"])
                meta = {k: v for k, v in entry.items() if k != "capfilt"}
                sample = {k: v for k, v in raw.files.items()
                          if k == "__key__" or k in IMAGE_EXTENSIONS}
                sample.update({"txt": kept[0], "captions.json": json.dumps(kept).encode(),
                               "json": json.dumps(dict(meta, caption=kept[0],
                                                       captions=kept)).encode()})
                sink.write(sample)
                name = os.path.basename(sink.fname)
                counts[name] = counts.get(name, 0) + 1
        entries = [{"file": name, "bytes": (tmp / name).stat().st_size, "samples": counts[name]}
                   for name in sorted(counts)]
        index = {"format": INDEX_FORMAT, "source": origin, "shard_size": shard_size,
                 "group_by_image": True, "samples": sum(counts.values()), "shards": entries}
        publish_shard_set(tmp, out, index)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return index
