"""Registered builders for the built-in shapes dataset: nothing is downloaded.

``build_info.root`` in the YAML picks the dataset folder: ``default`` is the cache
(:func:`lavis_plugins.demo_data.default_root`), generated on first use and regenerated when
partial or damaged; any other value is a user folder (absolute, or relative to the working
directory), which must hold a complete dataset, else a ``UserError`` says what is wrong and how
to fix it. Annotation and image/video storage paths are relative to that folder and may not
leave it.

LAVIS's ``BaseDatasetBuilder`` downloads annotation URLs into its cache root and resolves
relative paths against it; these builders replace ``_download_data`` (run once, on the main
process, before LAVIS's barrier) and ``build`` to do neither.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder

from lavis_plugins.common.errors import UserError, unknown_name
from lavis_plugins.datasets.shapes_datasets import (
    ShapesCaptionDataset,
    ShapesCaptionEvalDataset,
    ShapesRetrievalDataset,
    ShapesRetrievalEvalDataset,
    ShapesVideoQADataset,
    ShapesVQADataset,
    resolve_inside,
)
from lavis_plugins.paths import config_path

DEFAULT_ROOT = "default"


class ShapesBuilderBase(BaseDatasetBuilder):
    """Builds train/val/test datasets of the shapes dataset from the YAML's ``build_info``."""

    _checked_root: Optional[Path] = None  # set once dataset_root() has verified the folder

    def dataset_root(self) -> Path:
        """The dataset folder, generated first when it is the default cache and is not complete.

        Verified once per builder (checksums of every file: ~0.2 s at the default size).
        """
        if self._checked_root is None:
            self._checked_root = self._find_root()
        return self._checked_root

    def _find_root(self) -> Path:
        from lavis_plugins import demo_data

        root = self.config.build_info.get("root", DEFAULT_ROOT)
        if root in (None, DEFAULT_ROOT):
            return demo_data.ensure_shapes_dataset()
        root = Path(str(root)).expanduser().absolute()
        problems = demo_data.verify_shapes_dataset(root)
        if problems:
            raise UserError(
                f"datasets.{self._name()}.build_info.root = {str(root)!r} is not a complete shapes "
                f"dataset: {'; '.join(problems)}. Fix: generate it with `python -m "
                f"lavis_plugins.demo_data --root {root} --force`, or set build_info.root to "
                f"'{DEFAULT_ROOT}' to use the cache ({demo_data.default_root()})."
            )
        return root

    def _name(self) -> str:
        for name, cls in registry.mapping["builder_name_mapping"].items():
            if cls is type(self):
                return name
        return type(self).__name__

    def _download_data(self) -> None:
        # LAVIS calls this on the main process only, then waits at a barrier: generate here
        self.dataset_root()

    @staticmethod
    def _build_proc_from_cfg(cfg):
        # LAVIS's version crashes with "NoneType has no attribute from_config" on unknown names
        if cfg is None:
            return None
        cls = registry.get_processor_class(cfg.name)
        if cls is None:
            raise unknown_name("processor", cfg.name,
                               registry.mapping["processor_name_mapping"],
                               hint="A plugin processor registers when lavis_plugins is imported.")
        return cls.from_config(cfg)

    def build(self) -> dict:
        """``{"train"|"val"|"test": dataset}`` for the splits listed under
        build_info.annotations."""
        self.build_processors()
        root = self.dataset_root()  # every rank checks (multi-node runs may not share a disk)
        build_info = self.config.build_info
        name = self._name()
        vis_info = build_info.get(self.data_type)
        if vis_info is None or vis_info.get("storage") is None:
            raise UserError(f"datasets.{name}.build_info.{self.data_type}.storage is not set")
        vis_root = resolve_inside(root, vis_info.storage,
                                  f"datasets.{name}.build_info.{self.data_type}.storage")
        datasets = {}
        for split, info in build_info.annotations.items():
            if split not in ("train", "val", "test"):
                raise UserError(f"datasets.{name}.build_info.annotations.{split}: unknown split; "
                                f"use train, val or test")
            storage = info.storage
            storage = [storage] if isinstance(storage, str) else list(storage)
            ann_paths = [
                str(resolve_inside(root, p, f"datasets.{name}.build_info.annotations.{split}"))
                for p in storage
            ]
            is_train = split == "train"
            vis_processor = self.vis_processors["train" if is_train else "eval"]
            text_processor = self.text_processors["train" if is_train else "eval"]
            if vis_processor is None:
                raise UserError(f"datasets.{name}.vis_processor.{'train' if is_train else 'eval'} "
                                f"is not set but split {split!r} needs it")
            dataset_cls = self.train_dataset_cls if is_train else self.eval_dataset_cls
            datasets[split] = dataset_cls(
                vis_processor=vis_processor,
                text_processor=text_processor,
                vis_root=str(vis_root),
                ann_paths=ann_paths,
            )
        return datasets


@registry.register_builder("lp_shapes_caption")
class ShapesCaptionBuilder(ShapesBuilderBase):
    """Image captioning on the shapes dataset (COCO caption format)."""

    train_dataset_cls = ShapesCaptionDataset
    eval_dataset_cls = ShapesCaptionEvalDataset
    DATASET_CONFIG_DICT = {"default": config_path("datasets/lp_shapes/defaults_caption.yaml")}


@registry.register_builder("lp_shapes_retrieval")
class ShapesRetrievalBuilder(ShapesBuilderBase):
    """Image-text retrieval on the shapes dataset (same files as captioning)."""

    train_dataset_cls = ShapesRetrievalDataset
    eval_dataset_cls = ShapesRetrievalEvalDataset
    DATASET_CONFIG_DICT = {"default": config_path("datasets/lp_shapes/defaults_retrieval.yaml")}


@registry.register_builder("lp_shapes_vqa")
class ShapesVQABuilder(ShapesBuilderBase):
    """Image VQA on the shapes dataset (LAVIS VQA format plus VQAv2 files for scoring)."""

    train_dataset_cls = ShapesVQADataset
    eval_dataset_cls = ShapesVQADataset
    DATASET_CONFIG_DICT = {"default": config_path("datasets/lp_shapes/defaults_vqa.yaml")}


@registry.register_builder("lp_shapes_video_qa")
class ShapesVideoQABuilder(ShapesBuilderBase):
    """Zero-shot video QA on the shapes videos (MSRVTT-QA format; val and test only)."""

    train_dataset_cls = ShapesVideoQADataset
    eval_dataset_cls = ShapesVideoQADataset
    DATASET_CONFIG_DICT = {"default": config_path("datasets/lp_shapes/defaults_video_qa.yaml")}

