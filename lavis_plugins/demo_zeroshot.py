"""Classification folders made from the shapes dataset, for zero-shot classification in the demo
and the PAINT experiment (``docs/paint_shapes.md``).

Images holding one shape are sorted into ImageFolder trees whose class is some of that shape's
attributes, read from the image's captions (every caption names every attribute), e.g.
``test/red_circle/2000017.png`` for ``attributes=("color", "shape")``.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence

from lavis_plugins.common.errors import UserError

ATTRIBUTES = ("color", "size", "shape", "position")


def _attribute_words() -> Dict[str, Dict[str, str]]:
    from lavis_plugins import demo_data as d

    return {"color": {c: c for c in d.COLORS}, "size": {s: s for s in d.SIZES},
            "shape": {s: s for s in d.SHAPES},
            "position": {phrase: pos for pos, phrase in d.POSITION_PHRASES.items()}}


def one_shape_labels(captions: Sequence[str]) -> Optional[Dict[str, str]]:
    """The attributes of an image's single shape from its captions; None for two shapes."""
    text = " ".join(captions).lower()
    words = set(re.findall(r"[a-z]+", text))
    found = {}
    for attr, table in _attribute_words().items():
        hits = {value for key, value in table.items()
                if (key in text if " " in key else key in words)}
        if len(hits) != 1:
            return None
        found[attr] = hits.pop()
    return found


def make_zeroshot_folder(out: str | Path, split: str = "test",
                         attributes: Sequence[str] = ("color", "shape"),
                         data_root: Optional[Path] = None) -> Path:
    """Copy ``split``'s one-shape images into ``out/<split>/<attr1>_<attr2>/``; return that
    split folder. Classes are every combination seen in the split."""
    from lavis_plugins.demo_data import ensure_shapes_dataset

    bad = [a for a in attributes if a not in ATTRIBUTES]
    if bad or not attributes:
        raise UserError(f"attributes {list(attributes)}: choose from {list(ATTRIBUTES)}")
    root = Path(data_root) if data_root else ensure_shapes_dataset()
    records = json.loads((root / "annotations" / f"caption_{split}.json").read_text())
    captions: Dict[str, list] = {}
    for r in records:  # train: one record per caption; eval: a list of captions per image
        refs = r["caption"] if isinstance(r["caption"], list) else [r["caption"]]
        captions.setdefault(r["image"], []).extend(refs)
    dest = Path(out) / split
    if dest.exists():
        shutil.rmtree(dest)
    for image, refs in sorted(captions.items()):
        labels = one_shape_labels(refs)
        if labels is None:
            continue
        folder = dest / "_".join(labels[a] for a in attributes)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "images" / image, folder / Path(image).name)
    if not dest.is_dir():
        raise UserError(f"shapes split {split!r} has no one-shape image")
    return dest


def class_counts(split_dir: Path) -> Dict[str, int]:
    """Images per class folder."""
    return {d.name: sum(1 for f in d.iterdir() if f.is_file())
            for d in sorted(Path(split_dir).iterdir()) if d.is_dir()}


def majority_chance(split_dir: Path) -> float:
    """Top-1 accuracy (%) of the best constant guess: the largest class's share (>= 1/classes)."""
    counts = class_counts(split_dir)
    return 100.0 * max(counts.values()) / sum(counts.values())


def attribute_accuracies(results_jsonl: Path) -> Dict[str, float]:
    """Share (%) of images whose top-1 class gets each word of the true class right, by word
    position: for "red circle" classes, {"word 1": colour accuracy, "word 2": shape accuracy}."""
    recs = [json.loads(line) for line in Path(results_jsonl).read_text().splitlines() if line]
    n_words = len(recs[0]["label"].split())
    return {f"word {i + 1}": 100.0 * sum(r["label"].split()[i] == r["top5"][0].split()[i]
                                         for r in recs) / len(recs) for i in range(n_words)}
