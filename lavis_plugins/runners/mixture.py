"""Train splits that ``lp_runner`` streams: one shard dataset, or several datasets mixed by ratio.

Mixing (LAVIS's ``sample_ratio`` meaning, as its ``MultiIterLoader``): each step takes a whole
batch from one dataset, chosen with probability ``ratio / sum(ratios)``. The ratios come from
each dataset's ``sample_ratio`` (``datasets.<name>.sample_ratio``; 1 when unset) or LAVIS 1.0.2's
``run.train_dataset_ratios: {name: ratio}``. Map-style (JSON) and shard datasets mix freely.

Determinism and resume: the choices of epoch e are drawn from ``(seed, e)`` alone, and every
dataset keeps its own epochs (a dataset used up in the middle of a mixed epoch starts its next
epoch; its position is the number of its batches taken so far, recomputed from the choices). So
a run resumed at (epoch, batch) takes the same batches as the uninterrupted run, and every rank
makes the same choices. A mixed epoch has ``run.iters_per_epoch`` steps, else the sum of the
datasets' batches per epoch.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lavis_plugins.common import dist as dist_utils
from lavis_plugins.common.errors import UserError
from lavis_plugins.common.seeding import sample_seed
from lavis_plugins.datasets.webdataset_caption import ShardCaptionDataset
from lavis_plugins.runners.sampling import EpochSampler, SeededSamples
from lavis_plugins.runners.shard_loader import ShardTrainLoader, TrainStream


class MapTrainLoader(TrainStream):
    """A map-style dataset as a mixture member: the runner's per-sample seeding and equal
    per-rank shards, one epoch of its own at a time."""

    def __init__(self, dataset: Dataset, *, seed: int, batch_size: int, num_workers: int,
                 pin_memory: bool = False) -> None:
        self.seeded = SeededSamples(dataset, seed)
        self.sampler = EpochSampler(len(dataset), shuffle=True, seed=seed,
                                    rank=dist_utils.get_rank(),
                                    world_size=dist_utils.get_world_size(), equal_shards=True)
        self.batch_size = int(batch_size)
        self.loader = DataLoader(self.seeded, batch_size=self.batch_size, sampler=self.sampler,
                                 num_workers=num_workers, drop_last=True, pin_memory=pin_memory,
                                 collate_fn=self.seeded.collater,
                                 generator=torch.Generator().manual_seed(seed))
        self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.sampler._indices()) // self.batch_size

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[Dict[str, Any]]:
        self.sampler.set_epoch(epoch, start * self.batch_size)
        self.seeded.epoch = epoch
        return iter(self.loader)

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": "map", "samples": len(self.seeded), "batch_size": self.batch_size,
                "world_size": dist_utils.get_world_size()}


def mixture_choices(probs: Sequence[float], seed: int, epoch: int, steps: int) -> np.ndarray:
    """The dataset index of each step of ``epoch``, drawn from (seed, epoch) only."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), 0x313]))
    return rng.choice(len(probs), size=steps, p=np.asarray(probs, dtype=np.float64))


class MixtureLoader(TrainStream):
    """Several datasets, one per step, chosen by ratio (see the module doc)."""

    def __init__(self, names: Sequence[str], members: Sequence[TrainStream],
                 ratios: Sequence[float], seed: int, steps_per_epoch: Optional[int]) -> None:
        self.names, self.members = list(names), list(members)
        total = float(sum(ratios))
        self.ratios = [float(r) for r in ratios]
        self.probs = [r / total for r in self.ratios]
        self.seed = int(seed)
        self.steps = int(steps_per_epoch or sum(len(m) for m in members))
        self.batch_size = members[0].batch_size
        self.taken = [0] * len(members)  # batches taken from each member in the current epoch

    def __len__(self) -> int:
        return self.steps

    def _positions(self, epoch: int, start: int) -> List[int]:
        """Batches taken from each member before (epoch, start) since the run began."""
        counts = np.zeros(len(self.members), dtype=np.int64)
        for e in range(epoch):
            counts += np.bincount(mixture_choices(self.probs, self.seed, e, self.steps),
                                  minlength=len(self.members))
        counts += np.bincount(mixture_choices(self.probs, self.seed, epoch, self.steps)[:start],
                              minlength=len(self.members))
        return [int(c) for c in counts]

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[Dict[str, Any]]:
        choices = mixture_choices(self.probs, self.seed, epoch, self.steps)
        pos = self._positions(epoch, start)
        iters: List[Optional[Iterator]] = [None] * len(self.members)
        self.taken = [0] * len(self.members)
        for step in range(start, self.steps):
            d = int(choices[step])
            member = self.members[d]
            src_epoch, offset = divmod(pos[d], len(member))
            if iters[d] is None or offset == 0:  # first use, or the member starts an epoch
                iters[d] = iter(member.epoch_batches(src_epoch, offset))
            batch = next(iters[d])
            pos[d] += 1
            self.taken[d] += 1
            yield batch

    def epoch_summary(self) -> Dict[str, str]:
        out = {f"data_batches_{n}": str(t) for n, t in zip(self.names, self.taken)}
        for n, m in zip(self.names, self.members):
            out.update({f"{k}_{n}": v for k, v in m.epoch_summary().items()})
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"kind": "mixture", "names": self.names, "ratios": self.ratios,
                "steps": self.steps, "members": [m.state_dict() for m in self.members]}


