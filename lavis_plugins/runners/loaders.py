"""``lp_runner``'s data loaders (a mixin of ``PluginRunner``): every train split as a
:class:`~lavis_plugins.runners.train_stream.TrainStream` (map-style, shards or a mixture), the
other splits as plain loaders sharded across ranks without padding.
"""
from __future__ import annotations

from typing import Optional

import torch
from lavis.datasets.data_utils import concat_datasets, reorg_datasets_by_split
from torch.utils.data import DataLoader, IterableDataset

from lavis_plugins.common import dist as dist_utils
from lavis_plugins.common.errors import UserError
from lavis_plugins.runners import mixture
from lavis_plugins.runners.sampling import EpochSampler
from lavis_plugins.runners.train_stream import (MapTrainLoader, TrainStream, loader_workers,
                                                 train_stream_options)


class LoadersMixin:
    """Loaders per split, made on first use; reads the runner's ``config``, ``datasets``,
    ``train_splits``, ``task``, ``_model``, ``seed`` and ``device``."""

    @property
    def dataloaders(self) -> dict:
        if self._dataloaders is None:
            run = self.config.run_cfg
            by_split = reorg_datasets_by_split(self.datasets)
            # every train stream (alone or a mixture member) takes the same options
            stream_options = train_stream_options(run, pin_memory=self.device.type == "cuda",
                                                  pretokenize=self._pretokenize)
            # train splits with shard (webdataset) datasets or mixing ratios are streamed
            # (LAVIS's concat_datasets refuses generic iterable datasets)
            loaders = mixture.build_train_streams(
                self.datasets, getattr(self.config, "datasets_cfg", None) or {}, by_split,
                self.train_splits, seed=self.seed, run_cfg=run, options=stream_options)
            by_split = concat_datasets(by_split)
            self.datasets = {**by_split,
                             **{k: getattr(v, "dataset", v) for k, v in loaders.items()}}
            for split, dataset in by_split.items():
                is_train = split in self.train_splits
                if isinstance(dataset, (tuple, list)) or isinstance(dataset, IterableDataset):
                    raise UserError(
                        f"split {split!r} holds an iterable dataset that lp_runner cannot "
                        "partition exactly; use a map-style dataset or lp_webdataset_caption "
                        "shards (train split only)")
                bs = run.get("batch_size_train") if is_train else (
                    run.get("batch_size_eval") or run.get("batch_size_train"))
                if not bs:
                    raise UserError(f"split {split!r} needs run.batch_size_"
                                    f"{'train' if is_train else 'eval'}")
                bs = int(bs)
                if is_train:  # the same stream as a map-style member of a mixture
                    loaders[split] = MapTrainLoader(dataset, seed=self.seed, batch_size=bs,
                                                    name=split, **stream_options)
                    continue
                sampler = EpochSampler(len(dataset), shuffle=False, seed=self.seed,
                                       rank=dist_utils.get_rank(),
                                       world_size=dist_utils.get_world_size(),
                                       equal_shards=False)
                loaders[split] = DataLoader(
                    dataset, batch_size=bs, sampler=sampler,
                    collate_fn=getattr(dataset, "collater", None), drop_last=False,
                    pin_memory=self.device.type == "cuda",
                    # its own generator: creating an iterator must not draw from the global RNG
                    # (it would shift dropout randomness between a run and its resume)
                    generator=torch.Generator().manual_seed(self.seed),
                    worker_init_fn=None, **loader_workers(run))
            self._dataloaders = loaders
        return self._dataloaders

    def train_stream(self) -> Optional[TrainStream]:
        """The train split's loader (map-style, shards or a mixture), or None without one."""
        split = self.train_splits[0] if self.train_splits else None
        loader = self.dataloaders.get(split) if split else None
        return loader if isinstance(loader, TrainStream) else None

    @property
    def iters_per_epoch(self) -> int:
        """Batches per epoch of one rank (full epoch, capped by ``run.iters_per_epoch``)."""
        split = self.train_splits[0] if self.train_splits else None
        if split is None or split not in self.dataloaders:
            raise UserError(f"no training split: run.train_splits is {list(self.train_splits)}, "
                            f"datasets provide {sorted(self.dataloaders)}")
        n = len(self.dataloaders[split])  # a TrainStream: arithmetic, nothing drawn or read
        if n == 0:
            raise UserError(f"the {split!r} split has fewer samples per process than "
                            f"run.batch_size_train; lower the batch size or add data")
        cap = self.config.run_cfg.get("iters_per_epoch", None)
        return min(n, int(cap)) if cap else n

    @property
    def _pretokenize(self):
        """The model's ``pretokenize`` when training batches go to its ``forward`` as they come
        from the loader (the task's train step is LAVIS's default), else None: a task that
        rewrites the text before calling the model gets the text, not stale ids."""
        from lavis.tasks.base_task import BaseTask

        fn = getattr(self._model, "pretokenize", None)
        if callable(fn) and type(self.task).train_step is BaseTask.train_step:
            return fn
        return None
