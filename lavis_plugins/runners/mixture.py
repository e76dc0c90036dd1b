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
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from lavis_plugins.common.errors import UserError
from lavis_plugins.common.seeding import sample_seed
from lavis_plugins.datasets.webdataset_caption import ShardCaptionDataset
from lavis_plugins.runners.shard_loader import ShardTrainLoader
from lavis_plugins.runners.train_stream import MapTrainLoader, TrainStream


def mixture_choices(probs: Sequence[float], seed: int, epoch: int, steps: int) -> np.ndarray:
    """The dataset index of each step of ``epoch``, drawn from (seed, epoch) only."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), 0x313]))
    return rng.choice(len(probs), size=steps, p=np.asarray(probs, dtype=np.float64))


class MixtureLoader(TrainStream):
    """Several datasets, one per step, chosen by ratio (see the module doc)."""

    def __init__(self, names: Sequence[str],
                 members: Sequence[Union[MapTrainLoader, ShardTrainLoader]],
                 ratios: Sequence[float], seed: int, steps_per_epoch: Optional[int]) -> None:
        self.names, self.members = list(names), list(members)
        total = float(sum(ratios))
        self.ratios = [float(r) for r in ratios]
        self.probs = [r / total for r in self.ratios]
        self.seed = int(seed)
        self.steps = int(steps_per_epoch or sum(len(m) for m in members))
        self.batch_size = members[0].batch_size
        self.taken = [0] * len(members)  # batches taken from each member in the current epoch
        self._counted_before = [(0, 0)] * len(members)  # members' (samples, bad) at epoch start

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
        # members count bad samples per epoch of their own; the log reports the mixed epoch's
        self._counted_before = [(m.budget.total_seen, m.budget.total_bad) for m in self.members]
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
        """Per member: batches taken, samples read and bad ones in this mixed epoch (this rank)."""
        out = {f"data_batches_{n}": str(t) for n, t in zip(self.names, self.taken)}
        for n, m, (seen, bad) in zip(self.names, self.members, self._counted_before):
            out.update({f"{k}_{n}": v for k, v in m.epoch_summary().items()})
            out[f"data_samples_{n}"] = str(m.budget.total_seen - seen)
            out[f"data_bad_{n}"] = str(m.budget.total_bad - bad)
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
                        run_cfg, options: Mapping[str, Any]) -> Dict[str, TrainStream]:
    """Streams for the train splits that need one (a shard dataset, or ratios); those splits are
    removed from ``by_split`` (what LAVIS's ``concat_datasets`` gets). ``options``: the run's
    stream options (``train_stream.train_stream_options``), the same as a lone map-style train
    split's, so every member is read as the same dataset alone (bad data, workers,
    pretokenising)."""
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
        kw = dict(options, seed=seed, batch_size=int(bs))
        loaders: List[Union[MapTrainLoader, ShardTrainLoader]] = []
        for k, (name, ds) in enumerate(members):
            # each member its own seed: two datasets never share augmentation streams
            member_kw = dict(kw, seed=sample_seed(seed, k)) if len(members) > 1 else kw
            if isinstance(ds, ShardCaptionDataset):
                member_kw.pop("skip_bad")  # shards always skip bad samples (up to the bound)
                loaders.append(ShardTrainLoader(ds, **member_kw))
            else:
                loaders.append(MapTrainLoader(ds, name=name, **member_kw))
        if len(loaders) == 1:
            streams[split] = loaders[0]
        else:
            cap = run_cfg.get("iters_per_epoch", None)
            streams[split] = MixtureLoader(names, loaders, ratios or [1.0] * len(loaders), seed,
                                           int(cap) if cap else None)
        del by_split[split]
    return streams
