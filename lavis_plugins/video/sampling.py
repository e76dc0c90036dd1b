"""Which frames to read: ``sample_indices`` and its strategies (no decoding here)."""
from __future__ import annotations

import random
from typing import List, Literal, Optional, Protocol, Sequence, Tuple

import numpy as np

from lavis_plugins.common.errors import UserError, unknown_name
from lavis_plugins.video.errors import VideoDecodeError

SamplingStrategy = Literal["uniform", "uniform_endpoints", "random", "headtail"]
STRATEGIES: Tuple[str, ...] = ("uniform", "uniform_endpoints", "random", "headtail")


class _Rng(Protocol):
    def randrange(self, start: int, stop: int) -> int: ...

    def sample(self, population: Sequence[int], k: int) -> List[int]: ...


def sample_indices(
    num_frames_available: int,
    n: int,
    strategy: SamplingStrategy = "uniform",
    rng: Optional[_Rng] = None,
    allow_repeat: bool = True,
) -> List[int]:
    """``n`` frame indices in ``[0, num_frames_available)``, in ascending order.

    Strategies (N = ``num_frames_available``):

    - ``uniform``: the midpoint of each of ``n`` equal segments, ``floor((k + 0.5) * N / n)``.
      (LAVIS's ``load_video`` takes segment starts, ``np.arange(0, N, N / n)``.)
    - ``uniform_endpoints``: ``round(linspace(0, N - 1, n))``, so the first and last frames are
      included; ``n = 1`` gives frame 0, as ``numpy.linspace`` does.
    - ``random``: one uniformly random index inside each of ``n`` equal segments (training).
    - ``headtail``: LAVIS/ALPRO's: sorted distinct random indices, ``n // 2`` from the first half
      ``[0, N // 2)`` and the rest from the second half ``[N // 2, N)``. LAVIS returns only
      ``2 * (n // 2)`` frames for odd ``n``; here the extra frame comes from the second half.

    When ``n > N`` every strategy repeats frames (indices stay sorted, each frame used about
    ``n / N`` times) if ``allow_repeat``; otherwise it raises
    ``VideoDecodeError(kind="too_short")``. ``N = 0`` raises
    ``VideoDecodeError(kind="no_frames")``. ``rng`` is a ``random.Random`` (or anything with
    ``randrange`` and ``sample``); ``None`` uses the ``random`` module, which PyTorch's DataLoader
    seeds in every worker.
    """
    if strategy not in STRATEGIES:
        raise unknown_name("sampling strategy", strategy, STRATEGIES)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(
            f"the number of frames to sample (n_frms) must be an integer >= 1, got {n!r}")
    n, total = int(n), int(num_frames_available)
    if total <= 0:
        raise VideoDecodeError(None, "no_frames", "the video has no decodable frames")
    if n > total and not allow_repeat:
        raise VideoDecodeError(
            None, "too_short",
            f"it has {total} decodable frames, fewer than the {n} requested; "
            "set allow_repeat: true to repeat frames, or lower n_frms",
        )
    rng = random if rng is None else rng

    if strategy == "uniform":
        # integer form of floor((k + 0.5) * total / n): no float rounding at segment boundaries
        return [((2 * k + 1) * total) // (2 * n) for k in range(n)]
    if strategy == "uniform_endpoints":
        if n == 1:
            return [0]
        # round-half-up of k * (total - 1) / (n - 1), in integers
        return [(2 * k * (total - 1) + (n - 1)) // (2 * (n - 1)) for k in range(n)]
    if strategy == "random":
        out = []
        for k in range(n):
            lo, hi = (k * total) // n, ((k + 1) * total) // n
            out.append(rng.randrange(lo, hi) if hi > lo else lo)  # empty segment when n > total
        return out
    # headtail
    mid = total // 2
    n_head = n // 2
    head_hi = mid if mid > 0 else 1  # a 1-frame video: both halves are frame 0
    return _pick_sorted(0, head_hi, n_head, rng) + _pick_sorted(mid, total, n - n_head, rng)


def _pick_sorted(lo: int, hi: int, k: int, rng) -> List[int]:
    """``k`` sorted distinct random indices from ``[lo, hi)``; evenly repeated ones if too few."""
    if k <= hi - lo:
        return sorted(rng.sample(range(lo, hi), k))
    return [lo + ((2 * j + 1) * (hi - lo)) // (2 * k) for j in range(k)]
