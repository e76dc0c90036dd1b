"""Learning-rate schedules stepped per iteration, with layer-wise lr decay.

LAVIS's schedulers warm up during the first epoch and then change the lr once per epoch, and they
ignore the ``lr_scale`` its param groups carry. These step every optimizer update and multiply
each param group's lr by its ``lr_scale`` (set by layer-wise decay), so the BLIP-2 recipe
"2k-step linear warm-up, then cosine decay" is what actually runs.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
from lavis.common.registry import registry


class _StepScheduler:
    """Base: ``step(global_step)`` sets every group's lr to ``lr_at(step) * lr_scale``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, init_lr: float,
                 min_lr: float = 0.0, warmup_steps: int = 0, warmup_start_lr: float = -1,
                 **_: Any) -> None:
        self.optimizer = optimizer
        self.total_steps = max(int(total_steps), 1)
        self.init_lr = float(init_lr)
        self.min_lr = float(min_lr)
        self.warmup_steps = int(warmup_steps)
        # LAVIS's convention: warmup_lr < 0 means "start the warm-up at 0"
        self.warmup_start_lr = 0.0 if warmup_start_lr is None or warmup_start_lr < 0 \
            else float(warmup_start_lr)
        self.last_step = -1

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            frac = step / max(self.warmup_steps, 1)
            return self.warmup_start_lr + (self.init_lr - self.warmup_start_lr) * frac
        return self._after_warmup(step)

    def _after_warmup(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, global_step: int) -> float:
        lr = self.lr_at(global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.last_step = global_step
        return lr

    def state_dict(self) -> Dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        if self.last_step >= 0:
            self.step(self.last_step)


@registry.register_lr_scheduler("lp_linear_warmup_cosine")
class LinearWarmupCosineScheduler(_StepScheduler):
    """Linear warm-up to ``init_lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at
    ``total_steps`` (per optimizer step)."""

    def _after_warmup(self, step: int) -> float:
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max(step - self.warmup_steps, 0) / span, 1.0)
        return self.min_lr + 0.5 * (self.init_lr - self.min_lr) * (1 + math.cos(math.pi * progress))


@registry.register_lr_scheduler("lp_constant")
class ConstantScheduler(_StepScheduler):
    """Linear warm-up, then a constant ``init_lr``."""

    def _after_warmup(self, step: int) -> float:
        return self.init_lr


def layerwise_lr_scale(num_layers: int, layer_id: int, decay: float) -> float:
    """lr multiplier of layer ``layer_id`` (0 = embeddings, ``num_layers + 1`` = head) under
    layer-wise decay: ``decay ** (num_layers + 1 - layer_id)``."""
    return decay ** (num_layers + 1 - layer_id)
