"""The runner's side of shard (webdataset) training data: epochs, resume, bad-data accounting.

``lp_runner`` hands a train split that holds a :class:`ShardCaptionDataset` to
:class:`ShardTrainLoader`, which

- configures the dataset's partition for this process (rank, world size, batch size, workers),
  so every rank runs ``len(loader)`` steps per epoch;
- starts each epoch at a given batch (resume in the middle of an epoch): the dataset's workers
  skip what was consumed without decoding it, so the batches after a resume are the
  uninterrupted run's;
- counts the bad samples each batch reports, logs the first messages (naming shard and key),
  and stops the run with a ``UserError`` when an epoch's bad samples pass ``max_bad_fraction``
  (the shared meaning: :class:`~lavis_plugins.runners.train_stream.BadSampleBudget`), when the
  shards lost at build time (missing, truncated) already do, or when a whole batch is bad;
- tokenises each batch's captions in the loader's collate, in its workers, when the model has
  ``pretokenize`` (as for map-style data, :mod:`~lavis_plugins.models.text_tokens`);
- describes the data position's context for the checkpoint (world size, workers, batch size,
  shard-set fingerprint) and warns when a resume changes it (the order would differ).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

import torch
from torch.utils.data import DataLoader, default_convert

from lavis_plugins.common import dist as dist_utils
from lavis_plugins.common.errors import UserError
from lavis_plugins.datasets.webdataset_caption import STATS_KEY, ShardCaptionDataset
from lavis_plugins.models.text_tokens import CollateTokens
from lavis_plugins.runners.train_stream import (
    DEFAULT_MAX_BAD_FRACTION,
    BadSampleBudget,
    TrainStream,
)

logger = logging.getLogger(__name__)

MAX_LOGGED_PER_EPOCH = 20  # bad-sample warnings per epoch and rank (all are counted)


class ShardTrainLoader(TrainStream):
    """Batches of a shard dataset for one rank, epoch by epoch."""

    def __init__(self, dataset: ShardCaptionDataset, *, seed: int, batch_size: int,
                 workers: Optional[Mapping[str, Any]] = None, pin_memory: bool = False,
                 max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
                 pretokenize: Optional[Callable] = None) -> None:
        """``workers``: DataLoader worker settings as ``train_stream.loader_workers`` gives
        them (None: read in this process); ``persistent_workers`` does not apply: the epoch and
        its first batch are set in the dataset before its workers fork, so they start with each
        epoch. ``max_bad_fraction``: the run's; the dataset's own (``build_info``) wins if set.
        ``pretokenize``: the model's, applied to each batch in the loader's workers."""
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.workers = {k: v for k, v in (workers or {"num_workers": 0}).items()
                        if k != "persistent_workers"}
        self.num_workers = int(self.workers.get("num_workers", 0))
        self.pin_memory = pin_memory
        self.seed = int(seed)
        # batch_size=None: the dataset yields whole batches, which the loader only converts
        self.collate = None if pretokenize is None else CollateTokens(default_convert, pretokenize)
        dataset.configure(seed=seed, rank=dist_utils.get_rank(),
                          world_size=dist_utils.get_world_size(), batch_size=batch_size,
                          num_workers=self.num_workers)
        if len(self) == 0:
            raise UserError(
                f"dataset {dataset.name!r}: {dataset.shards.total} samples cannot fill one batch "
                f"of {batch_size} on each of {dist_utils.get_world_size()} process(es); lower "
                "run.batch_size_train or add shards")
        own = dataset.max_bad_fraction
        self.budget = BadSampleBudget(
            f"dataset {dataset.name!r}", max_bad_fraction if own is None else own,
            len(self) * self.batch_size,
            f"datasets.{dataset.name}.build_info.max_bad_fraction or run.max_bad_fraction")
        shards = dataset.shards
        lost = shards.bad / max(shards.total + shards.bad, 1)  # of every epoch's samples
        if lost > self.budget.fraction:
            raise UserError(
                f"dataset {dataset.name!r}: {shards.bad} of {shards.total + shards.bad} samples "
                f"are lost in missing or truncated shards, more than max_bad_fraction="
                f"{self.budget.fraction:g} ({shards.problems[0]}); fix the shards or raise "
                f"{self.budget.setting}")

    def __len__(self) -> int:
        """Batches per epoch of this rank (every rank has the same number)."""
        return self.dataset.batches_per_epoch()

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[Dict[str, Any]]:
        """The rank's batches of ``epoch`` from batch ``start`` on."""
        self.dataset.set_epoch(epoch, start)
        self.budget.start_epoch(epoch)
        logged = 0
        for i, batch in enumerate(self.epoch_loader(), start):
            stats = batch.pop(STATS_KEY)
            for msg in stats["messages"]:
                if logged < MAX_LOGGED_PER_EPOCH:
                    logger.warning("%s: skipped a bad sample: %s", self.dataset.name, msg)
                    logged += 1
            self.budget.add(stats["seen"], stats["bad"], (stats["messages"] or [""])[-1])
            if "image" not in batch:
                raise UserError(
                    f"dataset {self.dataset.name!r}: every sample of batch {i} of epoch {epoch} "
                    f"is bad ({stats['messages'][0]}); the shards are badly damaged there")
            yield batch

    def epoch_loader(self) -> DataLoader:
        """The torch loader of the epoch set in the dataset (its workers fork with it)."""
        return DataLoader(self.dataset, batch_size=None, collate_fn=self.collate,
                          pin_memory=self.pin_memory,
                          # its own generator: making an iterator must not draw from the global
                          # RNG (that would shift dropout between a run and its resume)
                          generator=torch.Generator().manual_seed(self.seed), **self.workers)

    def epoch_summary(self) -> Dict[str, str]:
        """Counts of the epoch so far, for the log (this rank)."""
        return {**self.budget.summary(),
                "data_bad_shards_at_build": str(self.dataset.shards.bad)}

    def state_dict(self) -> Dict[str, Any]:
        """What the data order of a checkpoint depends on, besides (epoch, batch)."""
        return {"kind": "shards", "world_size": dist_utils.get_world_size(),
                "num_workers": self.num_workers, "batch_size": self.batch_size,
                "shard_set": self.dataset.shards.fingerprint()}
