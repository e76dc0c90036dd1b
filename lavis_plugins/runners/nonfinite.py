"""What ``lp_runner`` does when a step's loss or gradients are not finite (``run.on_nonfinite``),
without a host sync per step.

Each micro-batch's loss and each optimizer step's gradient norm are checked *on the device*: the
result is a found-inf flag that the fused AdamW step honours (as it does GradScaler's: the
kernel leaves weights, moments and step count unchanged when the flag is set), so a diverged
step is never applied and no NaN reaches the weights or a checkpoint, while the host goes on
queueing work. Where, and how many, steps were dropped is kept in a small device tensor that the
runner reads together with the logged losses, before every checkpoint and at the end of each
epoch (:meth:`NonFiniteGuard.settle`); only then are the consequences drawn on the host:

- ``stop`` (default): end the run with one line naming the epoch, iteration and step of the
  first dropped step, and the last good checkpoint to resume from (``TrainingDiverged``, CLI
  exit status 3);
- ``skip``: count the dropped steps and go on; after ``run.max_nonfinite_skips`` dropped steps in
  a row, stop as above.

So under ``stop`` the run ends at the next read after the bad step (every step with
``log_freq: 1``), having applied only finite updates in between; an optimizer without the fused
found-inf input falls back to reading the flag before each of its steps (one sync per step).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from lavis_plugins.common.errors import TrainingDiverged

logger = logging.getLogger(__name__)

FIX = ("lower run.init_lr, set run.max_grad_norm, use run.amp_dtype: bf16, or set "
       "run.on_nonfinite: skip")

# the state vector, one int64 per field; FIRST_* / LAST_* describe a dropped step
SKIPPED, IN_A_ROW, MAX_ROW, FIRST_ITER, FIRST_STEP, FIRST_KIND, LAST_ITER, LAST_STEP, \
    LAST_KIND = range(9)
STATE_SIZE = 9
KINDS = {1: "non-finite loss", 2: "non-finite gradients"}


def grad_norm(optimizer: torch.optim.Optimizer, max_norm: Optional[float]) -> Tensor:
    """Total gradient norm (a device tensor: no sync), clipping to ``max_norm`` when set."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(params, float(max_norm))
    if not params:
        return torch.zeros(())
    norms = torch._foreach_norm([p.grad for p in params])  # what clip_grad_norm_ uses
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def honours_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """True when ``optimizer.step()`` skips itself on ``optimizer.found_inf`` (torch's fused
    Adam/AdamW/SGD, which GradScaler drives the same way)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class NonFiniteGuard:
    """Device-side record of non-finite micro-batches and dropped optimizer steps.

    Args:
        policy: "stop" or "skip".
        max_skips: dropped steps in a row after which "skip" stops too.
    """

    def __init__(self, policy: str = "stop", max_skips: int = 10) -> None:
        self.policy, self.max_skips = policy, max_skips
        self.skipped = 0  # steps dropped in this run, as of the last settle (restored on resume)
        self._state: Optional[Tensor] = None  # (STATE_SIZE,) int64, see the field names above
        self._step_kind: Optional[Tensor] = None  # () int64: 0 finite so far, else a KINDS key
        self.found_inf: Optional[Tensor] = None  # () float32: 1.0 when the step must be dropped

    def start(self, device: torch.device) -> None:
        """Allocate the device state on ``device`` (kept across epochs: the in-a-row count
        carries over)."""
        if self._state is None or self._state.device != torch.device(device):
            state = torch.full((STATE_SIZE,), -1, dtype=torch.int64)
            state[[SKIPPED, IN_A_ROW, MAX_ROW]] = 0
            self._state = state.to(device)
            self._step_kind = torch.zeros((), dtype=torch.int64, device=device)

    def micro_batch(self, loss: Tensor, norm: Optional[Tensor], last_micro: bool, it: int,
                    attempted_steps: int) -> Tensor:
        """Record one micro-batch; returns a device bool: whether it counts in the loss
        statistics (its loss is finite and, at the step's last micro-batch, the step is kept).

        ``norm``: the step's gradient norm at its last micro-batch (None when gradients may be
        non-finite by design, under fp16 loss scaling). ``it``: the iteration in the epoch;
        ``attempted_steps``: optimizer steps attempted so far (applied or dropped) since the
        counts were last settled, plus those settled as applied. At the last micro-batch sets
        ``found_inf`` for the optimizer and updates the counters."""
        assert self._state is not None and self._step_kind is not None, "call start() first"
        loss_ok = torch.isfinite(loss.detach()).all()
        kind = torch.where(loss_ok, 0, 1)
        if norm is not None and last_micro:
            kind = torch.where(kind > 0, kind, torch.where(torch.isfinite(norm), 0, 2))
        self._step_kind = torch.where(self._step_kind > 0, self._step_kind, kind)
        if not last_micro:
            return loss_ok
        bad = self._step_kind > 0
        self.found_inf = bad.to(torch.float32)
        s = self._state
        # the step's number as counted after the drops so far are settled
        record = torch.stack([s[SKIPPED] * 0 + it, attempted_steps + 1 - s[SKIPPED],
                              self._step_kind])
        first_unset = s[FIRST_ITER] < 0
        in_a_row = (s[IN_A_ROW] + 1) * bad
        self._state = torch.cat([
            torch.stack([s[SKIPPED] + bad, in_a_row, torch.maximum(s[MAX_ROW], in_a_row)]),
            torch.where(bad & first_unset, record, s[FIRST_ITER:FIRST_KIND + 1]),
            torch.where(bad, record, s[LAST_ITER:LAST_KIND + 1])])
        self._step_kind = torch.zeros_like(self._step_kind)
        return loss_ok & ~bad

    def state(self) -> Tensor:
        """The (STATE_SIZE,) device counters, to be read with the logged values in one sync."""
        assert self._state is not None, "call start() first"
        return self._state

    def settle(self, state: Sequence[float], epoch: int, last_ckpt: Optional[Path]) -> None:
        """Draw the consequences of the ``state()`` values read on the host: raise under "stop"
        or after too many drops in a row, else log and count. ``state[SKIPPED]`` steps were
        dropped since the last settle (the runner's step count had counted them as taken)."""
        s: List[int] = [int(v) for v in state]
        dropped = s[SKIPPED]
        if dropped == 0:
            return
        self.skipped += dropped
        # the counters since this read start empty; the in-a-row count goes on
        # the counters since this read start empty; the in-a-row count goes on (in-place
        # fills: no copy from the host)
        self._state[SKIPPED] = 0
        self._state[FIRST_ITER:FIRST_KIND + 1] = -1
        self._state[MAX_ROW] = self._state[IN_A_ROW]
        first = (f"epoch {epoch}, iteration {s[FIRST_ITER]} (optimizer step {s[FIRST_STEP]})",
                 KINDS.get(s[FIRST_KIND], "non-finite value"))
        last = (f"epoch {epoch}, iteration {s[LAST_ITER]} (optimizer step {s[LAST_STEP]})",
                KINDS.get(s[LAST_KIND], "non-finite value"))
        ckpt = (f"the last good checkpoint is {last_ckpt}" if last_ckpt
                else "no checkpoint was written yet")
        if self.policy != "skip":
            raise TrainingDiverged(f"training diverged: {first[1]} at {first[0]}; the step was "
                                   f"not applied and {ckpt}. Fix: {FIX}")
        logger.warning("%s at %s: %d step(s) skipped since the last report (the last at %s; %d "
                       "in a row, %d in all)", first[1], first[0], dropped, last[0], s[IN_A_ROW],
                       self.skipped)
        if s[MAX_ROW] >= self.max_skips:
            raise TrainingDiverged(f"training diverged: {s[MAX_ROW]} optimizer steps in a "
                                   f"row were dropped, the last for {last[1]} at {last[0]} "
                                   f"(run.max_nonfinite_skips is {self.max_skips}); {ckpt}. "
                                   f"Fix: {FIX}")
