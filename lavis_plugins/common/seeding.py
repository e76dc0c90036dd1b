"""Per-sample random streams: augmentation randomness that depends only on a sample's identity.

LAVIS's processors draw from the global RNGs (torch, ``random``, numpy). Seeding them per sample
from ``(seed, epoch, sample id)`` makes a sample's augmentation the same whatever worker loads it,
in whatever order, and after a resume in the middle of an epoch.
"""
from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch


def sample_seed(*parts: int) -> int:
    """A 32-bit seed mixed from integer parts (numpy's SeedSequence: no correlated streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Run the body with torch's, Python's and numpy's global RNGs seeded by ``seed``; restore
    their previous states afterwards (the caller's streams are not disturbed)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
