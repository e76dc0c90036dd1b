"""Training-loss statistics kept on the device, so that ``lp_runner``'s step needs no host sync.

Each micro-batch's loss and its named parts are added to device sums (masked by whether the
micro-batch counts, see :class:`~lavis_plugins.runners.nonfinite.NonFiniteGuard`); the runner
reads them, with the current step's values and the guard's counters, in one ``.tolist()`` every
``run.log_freq`` steps and at the end of the epoch.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor


class LossSums:
    """Per-epoch sums of ``loss`` and its parts on one device, and the latest values.

    ``add`` is device work only; ``latest()`` / ``totals()`` return device tensors for the
    caller to read with whatever else it reads at that point.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.names: List[str] = []
        self._sums: Optional[Tensor] = None  # (len(names),) float64
        self._count = torch.zeros((), dtype=torch.float64, device=device)
        self._latest: Optional[Tensor] = None  # (len(names) + 1,) float64: values, counted

    def add(self, loss: Tensor, parts: Dict[str, Tensor], counted: Tensor) -> None:
        """Add one micro-batch: ``loss`` and ``parts`` 0-dim (or 1-element) device tensors,
        ``counted`` a device bool (False: left out of the sums, e.g. a non-finite loss)."""
        names = ["loss", *parts]
        if names != self.names:
            if self.names:  # a model that returns different parts per step: sum by name
                old = dict(zip(self.names, self._sums.unbind())) if self._sums is not None else {}
                self._sums = torch.stack([old.get(n, self._count * 0) for n in names])
            self.names = names
        values = torch.stack([loss.detach().reshape(()).to(torch.float64),
                              *[v.detach().reshape(()).to(torch.float64) for v in parts.values()]])
        kept = torch.where(counted, values, 0.0)  # where, not *: NaN * 0 is NaN
        self._sums = kept if self._sums is None else self._sums + kept
        self._count = self._count + counted.to(torch.float64)
        self._latest = torch.cat([values, counted.to(torch.float64).reshape(1)])

    def latest(self) -> Tensor:
        """(len(names) + 1,) the last micro-batch's values and whether it counted (1.0 / 0.0)."""
        assert self._latest is not None, "add() first"
        return self._latest

    def totals(self) -> Tensor:
        """(len(names) + 1,) the sums and the number of micro-batches counted."""
        sums = self._sums if self._sums is not None else self._count.new_zeros(0)
        return torch.cat([sums, self._count.reshape(1)])
