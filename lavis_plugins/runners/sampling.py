"""Data order of ``lp_runner``: per-sample seeded augmentation and per-epoch index shards.

Both make a resumed run see exactly the samples, in the order and with the augmentation
randomness, that the uninterrupted run would have seen.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator, List, Tuple, Union

import torch
from torch.utils.data import Dataset, Sampler

from lavis_plugins.common.seeding import sample_seed, seeded_global_rngs
from lavis_plugins.datasets.validation import BAD_SAMPLE_KEY, BadSample

logger = logging.getLogger(__name__)


def move_to_device(sample: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) sample to ``device``."""
    if torch.is_tensor(sample):
        return sample.to(device, non_blocking=True)
    if isinstance(sample, dict):
        return {k: move_to_device(v, device) for k, v in sample.items()}
    if isinstance(sample, (list, tuple)):
        return type(sample)(move_to_device(v, device) for v in sample)
    return sample


class SeededSamples(Dataset):
    """Wraps a map-style dataset so sample ``i`` of epoch ``e`` draws its augmentation randomness
    from a generator seeded by ``(seed, e, i)``: the same whatever the worker, the order in which
    batches are loaded, or a resume in the middle of an epoch."""

    def __init__(self, dataset: Dataset, seed: int, skip_bad: bool = False) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0
        self.skip_bad = skip_bad  # run.on_bad_sample: skip (a BadSample becomes None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Union[int, Tuple[int, int]]):
        """Sample ``key``: an index (of epoch ``self.epoch``) or ``(epoch, index)``, as
        ``EpochSampler(with_epoch=True)`` yields them."""
        epoch, idx = key if isinstance(key, tuple) else (self.epoch, key)
        with seeded_global_rngs(sample_seed(self.seed, epoch, idx)):
            try:
                return self.dataset[idx]
            except BadSample as e:
                if not self.skip_bad:
                    raise
                logger.warning("skipping sample %d: %s", idx, e)
                return None

    def collater(self, samples):
        """The dataset's batch of the readable samples; ``BAD_SAMPLE_KEY`` counts the others."""
        good = [s for s in samples if s is not None]
        fn = getattr(self.dataset, "collater", None)
        batch = ({} if not good else fn(good) if fn is not None
                 else torch.utils.data.default_collate(good))
        if len(good) < len(samples) and isinstance(batch, dict):
            batch[BAD_SAMPLE_KEY] = len(samples) - len(good)
        return batch


class EpochSampler(Sampler[int]):
    """Indices of one rank for one epoch: a permutation seeded by ``(seed, epoch)`` (or the
    natural order), sharded ``rank::world_size``; training shards are truncated to equal length
    (as ``DistributedSampler(drop_last=True)``), evaluation shards are not padded, so every sample
    is evaluated exactly once. ``start`` skips the first indices (resume inside an epoch).
    ``with_epoch``: yield ``(epoch, index)`` pairs (for :class:`SeededSamples` in workers that
    outlive an epoch)."""

    def __init__(self, num_samples: int, shuffle: bool, seed: int, rank: int, world_size: int,
                 equal_shards: bool, with_epoch: bool = False) -> None:
        self.n, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world = rank, world_size
        self.equal_shards = equal_shards
        self.with_epoch = with_epoch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.equal_shards:
            order = order[: (self.n // self.world) * self.world]
        return order[self.rank:: self.world]

    def num_indices(self) -> int:
        """``len(self._indices())`` by arithmetic: a length must not draw a permutation of the
        whole dataset (at millions of samples that is seconds and gigabytes)."""
        n = (self.n // self.world) * self.world if self.equal_shards else self.n
        return max((n - self.rank + self.world - 1) // self.world, 0)

    def __iter__(self) -> Iterator[Union[int, Tuple[int, int]]]:
        indices = self._indices()[self.start:]
        return iter([(self.epoch, i) for i in indices] if self.with_epoch else indices)

    def __len__(self) -> int:
        return max(self.num_indices() - self.start, 0)
