"""``lavis-plugins make-shards``: a LAVIS caption annotation file + image folder -> tar shards.

    lavis-plugins make-shards --ann coco_karpathy_train.json --images /data/coco/images \\
        --out /data/coco_shards --shard-size 5000

Input: a JSON list of ``{"image": path relative to --images, "caption": str or [str, ...], ...}``
(LAVIS's COCO/VG caption format). Every annotation becomes one sample (``--group-by-image``
instead makes one sample per image holding all its captions in ``KEY.captions.json``):

    KEY.<image extension>   the image file's bytes, unchanged
    KEY.txt                 the caption (first caption when there are several)
    KEY.json                the annotation (all its fields; "caption", and "captions" if several)

Shards are written with webdataset's ``ShardWriter`` as ``<prefix>-000000.tar``... with fixed
file times (same input, same bytes), into a temporary folder renamed into place, with
``shards.json`` (samples and bytes per shard), the index the shard dataset plans epochs from;
it also records what the shards were made from (the annotation file's SHA-256, the shard size),
so a cache of shards can tell when it is stale (:mod:`lavis_plugins.demo_shards`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List

from lavis_plugins.common.errors import UserError

IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}


def _load_annotations(ann: Path) -> List[Dict[str, Any]]:
    try:
        data = json.loads(ann.read_text())
    except FileNotFoundError:
        raise UserError(f"--ann {ann} does not exist") from None
    except ValueError as e:
        raise UserError(f"--ann {ann} is not valid JSON ({e})") from None
    if not isinstance(data, list) or not all(isinstance(a, dict) for a in data):
        raise UserError(f"--ann {ann} must be a JSON list of {{\"image\", \"caption\"}} objects "
                        "(LAVIS's caption format)")
    if not data:
        raise UserError(f"--ann {ann} holds no annotation")
    return data


def _captions(a: Dict[str, Any], i: int, ann: Path) -> List[str]:
    if "image" not in a:
        raise UserError(f"{ann}: annotation {i} has no 'image' field: {a}")
    cap = a.get("caption")
    caps = [cap] if isinstance(cap, str) else cap
    if not isinstance(caps, list) or not caps or not all(isinstance(c, str) and c.strip()
                                                         for c in caps):
        raise UserError(f"{ann}: annotation {i} ({a['image']}) has no caption (needs 'caption': "
                        "a non-empty string or list of strings)")
    return caps


def _samples(annotations: List[Dict[str, Any]], ann: Path, group_by_image: bool):
    """(image path, captions, annotation) per sample, in annotation order."""
    if not group_by_image:
        return [(a["image"], _captions(a, i, ann), a) for i, a in enumerate(annotations)]
    grouped: "OrderedDict[str, tuple]" = OrderedDict()
    for i, a in enumerate(annotations):
        caps = _captions(a, i, ann)
        if a["image"] in grouped:
            grouped[a["image"]][1].extend(caps)
        else:
            grouped[a["image"]] = (a["image"], list(caps), dict(a))
    return list(grouped.values())


def make_shards(ann: str | Path, images: str | Path, out: str | Path, shard_size: int,
                prefix: str = "train", group_by_image: bool = False, force: bool = False,
                progress: bool = True) -> Dict[str, Any]:
    """Write the shards and their index; return the index (``shards.json``'s content)."""
    import webdataset as wds

    from lavis_plugins.datasets.shard_plan import INDEX_FORMAT, publish_shard_set

    ann, images, out = Path(ann), Path(images), Path(out)
    if not isinstance(shard_size, int) or shard_size < 1:
        raise UserError(f"--shard-size must be a positive integer, got {shard_size!r}")
    if not images.is_dir():
        raise UserError(f"--images {images} is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} is not empty; choose a new folder or pass --force to "
                        "replace it")
    samples = _samples(_load_annotations(ann), ann, group_by_image)
    for rel, _, _ in samples:  # every image first: a bad entry stops before anything is written
        if Path(rel).suffix.lower() not in IMAGE_EXTS:
            raise UserError(f"{ann}: image {rel} is not a .jpg/.jpeg/.png/.webp file")
        if not (images / rel).is_file():
            raise UserError(f"{ann}: image {rel} is not under --images {images}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written: List[str] = []
    it = samples
    if progress:
        from lavis_plugins.common.progress import track

        it = track(samples, len(samples), f"writing shards to {out}", unit="sample")
    try:
        with wds.ShardWriter(str(tmp / f"{prefix}-%06d.tar"), maxcount=shard_size, verbose=0,
                             mtime=0, post=written.append) as sink:
            for i, (rel, caps, a) in enumerate(it):
                path = images / rel
                ext = IMAGE_EXTS[path.suffix.lower()]
                try:
                    data = path.read_bytes()
                except OSError as e:
                    raise UserError(
                        f"{ann}: image {rel} cannot be read under {images} ({e})") from None
                meta = dict(a, caption=caps[0])
                sample = {"__key__": f"{i:09d}", ext: data, "txt": caps[0]}
                if len(caps) > 1:
                    meta["captions"] = caps
                    if group_by_image:
                        sample["captions.json"] = json.dumps(caps).encode()
                sample["json"] = json.dumps(meta).encode()
                sink.write(sample)
        entries = []
        for name in sorted({os.path.basename(p) for p in written}):
            entries.append({"file": name, "bytes": (tmp / name).stat().st_size})
        counts = _count(len(samples), shard_size, len(entries))
        for e, n in zip(entries, counts):
            e["samples"] = n
        index = {"format": INDEX_FORMAT, "source": str(ann),
                 "source_sha256": hashlib.sha256(ann.read_bytes()).hexdigest(),
                 "shard_size": shard_size, "group_by_image": group_by_image,
                 "samples": len(samples), "shards": entries}
        publish_shard_set(tmp, out, index)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return index


def _count(total: int, per_shard: int, n_shards: int) -> List[int]:
    """Samples per shard: ShardWriter fills each shard to ``per_shard`` before the next."""
    counts = [min(per_shard, total - k * per_shard) for k in range(n_shards)]
    if sum(counts) != total or min(counts) < 1:
        raise RuntimeError(f"shard counts {counts} do not add up to {total} samples")
    return counts


def add_parsers(sub) -> None:
    """The ``make-shards`` sub-command."""
    p = sub.add_parser("make-shards",
                       help="convert a LAVIS caption annotation file and its images into "
                            "webdataset tar shards (for lp_webdataset_caption)")
    p.add_argument("--ann", required=True, help="JSON list of {image, caption} (COCO/VG style)")
    p.add_argument("--images", required=True, help="folder the annotations' image paths are in")
    p.add_argument("--out", required=True, help="output folder for the shards and shards.json")
    p.add_argument("--shard-size", type=int, required=True, help="samples per shard")
    p.add_argument("--prefix", default="train", help="shard file name prefix (default: train)")
    p.add_argument("--group-by-image", action="store_true",
                   help="one sample per image with all its captions (KEY.captions.json)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=_command)


def _command(args) -> int:
    index = make_shards(args.ann, args.images, args.out, args.shard_size, prefix=args.prefix,
                        group_by_image=args.group_by_image, force=args.force)
    pattern = shard_pattern(Path(args.out).absolute(), args.prefix, len(index["shards"]))
    print(f"lavis-plugins: {index['samples']} samples in {len(index['shards'])} shard(s) in "
          f"{args.out}; read them with build_info.shards: {pattern}", flush=True)
    return 0


def shard_pattern(out: Path, prefix: str, n_shards: int) -> str:
    """The brace pattern naming ``n_shards`` shards written by :func:`make_shards`."""
    return f"{out}/{prefix}-{{000000..{n_shards - 1:06d}}}.tar"
