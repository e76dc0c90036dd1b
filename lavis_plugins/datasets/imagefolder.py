"""Image classification data: an ImageFolder tree (class = sub-folder) or a LAVIS-style
annotation file (a JSON list of ``{"image": path, "label": class}``).

Used by zero-shot classification (``lp_zeroshot_classification``) and, with
``caption_templates``, to fine-tune the stage-1 model on class-name captions (a "train" split
yields ``text_input`` = a random template filled with the sample's class name).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from lavis_plugins.common.errors import UserError
from lavis_plugins.datasets.validation import load_checked_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")

Sample = Tuple[str, int]  # (image path, class index)


def scan_image_folder(root: str | Path, what: str) -> Tuple[List[str], List[Sample]]:
    """Class folders (sorted) and ``(path, class index)`` of every image below them.

    ``what`` names the config key in errors. A missing root, a root without class folders or a
    class folder without images is a ``UserError``.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{what}: {str(root)!r} is not a folder (give a folder with one "
                        "sub-folder of images per class, or a .json annotation file)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise UserError(f"{what}: {root} has no class sub-folders; an ImageFolder holds one "
                        "sub-folder of images per class (root/<class>/<image>.jpg)")
    samples: List[Sample] = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            found += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            raise UserError(f"{what}: class folder {root / name} holds no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add images")
        samples += [(p, label) for p in found]
    return classes, samples


def read_annotation_file(path: str | Path, image_root: Optional[str | Path],
                         what: str) -> Tuple[List[str], List[Sample]]:
    """Classes (sorted label strings) and samples of a JSON list of ``{"image", "label"}``;
    relative image paths are joined to ``image_root`` (default: the file's folder)."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: cannot read annotation file {path}: {e}") from e
    if not isinstance(records, list) or not records:
        raise UserError(f"{what}: {path} must be a non-empty JSON list of "
                        '{"image": path, "label": class name}')
    root = Path(image_root) if image_root else path.parent
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "image" not in r or "label" not in r:
            raise UserError(f"{what}: record {i} of {path} needs 'image' and 'label' keys: {r!r}")
    classes = sorted({str(r["label"]) for r in records})
    index = {c: i for i, c in enumerate(classes)}
    return classes, [(str(root / r["image"]), index[str(r["label"])]) for r in records]


def readable_names(folders: Sequence[str], class_names: Any, what: str) -> List[str]:
    """The name each class folder is prompted with.

    ``class_names``: None (folder name, ``_`` read as a space), a mapping folder -> name, a list
    in folder order, or the path of a JSON file holding either.
    """
    if class_names is None:
        return [f.replace("_", " ") for f in folders]
    if isinstance(class_names, (str, Path)):
        try:
            class_names = json.loads(Path(class_names).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{what}: cannot read class-name file {class_names}: {e}") from e
    if isinstance(class_names, Mapping):
        missing = [f for f in folders if f not in class_names]
        if missing:
            raise UserError(f"{what}: no name for class(es) {missing[:5]} "
                            f"({len(missing)} of {len(folders)}); map every class folder")
        return [str(class_names[f]) for f in folders]
    if isinstance(class_names, Sequence) and len(class_names) == len(folders):
        return [str(n) for n in class_names]
    raise UserError(f"{what} must map each class folder to a name (a mapping, a list of "
                    f"{len(folders)} names in sorted folder order, or a JSON file of either)")


class ImageClassificationDataset(Dataset):
    """``{"image": processed image, "label": class index, "index": sample index}`` per sample,
    plus ``"text_input"`` (a random ``caption_templates`` entry filled with the class name) when
    caption templates are given."""

    def __init__(self, vis_processor, samples: Sequence[Sample], classnames: Sequence[str],
                 folders: Sequence[str], caption_templates: Optional[Sequence[str]] = None):
        self.vis_processor = vis_processor
        self.samples = list(samples)
        self.classnames = list(classnames)  # prompted names, by class index
        self.folders = list(folders)  # class folders / labels, by class index
        self.caption_templates = list(caption_templates) if caption_templates else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        path, label = self.samples[index]
        image = load_checked_image(path)  # missing, empty, truncated: BadSample (on_bad_sample)
        out = {"image": self.vis_processor(image), "label": label, "index": index}
        if self.caption_templates:
            # Python's RNG: the runner seeds it per sample, so captions repeat on resume
            out["text_input"] = random.choice(self.caption_templates).format(self.classnames[label])
        return out

    def collater(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        return torch.utils.data.default_collate(samples)
