"""Image-caption pre-training data read from webdataset tar shards (img2dataset's layout).

A sample is the files of one key in a tar shard::

    KEY.jpg | KEY.jpeg | KEY.png | KEY.webp  the image
    KEY.txt                                  a caption
    KEY.json                                 metadata; "caption" (str) and/or "captions" (list)
    KEY.captions.json                        several captions (a JSON list, e.g. CapFilt's best 2)

Captions are taken from, in order: ``KEY.captions.json``, the json's ``captions`` list, the json's
``caption`` field (``caption_key``), ``KEY.txt``. With several captions one is drawn per
(seed, epoch, sample), so the draw is the same after a resume.

Tar reading (``tar_file_expander`` + ``group_by_keys``) is webdataset's; images are decoded with
PIL as webdataset's ``pilrgb`` handler does, less its copy of images that are already RGB, and
JPEGs far larger than the transform needs at a reduced scale (:func:`decode_image`,
``reduced_decode``). :class:`ShardCaptionDataset` is an
``IterableDataset`` that yields whole batches: the partition of the epoch over (rank, worker)
and the bounded shuffle come from :mod:`lavis_plugins.datasets.shard_plan`, and each batch
carries ``_data_stats`` (samples read, bad samples, and the first messages naming shard and key)
for the runner to count, log and bound (``max_bad_fraction``).

Batch: ``image`` (B', C, H, W), ``text_input`` (B' str), ``sample_key`` (B' "shard/key"), where
B' <= B after bad samples are dropped.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lavis_plugins.common.seeding import caller_rngs_kept, sample_seed, seed_global_rngs
from lavis_plugins.datasets.validation import BadSample, strict_pil_decoding  # (shard, key)
from lavis_plugins.datasets.shard_plan import (
    Segment,
    ShardSet,
    batches_per_rank,
    plan_epoch,
    window_permutation,
    worker_role,
)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
STATS_KEY = "_data_stats"
MAX_MESSAGES = 5  # bad-sample messages carried per batch (the counts are always complete)


@dataclass
class RawSample:
    """One sample's undecoded files (None: the shard ended or failed before this position)."""

    shard: int  # index in the shard set
    index: int  # position in the shard, in file order
    files: Optional[Dict[str, Any]]
    problem: str = ""  # why ``files`` is None


