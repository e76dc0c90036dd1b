"""``lp_image_text_pretrain``: LAVIS's image-text pre-training task plus the feature cache.

A dataset entry with ``feature_cache: <folder>`` (and ``feature_cache_views: K`` for K augmented
views per image) trains its train split from cached encoder outputs (see
:mod:`lavis_plugins.common.feature_cache`); the cache is checked against the images, processor
and views when the datasets are built and against the model's encoder when the model is built.
"""
from __future__ import annotations

from lavis.common.registry import registry
from lavis.tasks.image_text_pretrain import ImageTextPretrainTask

from lavis_plugins.common.errors import UserError
from lavis_plugins.common.feature_cache import (CachedFeatureDataset, cache_views,
                                                check_feature_cache)
from lavis_plugins.datasets.webdataset_caption import ShardCaptionDataset


@registry.register_task("lp_image_text_pretrain")
class PretrainTask(ImageTextPretrainTask):
    def __init__(self) -> None:
        super().__init__()
        self._caches: list[str] = []

    def build_datasets(self, cfg):
        datasets = super().build_datasets(cfg)
        for name, ds_cfg in cfg.datasets_cfg.items():
            cache = ds_cfg.get("feature_cache", None)
            views = cache_views(ds_cfg, name)
            if not cache:
                continue
            if "train" not in datasets[name]:
                raise UserError(f"dataset {name!r} has feature_cache but no train split")
            if isinstance(datasets[name]["train"], ShardCaptionDataset):
                raise UserError(f"dataset {name!r}: feature_cache serves map-style caption "
                                "datasets, not shards (at web scale the cached encoder outputs "
                                "would outgrow the images); remove feature_cache")
            datasets[name]["train"] = CachedFeatureDataset(datasets[name]["train"], cache,
                                                           encoder=None, image_size=0, views=views)
            self._caches.append(str(cache))
        return datasets

    def build_model(self, cfg):
        model = super().build_model(cfg)
        for cache in self._caches:
            encoder = getattr(model, "visual_encoder", None)
            if encoder is None:
                raise UserError(f"{cfg.model_cfg.arch} has no visual_encoder to check the "
                                f"feature cache {cache} against")
            check_feature_cache(cache, encoder, int(cfg.model_cfg.get("image_size", 224)))
        return model
