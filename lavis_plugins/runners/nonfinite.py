"""What ``lp_runner`` does when a step's loss or gradients are not finite (``run.on_nonfinite``).

The check happens after backward and before the optimizer step, on values the step reads from
the device anyway (loss, its components, the gradient norm: one host sync per step), so a
diverged step is never applied and no NaN reaches the weights or a checkpoint.

- ``stop`` (default): end the run with one line naming the epoch, iteration and step, and the
  last good checkpoint to resume from (``TrainingDiverged``, CLI exit status 3);
- ``skip``: drop the step (gradients zeroed, nothing applied), count it and go on; after
  ``run.max_nonfinite_skips`` dropped steps in a row, stop as above.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, Optional

import torch

from lavis_plugins.common.errors import TrainingDiverged

logger = logging.getLogger(__name__)

FIX = ("lower run.init_lr, set run.max_grad_norm, use run.amp_dtype: bf16, or set "
       "run.on_nonfinite: skip")


def grad_norm(optimizer: torch.optim.Optimizer, max_norm: Optional[float]) -> torch.Tensor:
    """Total gradient norm (a device tensor: no sync), clipping to ``max_norm`` when set."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(params, float(max_norm))
    if not params:
        return torch.zeros(())
    norms = torch._foreach_norm([p.grad for p in params])  # what clip_grad_norm_ uses
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


class NonFiniteGuard:
    """Decides, per micro-batch, whether the optimizer step must be dropped.

    Args:
        policy: "stop" or "skip".
        max_skips: dropped steps in a row after which "skip" stops too.
    """

    def __init__(self, policy: str = "stop", max_skips: int = 10) -> None:
        self.policy, self.max_skips = policy, max_skips
        self.skipped = 0  # steps dropped in this run (restored on resume)
        self.in_a_row = 0
        self._bad = False  # a micro-batch of the current optimizer step was not finite
        self._what = ""

    def drop_step(self, read: Dict[str, float], grads_ok: bool, last_micro: bool) -> bool:
        """True when the step being accumulated must be dropped now: a non-finite value was
        read (``read["loss"]``, or ``grads_ok`` False), at its last micro-batch, or at once
        under "stop"."""
        if not self._bad and not (math.isfinite(read["loss"]) and grads_ok):
            self._bad = True
            self._what = (f"non-finite loss ({read['loss']})" if not math.isfinite(read["loss"])
                          else "non-finite gradients")
        if self._bad and (last_micro or self.policy != "skip"):
            self._bad = False
            return True
        return False

    def stepped(self) -> None:
        """An optimizer step was applied."""
        self.in_a_row = 0

    def dropped(self, where: str, last_ckpt: Optional[Path]) -> None:
        """After a step was dropped (nothing applied): raise under "stop" or after too many in
        a row, else log and count."""
        self.skipped += 1
        self.in_a_row += 1
        last = (f"the last good checkpoint is {last_ckpt}" if last_ckpt
                else "no checkpoint was written yet")
        if self.policy != "skip":
            raise TrainingDiverged(f"training diverged: {self._what} at {where}; the step was "
                                   f"not applied and {last}. Fix: {FIX}")
        logger.warning("%s at %s: step skipped (%d in a row, %d in all)", self._what, where,
                       self.in_a_row, self.skipped)
        if self.in_a_row >= self.max_skips:
            raise TrainingDiverged(f"training diverged: {self.in_a_row} optimizer steps in a "
                                   f"row were dropped, the last for {self._what} at {where} "
                                   f"(run.max_nonfinite_skips is {self.max_skips}); {last}. "
                                   f"Fix: {FIX}")
