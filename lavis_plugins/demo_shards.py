"""The shapes dataset's stage-1 shard set: its training captions as webdataset tar shards, made
once with ``lavis-plugins make-shards`` beside the images and read by the demo's stage 1.

Layout, inside the dataset folder (:func:`lavis_plugins.demo_data.default_root`)::

    shards/train-000000.tar ...   one sample per annotation of annotations/caption_train.json
    shards/shards.json            make-shards' index (samples, bytes, source SHA-256, shard size)

:func:`lavis_plugins.demo_data.ensure_shapes_dataset` keeps it current: the set is (re)built,
under the dataset's lock, only when :func:`shard_set_problems` finds it missing, damaged (a
shard missing, of another size than indexed, or without a tar end) or stale (made from another
caption file than the dataset's, or with another shard size). A regenerated dataset replaces
its whole folder, shards included. The check reads the index and stats the shards (no hashing:
the caption file's SHA-256 comes from the dataset's manifest, which the dataset check verified).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import List

logger = logging.getLogger(__name__)

FOLDER = "shards"  # under the dataset root
SOURCE = "annotations/caption_train.json"  # what the shards are made from (relative to the root)
IMAGES = "images"
SHARD_SIZE = 500  # samples per shard: the default 4000 training captions make 8 shards


def shards_folder(root: Path | str) -> Path:
    """Where the shard set of the dataset at ``root`` lives (what stage 1's YAML names)."""
    return Path(root) / FOLDER


def shard_set_problems(root: Path | str) -> List[str]:
    """Why ``root``'s shard set cannot be used as it is; an empty list means it is current."""
    from lavis_plugins.datasets.shard_plan import INDEX_FILE, INDEX_FORMAT, ends_like_a_tar
    from lavis_plugins.demo_data import read_manifest

    folder = shards_folder(root)
    try:
        index = json.loads((folder / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return [f"{folder / INDEX_FILE} is missing or not valid JSON"]
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        return [f"{folder / INDEX_FILE} is not a {INDEX_FORMAT} index"]
    source = ((read_manifest(Path(root)) or {}).get("files") or {}).get(SOURCE) or {}
    problems = []
    if index.get("source_sha256") != source.get("sha256"):
        problems.append(f"stale: made from another {SOURCE} than the dataset's")
    if index.get("shard_size") != SHARD_SIZE:
        problems.append(f"stale: {index.get('shard_size')} samples per shard, not {SHARD_SIZE}")
    entries = index.get("shards") if isinstance(index.get("shards"), list) else []
    if not entries or sum(int(e.get("samples", 0)) for e in entries) != index.get("samples"):
        problems.append(f"{folder / INDEX_FILE} lists no shards or miscounts their samples")
    for e in entries:
        path = folder / str(e.get("file"))
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != e.get("bytes") or not ends_like_a_tar(str(path)):
            problems.append(f"{path} is damaged ({path.stat().st_size} bytes, index says "
                            f"{e.get('bytes')})")
    return problems


def build_shard_set(root: Path | str) -> Path:
    """(Re)write ``root``'s shard set with make-shards (the caller holds the dataset's lock)."""
    from lavis_plugins.cli.make_shards import make_shards

    root = Path(root)
    t0 = time.perf_counter()
    index = make_shards(root / SOURCE, root / IMAGES, shards_folder(root), SHARD_SIZE,
                        force=True, progress=False)
    logger.info("shapes shard set ready in %.1f s: %d samples in %d shards at %s",
                time.perf_counter() - t0, index["samples"], len(index["shards"]),
                shards_folder(root))
    return shards_folder(root)
