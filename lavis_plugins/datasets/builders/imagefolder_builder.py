"""``lp_imagefolder``: image classification splits from ImageFolder trees or annotation files.

``build_info.splits`` maps each split (train/val/test) to a folder (one sub-folder per class) or
a ``.json`` annotation file; nothing is downloaded (LAVIS's builder would try to).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder

from lavis_plugins.common.errors import UserError
from lavis_plugins.datasets.builders.shapes_builders import ShapesBuilderBase
from lavis_plugins.datasets.imagefolder import (
    ImageClassificationDataset,
    read_annotation_file,
    readable_names,
    scan_image_folder,
)
from lavis_plugins.paths import config_path
from lavis_plugins.tasks.zeroshot_templates import resolve_templates

NAME = "lp_imagefolder"


@registry.register_builder(NAME)
class ImageFolderBuilder(BaseDatasetBuilder):
    """Classification datasets; each split's samples carry ``image``, ``label`` and ``index``."""

    DATASET_CONFIG_DICT = {"default": config_path("datasets/lp_imagefolder/defaults.yaml")}
    # LAVIS's version crashes with "NoneType has no attribute from_config" on unknown names
    _build_proc_from_cfg = staticmethod(ShapesBuilderBase._build_proc_from_cfg)

    def _download_data(self) -> None:
        """Nothing to download: every split is a local folder or file."""

    def build(self) -> Dict[str, ImageClassificationDataset]:
        self.build_processors()
        info = self.config.build_info
        splits = info.get("splits") or {}
        key = f"datasets.{NAME}.build_info"
        if not splits:
            raise UserError(f"{key}.splits is empty: map each split to a folder with one "
                            "sub-folder per class, e.g. splits: {test: /data/imagenet/val}")
        image_root = (info.get("images") or {}).get("storage")
        folders, datasets = None, {}
        for split, source in splits.items():
            what = f"{key}.splits.{split}"
            if split not in ("train", "val", "test"):
                raise UserError(f"{what}: unknown split; use train, val or test")
            if not source:
                raise UserError(f"{what} is empty: give a class-folder tree or a .json file")
            path = Path(str(source)).expanduser()
            if path.suffix.lower() == ".json":
                classes, samples = read_annotation_file(path, image_root, what)
            else:
                classes, samples = scan_image_folder(path, what)
            if folders is not None and classes != folders:
                raise UserError(f"{what} has classes {sorted(set(classes) ^ set(folders))[:5]} "
                                "that another split lacks (or the reverse); splits must hold "
                                "the same classes")
            folders = classes
            is_train = split == "train"
            processor = self.vis_processors["train" if is_train else "eval"]
            if processor is None:
                raise UserError(f"datasets.{NAME}.vis_processor."
                                f"{'train' if is_train else 'eval'} is not set")
            templates = (resolve_templates(info.get("caption_templates"),
                                           f"{key}.caption_templates") if is_train else None)
            names = readable_names(classes, info.get("class_names"), f"{key}.class_names")
            datasets[split] = ImageClassificationDataset(processor, samples, names, classes,
                                                         caption_templates=templates)
        return datasets
