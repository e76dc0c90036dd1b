"""What ``lp_runner`` trains on: a train split's batches for one process, epoch by epoch,
resumable at any batch (:class:`TrainStream`), and the one bad-data budget every stream applies.

Streams: :class:`MapTrainLoader` (a map-style dataset: JSON annotations + files; the runner's
train path for such a split, and a mixture member), ``shard_loader.ShardTrainLoader`` (webdataset
shards) and ``mixture.MixtureLoader`` (several of them by ratio).

``max_bad_fraction`` (:class:`BadSampleBudget`) means the same for every training dataset, alone
or mixed, map-style or shards: the largest fraction of the samples the dataset gives one process
in one epoch of its own that may be left out as unreadable. The counts restart when the dataset
starts an epoch (also after a resume) and are checked as batches arrive, so a broken corpus stops
the run early with one message rather than at the epoch's end. The setting is
``run.max_bad_fraction`` (default :data:`DEFAULT_MAX_BAD_FRACTION`); a shard dataset's
``build_info.max_bad_fraction`` overrides it for that dataset. Which samples may be left out:
shard datasets always skip bad samples (web data is never clean); map-style datasets skip them
under ``run.on_bad_sample: skip`` and otherwise stop at the first.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from lavis_plugins.common import dist as dist_utils
from lavis_plugins.common.errors import UserError
from lavis_plugins.datasets.validation import BAD_SAMPLE_KEY
from lavis_plugins.models.text_tokens import CollateTokens
from lavis_plugins.runners.sampling import EpochSampler, SeededSamples

logger = logging.getLogger(__name__)

DEFAULT_MAX_BAD_FRACTION = 0.01  # run.max_bad_fraction when unset


def loader_workers(run_cfg) -> Dict[str, Any]:
    """DataLoader worker settings from ``run:``: ``num_workers``, ``persistent_workers`` (keep
    the workers across epochs instead of forking new ones; default true when there are
    workers) and ``prefetch_factor`` (batches each worker loads ahead; torch's default 2).
    The one place where persistence and prefetch are tied to having workers: every loader of
    the run (train streams, mixture members, evaluation) takes these keyword arguments as is."""
    workers = int(run_cfg.get("num_workers", 0))
    persistent = run_cfg.get("persistent_workers", None)
    prefetch = run_cfg.get("prefetch_factor", None)
    if workers == 0:
        for key, value in (("persistent_workers", persistent), ("prefetch_factor", prefetch)):
            if value:
                raise UserError(f"run.{key} is {value!r} but run.num_workers is 0 (batches are "
                                f"loaded in the training process): set run.num_workers > 0 or "
                                f"remove run.{key}")
        return {"num_workers": 0}
    return {"num_workers": workers,
            "persistent_workers": True if persistent is None else bool(persistent),
            **({"prefetch_factor": int(prefetch)} if prefetch is not None else {})}


def train_stream_options(run_cfg, *, pin_memory: bool = False,
                         pretokenize: Optional[Callable] = None) -> Dict[str, Any]:
    """The run's options for a train stream, as :class:`MapTrainLoader` and
    ``ShardTrainLoader`` (which ignores ``skip_bad``) take them; read here once for a lone
    train split and for every member of a mixture, so a dataset is read the same either way:
    bad data (``run.on_bad_sample``, ``run.max_bad_fraction``), loader workers
    (:func:`loader_workers`), pinned memory and the model's ``pretokenize`` (applied in the
    loader's collate, see :class:`~lavis_plugins.models.text_tokens.CollateTokens`)."""
    return {"skip_bad": run_cfg.get("on_bad_sample", "fail") == "skip",
            "max_bad_fraction": float(run_cfg.get("max_bad_fraction", DEFAULT_MAX_BAD_FRACTION)),
            "workers": loader_workers(run_cfg), "pin_memory": bool(pin_memory),
            "pretokenize": pretokenize}


class TrainStream:
    """A train split's batches for one rank, epoch by epoch, resumable at any batch."""

    batch_size: int

    def __len__(self) -> int:  # batches per epoch of this rank (equal on every rank)
        raise NotImplementedError

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[Dict[str, Any]]:
        raise NotImplementedError

    def epoch_summary(self) -> Dict[str, str]:
        return {}

    def state_dict(self) -> Dict[str, Any]:
        raise NotImplementedError

    def check_resume(self, state: Optional[Dict[str, Any]], path: str) -> None:
        """Warn when a resume changes what the data order depends on."""
        if not state:
            return
        mine = self.state_dict()
        changed = [k for k in mine if state.get(k) != mine[k]]
        if changed:
            logger.warning("resuming %s with a different %s (%s -> %s): the data order after "
                           "the resume differs from the original run's", path,
                           ", ".join(changed), [state.get(k) for k in changed],
                           [mine[k] for k in changed])


class BadSampleBudget:
    """Bad samples of one training dataset on this process, per epoch of that dataset (see the
    module doc): more than ``fraction`` of ``epoch_samples`` stops the run with a ``UserError``."""

    def __init__(self, what: str, fraction: float, epoch_samples: int, setting: str) -> None:
        self.what = what  # "dataset 'laion'": names the data in the message
        self.fraction = float(fraction)
        self.epoch_samples = int(epoch_samples)  # samples this process reads per epoch
        self.setting = setting  # the key to raise, named in the message
        self.epoch = self.seen = self.bad = 0
        self.total_seen = self.total_bad = 0  # since the stream was made (a mixed epoch's view)

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.seen, self.bad = int(epoch), 0, 0

    def add(self, seen: int, bad: int, last_problem: str = "") -> None:
        """Count one batch's samples (``seen``, bad ones included) and its ``bad`` ones."""
        self.seen += int(seen)
        self.bad += int(bad)
        self.total_seen += int(seen)
        self.total_bad += int(bad)
        if self.bad > self.fraction * self.epoch_samples:
            last = f" (last: {last_problem})" if last_problem else " (see the warnings above)"
            raise UserError(
                f"{self.what}: {self.bad} training samples could not be read in epoch "
                f"{self.epoch} on rank {dist_utils.get_rank()}, more than max_bad_fraction="
                f"{self.fraction:g} of the {self.epoch_samples} it reads per epoch{last}; fix "
                f"or drop the bad data, or raise {self.setting}")

    def summary(self) -> Dict[str, str]:
        """This epoch's counts so far, for the log."""
        return {"data_samples": str(self.seen), "data_bad": str(self.bad)}


class MapTrainLoader(TrainStream):
    """A map-style dataset's batches for one rank: per-sample seeded augmentation
    (:class:`SeededSamples`), a per-epoch permutation cut into equal per-rank shards
    (:class:`EpochSampler`), bad samples skipped under ``skip_bad`` and counted against
    ``max_bad_fraction``."""

    def __init__(self, dataset: Dataset, *, seed: int, batch_size: int,
                 workers: Optional[Mapping[str, Any]] = None, pin_memory: bool = False,
                 skip_bad: bool = False, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
                 name: str = "train", pretokenize: Optional[Callable] = None) -> None:
        """``workers``: DataLoader worker settings as :func:`loader_workers` gives them (None:
        loaded in this process); ``pretokenize``: the model's, applied in the loader's collate
        (:class:`CollateTokens`)."""
        workers = dict(workers or {"num_workers": 0})
        self.dataset = dataset  # what the runner's ``datasets`` shows for the split
        self.seeded = SeededSamples(dataset, seed, skip_bad=skip_bad)
        # indices carry their epoch: persistent workers hold their own copy of the dataset,
        # which never sees the main process's epoch change
        self.sampler = EpochSampler(len(dataset), shuffle=True, seed=seed,
                                    rank=dist_utils.get_rank(),
                                    world_size=dist_utils.get_world_size(), equal_shards=True,
                                    with_epoch=True)
        self.batch_size = int(batch_size)
        self.num_workers = int(workers.get("num_workers", 0))
        collate = self.seeded.collater
        if pretokenize is not None:
            collate = CollateTokens(collate, pretokenize)
        self.loader = DataLoader(self.seeded, batch_size=self.batch_size, sampler=self.sampler,
                                 drop_last=True, pin_memory=pin_memory, collate_fn=collate,
                                 # its own generator: making an iterator must not draw from the
                                 # global RNG (that would shift dropout between a run and its
                                 # resume)
                                 generator=torch.Generator().manual_seed(seed), **workers)
        self.budget = BadSampleBudget(f"dataset {name!r}", max_bad_fraction,
                                      len(self) * self.batch_size, "run.max_bad_fraction")

    def __len__(self) -> int:
        """Batches per epoch of this rank (``drop_last``: the same on every rank)."""
        return self.sampler.num_indices() // self.batch_size

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[Dict[str, Any]]:
        """The rank's batches of ``epoch`` from batch ``start`` on; a batch whose samples were
        all left out comes as ``{}``, so batch positions (and resume) stay those of the epoch."""
        # the sampler's indices carry the epoch to SeededSamples (in workers too, persistent or
        # not), so the dataset itself holds no epoch to set
        self.sampler.set_epoch(epoch, start * self.batch_size)
        self.budget.start_epoch(epoch)
        for batch in self.loader:
            bad = batch.pop(BAD_SAMPLE_KEY, 0) if isinstance(batch, dict) else 0
            self.budget.add(self.batch_size, bad)
            yield batch

    def epoch_summary(self) -> Dict[str, str]:
        return self.budget.summary()

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": "map", "samples": len(self.seeded), "batch_size": self.batch_size,
                "world_size": dist_utils.get_world_size()}