def _ratio(value: Any, where: str) -> float:
    try:
        r = float(value)
    except (TypeError, ValueError):
        r = float("nan")
    if not math.isfinite(r) or r <= 0:
        raise UserError(f"{where} must be a positive number (LAVIS's sample_ratio: a dataset's "
                        f"share of the steps is its ratio / the sum), got {value!r}")
    return r


def mixture_ratios(names: Sequence[str], datasets_cfg: Mapping, run_cfg) -> Optional[List[float]]:
    """Each dataset's ratio, or None when no ratio is given anywhere."""
    run_ratios = run_cfg.get("train_dataset_ratios", None)
    own = {n: (datasets_cfg.get(n) or {}).get("sample_ratio", None) for n in names}
    if run_ratios is not None:
        if any(v is not None for v in own.values()):
            raise UserError("give the mixing ratios once: datasets.<name>.sample_ratio or "
                            "run.train_dataset_ratios, not both")
        unknown = sorted(set(run_ratios) - set(names))
        if unknown:
            raise UserError(f"run.train_dataset_ratios names {unknown}, which are not training "
                            f"datasets of this run ({list(names)})")
        return [_ratio(run_ratios.get(n, 1.0), f"run.train_dataset_ratios.{n}") for n in names]
    if all(v is None for v in own.values()):
        return None
    return [_ratio(1.0 if v is None else v, f"datasets.{n}.sample_ratio") for n, v in own.items()]


def build_train_streams(datasets: Mapping[str, Mapping[str, Any]], datasets_cfg: Mapping,
                        by_split: Dict[str, list], train_splits: Sequence[str], *, seed: int,
                        run_cfg, pin_memory: bool) -> Dict[str, TrainStream]:
    """Streams for the train splits that need one (a shard dataset, or ratios); those splits are
    removed from ``by_split`` (what LAVIS's ``concat_datasets`` gets)."""
    streams: Dict[str, TrainStream] = {}
    for split in list(by_split):
        members: List[Tuple[str, Any]] = [(n, d[split]) for n, d in datasets.items() if split in d]
        has_shards = any(isinstance(d, ShardCaptionDataset) for _, d in members)
        names = [n for n, _ in members]
        ratios = mixture_ratios(names, datasets_cfg, run_cfg) if split in train_splits else None
        if not has_shards and (ratios is None or len(members) < 2):
            continue
        if split not in train_splits:
            raise UserError(f"split {split!r} holds a shard dataset; shard datasets are for "
                            "training (run.train_splits) only")
        bs = run_cfg.get("batch_size_train")
        if not bs:
            raise UserError(f"split {split!r} needs run.batch_size_train")
        kw = dict(seed=seed, batch_size=int(bs), num_workers=int(run_cfg.get("num_workers", 0)),
                  pin_memory=pin_memory)
        loaders = []
        for k, (name, ds) in enumerate(members):
            # each member its own seed: two datasets never share augmentation streams
            member_kw = dict(kw, seed=sample_seed(seed, k)) if len(members) > 1 else kw
            cls = ShardTrainLoader if isinstance(ds, ShardCaptionDataset) else MapTrainLoader
            loaders.append(cls(ds, **member_kw))
        if len(loaders) == 1:
            streams[split] = loaders[0]
        else:
            cap = run_cfg.get("iters_per_epoch", None)
            streams[split] = MixtureLoader(names, loaders, ratios or [1.0] * len(loaders), seed,
                                           int(cap) if cap else None)
        del by_split[split]
    return streams
