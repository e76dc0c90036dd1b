"""``lp_capfilt_input``: the images and web captions CapFilt reads (split ``input``), from a
caption JSON file and image folder, or from webdataset shards."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Union

from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder

from lavis_plugins.capfilt.shard_input import CapFiltShardInput, open_shard_input
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

    def build(self) -> Dict[str, Union[CapFiltInputDataset, CapFiltShardInput]]:
        self.build_processors()
        info = self.config.build_info
        key = f"datasets.{NAME}.build_info"
        if self.vis_processors.get("eval") is None:
            raise UserError(f"datasets.{NAME}.vis_processor.eval is not set")
        ann, shards = info.get("annotations"), info.get("shards")
        if (ann is None) == (shards is None):
            raise UserError(f"{key}: give either annotations (a caption JSON file, with "
                            "images.storage) or shards (a shard folder, brace pattern or list), "
                            f"not {'both' if ann is not None else 'neither'}")
        if shards is not None:
            from omegaconf import OmegaConf

            spec = OmegaConf.to_container(shards) if OmegaConf.is_config(shards) else shards
            shard_set = open_shard_input(spec, f"{key}.shards")
            return {SPLIT: CapFiltShardInput(shard_set, self.vis_processors["eval"],
                                             self.text_processors.get("eval"), str(spec),
                                             caption_key=str(info.get("caption_key", "caption")))}
        if not isinstance(ann, str) or not ann:
            raise UserError(f"{key}.annotations must name the caption annotation file "
                            f"(a JSON list of {{image, caption}}), got {ann!r}")
        root = (info.get("images") or {}).get("storage")
        if not root or not Path(str(root)).expanduser().is_dir():
            raise UserError(f"{key}.images.storage must be the folder the annotation's image "
                            f"paths are relative to, got {root!r}")
        entries = read_caption_images(Path(ann).expanduser(), f"{key}.annotations")
        return {SPLIT: CapFiltInputDataset(entries, Path(str(root)).expanduser(),
                                           self.vis_processors["eval"],
                                           self.text_processors.get("eval"), str(ann))}
