"""``lp_webdataset_caption``: image-caption shards (webdataset/img2dataset layout) for pre-training.

The builder expands the shard pattern(s), reads the sample counts (index, img2dataset stats or
the shards themselves) and builds a :class:`ShardCaptionDataset` for the ``train`` split; the
runner partitions it over ranks and workers (:mod:`lavis_plugins.datasets.shard_plan`).
Registered under several names (``lp_laion_shards``, ``lp_cc3m_shards``, ...) so that one YAML
can mix several shard sets, each with its own ``sample_ratio``.
"""
from __future__ import annotations

import math

from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder, load_dataset_config
from omegaconf import OmegaConf

from lavis_plugins.common.errors import UserError
from lavis_plugins.datasets.builders.shapes_builders import ShapesBuilderBase
from lavis_plugins.datasets.shard_plan import expand_shard_spec, load_shard_set
from lavis_plugins.datasets.webdataset_caption import ShardCaptionDataset
from lavis_plugins.paths import config_path

# names the same builder is registered under (one per corpus of BLIP-2's pre-training mixture)
ALIASES = ("lp_laion_shards", "lp_cc3m_shards", "lp_cc12m_shards", "lp_sbu_shards",
           "lp_coco_shards", "lp_vg_shards")


class WebdatasetCaptionBuilder(BaseDatasetBuilder):
    """Builds ``{"train": ShardCaptionDataset}`` from ``build_info.shards``."""

    train_dataset_cls = ShardCaptionDataset
    DATASET_CONFIG_DICT = {"default": config_path("datasets/lp_webdataset/defaults_caption.yaml")}
    _build_proc_from_cfg = staticmethod(ShapesBuilderBase._build_proc_from_cfg)
    _name = ShapesBuilderBase._name

    @classmethod
    def default_section(cls):
        """The defaults of every name of this builder (lp_webdataset_caption's YAML section)."""
        return load_dataset_config(WebdatasetCaptionBuilder.DATASET_CONFIG_DICT["default"])

    def __init__(self, cfg=None) -> None:
        # LAVIS merges a default YAML under the name it is written for (and adds that name to
        # the run's datasets), so each alias has its own near-empty YAML and gets the defaults
        # of lp_webdataset_caption here, under whatever name the experiment YAML uses
        defaults = self.default_section()
        super().__init__(defaults if cfg is None else OmegaConf.merge(defaults, cfg))

    def _download_data(self) -> None:
        pass  # shards are local (or mounted); nothing is downloaded

    def build(self) -> dict:
        name = self._name()
        info = self.config.build_info
        where = f"datasets.{name}.build_info"
        if info.get("shards") is None:
            raise UserError(f"{where}.shards is not set: give the shard pattern, e.g. "
                            f"--options {where}.shards=/data/laion/{{00000..09999}}.tar")
        self.build_processors()
        if self.vis_processors.get("train") is None:
            raise UserError(f"datasets.{name}.vis_processor.train is not set")
        # this dataset's own bound on bad samples (null: run.max_bad_fraction, the one meaning
        # of which is in lavis_plugins/runners/train_stream.py); checked against the shards
        # lost at build time when the runner makes its loader
        max_bad = info.get("max_bad_fraction", None)
        if max_bad is not None:
            try:
                max_bad = float(max_bad)
            except (TypeError, ValueError):
                max_bad = -1.0
            if not (0.0 <= max_bad <= 1.0) or math.isnan(max_bad):
                raise UserError(f"{where}.max_bad_fraction must be a number in [0, 1] (or null: "
                                f"run.max_bad_fraction), got {info.get('max_bad_fraction')!r}")
        buffer = info.get("shuffle_buffer", 1000)
        if not isinstance(buffer, int) or buffer < 1:
            raise UserError(f"{where}.shuffle_buffer must be a positive integer, got {buffer!r}")
        reduced = info.get("reduced_decode")  # default: configs/datasets/lp_webdataset
        if not isinstance(reduced, bool):
            raise UserError(f"{where}.reduced_decode must be true or false, got {reduced!r}")
        shards = load_shard_set(expand_shard_spec(info.shards, f"{where}.shards"), where)
        dataset = ShardCaptionDataset(
            shards, self.vis_processors["train"], self.text_processors.get("train"),
            caption_key=str(info.get("caption_key", "caption")), shuffle_buffer=buffer,
            max_bad_fraction=max_bad, name=name, reduced_decode=reduced)
        return {"train": dataset}


registry.register_builder("lp_webdataset_caption")(WebdatasetCaptionBuilder)
for _alias in ALIASES:
    # one subclass per name: the registry maps a name to a class, and _name() finds it back
    registry.register_builder(_alias)(type(f"{_alias}_builder", (WebdatasetCaptionBuilder,), {
        "DATASET_CONFIG_DICT": {"default": config_path(f"datasets/lp_webdataset/{_alias}.yaml")}}))