def read_segments(shards: ShardSet, segments: Sequence[Segment]) -> Iterator[RawSample]:
    """The raw samples of ``segments`` in order, read with webdataset; positions a shard does not
    deliver (truncated or damaged tar, missing file) come as ``RawSample(files=None)``."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    for seg in segments:
        path = shards.paths[seg.shard]
        got, problem = seg.start, ""
        try:
            with open(path, "rb") as fh:
                samples = group_by_keys(tar_file_expander([{"url": path, "stream": fh}]))
                for i, files in enumerate(samples):
                    if i < seg.start:
                        continue  # before this worker's part of the shard
                    if i >= seg.stop:
                        break
                    yield RawSample(seg.shard, i, files)
                    got = i + 1
        except Exception as e:  # noqa: BLE001 - open/tarfile errors of a damaged shard
            problem = f"{type(e).__name__}: {e}"
        if got < seg.stop:
            why = problem or "the shard ended early (truncated, or the index overcounts)"
            for i in range(got, seg.stop):
                yield RawSample(seg.shard, i, None, f"shard {path}: sample {i} unreadable: {why}")


def sample_captions(files: Dict[str, Any], caption_key: str) -> List[str]:
    """Every caption a sample offers (see the module doc for the order)."""
    if "captions.json" in files:
        caps = json.loads(files["captions.json"])
        if isinstance(caps, list):
            return [c for c in caps if isinstance(c, str) and c.strip()]
    if "json" in files:
        meta = json.loads(files["json"])
        if isinstance(meta, dict):
            if isinstance(meta.get("captions"), list):
                caps = [c for c in meta["captions"] if isinstance(c, str) and c.strip()]
                if caps:
                    return caps
            cap = meta.get(caption_key)
            if isinstance(cap, str) and cap.strip():
                return [cap]
    if "txt" in files:
        cap = files["txt"].decode("utf-8") if isinstance(files["txt"], bytes) else files["txt"]
        if cap.strip():
            return [cap]
    return []


def decode_image(data: bytes, min_side: Optional[int] = None) -> Any:
    """An RGB PIL image from a file's bytes.

    ``min_side``: a JPEG is decoded at a reduced scale (libjpeg's DCT scaling by 1/2, 1/4 or 1/8,
    PIL's ``draft``) when the result still has at least ``min_side`` pixels on each side, which
    decodes and later resizes up to 64x fewer pixels; None decodes every pixel. An image already
    RGB is returned as decoded (webdataset's ``pilrgb`` handler copies it in ``convert``).
    """
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if min_side and img.format == "JPEG":
        img.draft("RGB", (min_side, min_side))  # a no-op unless both sides stay >= min_side
    with strict_pil_decoding():  # a truncated file is a bad sample, not grey rows
        img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def read_sample(raw: "RawSample", path: str, caption_key: str,
                min_side: Optional[int] = None) -> Tuple[str, List[str], Any]:
    """(key, captions, RGB PIL image) of one raw shard sample from ``path``, or ``BadSample``
    naming the shard, the key and what is wrong (unreadable or missing caption, no image, corrupt
    image). The one reading of a caption sample: the streaming builder and CapFilt's shard input
    use it."""
    if raw.files is None:
        raise BadSample(raw.problem)
    key = raw.files.get("__key__", f"#{raw.index}")
    where = f"shard {os.path.basename(path)} key {key}"
    try:
        captions = sample_captions(raw.files, caption_key)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadSample(f"{where}: unreadable caption file ({e})") from None
    if not captions:
        raise BadSample(f"{where}: no caption (needs .txt, .json with {caption_key!r} or "
                        ".captions.json)")
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw.files), None)
    if ext is None:
        raise BadSample(f"{where}: no image (.{'/.'.join(IMAGE_EXTENSIONS)})")
    try:
        image = decode_image(raw.files[ext], min_side)
    except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt files
        raise BadSample(f"{where}: corrupt image ({type(e).__name__}: {e})") from None
    return key, captions, image


def reduced_decode_side(processor: Any) -> Optional[int]:
    """The short side an image needs for ``processor``'s first (geometric) step to lose nothing
    against a full decode, or None when that step is not known (decode in full).

    ``RandomResizedCrop(S, scale=(a, _), ratio=(r0, r1))`` (``blip2_image_train``): every crop of
    an image whose short side is L has both sides >= L * sqrt(a * min(r0, 1 / r1)), so with
    L >= S / sqrt(a * min(r0, 1 / r1)) every crop is at least S x S and is only ever shrunk to
    the output, as from the full image (a = 0.5: L >= 1.63 S, 366 px for 224). ``Resize((h, w))``
    (``blip_image_eval``) needs max(h, w) on each side, ``Resize(S)`` S on the short side.
    """
    import torchvision.transforms as T

    transform = getattr(processor, "transform", None)
    steps = getattr(transform, "transforms", [transform])
    first = steps[0] if steps else None
    if isinstance(first, T.RandomResizedCrop):
        shrink = math.sqrt(first.scale[0] * min(first.ratio[0], 1.0 / first.ratio[1]))
        return math.ceil(max(first.size) / shrink) if shrink > 0 else None
    if isinstance(first, T.Resize) and first.max_size is None:
        size = first.size
        return int(max(size)) if isinstance(size, (list, tuple)) else int(size)
    return None


class ShardCaptionDataset(IterableDataset):
    """Image-caption batches from a shard set, partitioned over (rank, worker) per epoch.

    Call :meth:`configure` (the runner does) before iterating, and :meth:`set_epoch` before each
    epoch; ``len(dataset)`` is the number of samples in the plan.
    """

    def __init__(self, shards: ShardSet, vis_processor: Callable,
                 text_processor: Optional[Callable], caption_key: str = "caption",
                 shuffle_buffer: int = 1000, max_bad_fraction: Optional[float] = None,
                 name: str = "shards", reduced_decode: bool = True) -> None:
        self.shards = shards
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.caption_key = caption_key
        self.shuffle_buffer = max(int(shuffle_buffer), 1)
        # this dataset's own bound (None: run.max_bad_fraction); see runners/train_stream.py
        self.max_bad_fraction = None if max_bad_fraction is None else float(max_bad_fraction)
        self.name = name
        # JPEGs decoded at the smallest DCT scale the transform allows (see decode_image)
        self.decode_side = reduced_decode_side(vis_processor) if reduced_decode else None
        self.seed, self.rank, self.world_size = 0, 0, 1
        self.batch_size, self.num_workers = 1, 0
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return self.shards.total

    def configure(self, *, seed: int, rank: int, world_size: int, batch_size: int,
                  num_workers: int) -> None:
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch to read, skipping the rank's first ``start_batch`` batches (resume)."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def batches_per_epoch(self) -> int:
        """Batches each rank gets per epoch (the same for every rank)."""
        return batches_per_rank(self.shards.total, self.world_size, self.batch_size)

    # ------------------------------------------------------------------ decoding
    def _decode(self, raw: RawSample) -> Dict[str, Any]:
        path = self.shards.paths[raw.shard]
        key, captions, image = read_sample(raw, path, self.caption_key, self.decode_side)
        # the caption draw and the augmentation depend on (seed, epoch, sample) only; the
        # caller's RNG states are kept once per batch (_batch)
        seed = sample_seed(self.seed, self.epoch, raw.shard, raw.index)
        seed_global_rngs(seed)
        image = self.vis_processor(image)
        # a second stream of the same seed, so the draw does not depend on the processor's
        caption = captions[int(np.random.default_rng([seed, 1]).integers(len(captions)))
                           if len(captions) > 1 else 0]
        if self.text_processor is not None:
            caption = self.text_processor(caption)
        return {"image": image, "text_input": caption,
                "sample_key": f"{os.path.basename(path)}/{key}"}

    def collate(self, samples: List[Dict[str, Any]], stats: Dict[str, Any]) -> Dict[str, Any]:
        batch: Dict[str, Any] = {STATS_KEY: stats}
        if samples:
            batch["image"] = torch.stack([s["image"] for s in samples])
            batch["text_input"] = [s["text_input"] for s in samples]
            batch["sample_key"] = [s["sample_key"] for s in samples]
        return batch

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = get_worker_info()
        worker_id = info.id if info is not None else 0
        nw = max(self.num_workers, 1)
        role, done = worker_role(worker_id, nw, self.start_batch)
        plan = plan_epoch(self.shards.sizes, self.seed, self.epoch, self.rank, self.world_size,
                          role, nw, self.batch_size)
        bsz, window = self.batch_size, self.shuffle_buffer
        length = plan.batches * bsz
        out_pos = done * bsz  # first position of this run still to yield
        if out_pos >= length:
            return
        first_window = out_pos // window
        stream = read_segments(self.shards, _skip_segments(plan.segments, first_window * window))
        pending: List[RawSample] = []
        for w in range(first_window, (length + window - 1) // window):
            n = min(window, length - w * window)
            raws = [next(stream) for _ in range(n)]
            perm = window_permutation(self.seed, self.epoch, self.rank, role, w, n)
            for j in perm[max(out_pos - w * window, 0):]:
                pending.append(raws[int(j)])
                if len(pending) == bsz:
                    yield self._batch(pending)
                    pending = []

    def _batch(self, raws: List[RawSample]) -> Dict[str, Any]:
        samples, messages, bad = [], [], 0
        with caller_rngs_kept():  # once per batch: each sample seeds the global RNGs itself
            for raw in raws:
                try:
                    samples.append(self._decode(raw))
                except BadSample as e:
                    bad += 1
                    if len(messages) < MAX_MESSAGES:
                        messages.append(str(e))
        return self.collate(samples, {"seen": len(raws), "bad": bad, "messages": messages})


def _skip_segments(segments: Sequence[Segment], skip: int) -> List[Segment]:
    """``segments`` without their first ``skip`` samples (whole segments are dropped unread)."""
    out = []
    for seg in segments:
        n = seg.stop - seg.start
        if skip >= n:
            skip -= n
            continue
        out.append(Segment(seg.shard, seg.start + skip, seg.stop))
        skip = 0
    return out
