"""``lp_capfilt_input``: the images and web captions CapFilt reads (split ``input``)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder

from lavis_plugins.common.errors import UserError
from lavis_plugins.datasets.builders.shapes_builders import ShapesBuilderBase
from lavis_plugins.datasets.capfilt_input import CapFiltInputDataset, read_caption_images
from lavis_plugins.paths import config_path

NAME = "lp_capfilt_input"
SPLIT = "input"


@registry.register_builder(NAME)
class CapFiltInputBuilder(BaseDatasetBuilder):
    DATASET_CONFIG_DICT = {"default": config_path("datasets/lp_capfilt/defaults.yaml")}
    _build_proc_from_cfg = staticmethod(ShapesBuilderBase._build_proc_from_cfg)

    def _download_data(self) -> None:
        """Nothing to download: the annotation file and images are local."""

    def build(self) -> Dict[str, CapFiltInputDataset]:
        self.build_processors()
        info = self.config.build_info
        key = f"datasets.{NAME}.build_info"
        ann = info.get("annotations")
        if not ann or not isinstance(ann, str):
            raise UserError(f"{key}.annotations must name the caption annotation file "
                            f"(a JSON list of {{image, caption}}), got {ann!r}")
        root = (info.get("images") or {}).get("storage")
        if not root or not Path(str(root)).expanduser().is_dir():
            raise UserError(f"{key}.images.storage must be the folder the annotation's image "
                            f"paths are relative to, got {root!r}")
        if self.vis_processors.get("eval") is None:
            raise UserError(f"datasets.{NAME}.vis_processor.eval is not set")
        entries = read_caption_images(Path(ann).expanduser(), f"{key}.annotations")
        return {SPLIT: CapFiltInputDataset(entries, Path(str(root)).expanduser(),
                                           self.vis_processors["eval"],
                                           self.text_processors.get("eval"), str(ann))}
