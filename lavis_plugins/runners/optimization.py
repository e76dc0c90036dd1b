"""``lp_runner``'s optimizer, lr schedule and mixed precision (a mixin of ``PluginRunner``).

AdamW over the model's param groups (``optimizer_param_groups`` when it has them: layer-wise
decay), fused where torch has the kernel; the lr stepped per optimizer step by an ``lp_*``
scheduler (LAVIS's scheduler names map to ours); bf16/fp16 autocast on CUDA with a GradScaler
for fp16.
"""
from __future__ import annotations

import logging
from typing import List, Optional

import torch
from lavis.common.registry import registry

from lavis_plugins.common.errors import UserError, unknown_name

logger = logging.getLogger(__name__)

# LAVIS's scheduler names, mapped to the per-step schedulers that implement what they intend
LAVIS_SCHEDULER_ALIASES = {
    "linear_warmup_cosine_lr": "lp_linear_warmup_cosine",
    "linear_warmup_step_lr": "lp_constant",
    "constant_lr": "lp_constant",
}


def fused_adamw_supported(params: List[torch.Tensor]) -> bool:
    """torch's fused AdamW takes every parameter: floating point, on a device with the fused
    kernel (CUDA, CPU, ...). It is one kernel per step instead of a dozen, and it takes a
    found-inf flag, so a non-finite step is dropped without a host sync (``nonfinite``)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    return all(p.is_floating_point() and p.device.type in devices for p in params)


class OptimizationMixin:
    """Optimizer, scaler and lr schedule, each made on first use; reads the runner's
    ``config``, ``_model``, ``device``, ``max_epoch``, ``iters_per_epoch`` and
    ``accum_grad_iters``."""

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            run = self.config.run_cfg
            wd = float(run.get("weight_decay", 0.05))
            groups = None
            get_groups = getattr(self._model, "optimizer_param_groups", None)
            if callable(get_groups):
                groups = get_groups(weight_decay=wd,
                                    layer_decay=float(run.get("layer_decay", 1.0)))
            if groups is None:
                decay, no_decay = [], []
                for n, p in self._model.named_parameters():
                    if not p.requires_grad:
                        continue  # frozen weights
                    if p.ndim < 2 or "bias" in n or "ln" in n or "bn" in n or "norm" in n.lower():
                        no_decay.append(p)
                    else:
                        decay.append(p)
                groups = [{"params": decay, "weight_decay": wd},
                          {"params": no_decay, "weight_decay": 0.0}]
            groups = [g for g in groups if len(g["params"]) > 0]
            if not groups:
                raise UserError("the model has no trainable parameters: nothing to train "
                                "(check freeze_* options in the model config)")
            n_params = sum(p.numel() for g in groups for p in g["params"])
            logger.info("number of trainable parameters: %d", n_params)
            self._optimizer = torch.optim.AdamW(
                groups, lr=float(run.init_lr), weight_decay=wd,
                betas=(float(run.get("beta1", 0.9)), float(run.get("beta2", 0.999))),
                fused=fused_adamw_supported([p for g in groups for p in g["params"]]) or None)
        return self._optimizer

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        """Autocast dtype, or None. Autocast is used on CUDA only (on CPU it is slower)."""
        if not self.config.run_cfg.get("amp", False) or self.device.type != "cuda":
            return None
        name = str(self.config.run_cfg.get("amp_dtype", "bf16")).lower()
        if name not in ("bf16", "bfloat16", "fp16", "float16"):
            raise UserError(f"run.amp_dtype must be 'bf16' or 'fp16', got {name!r}")
        return torch.bfloat16 if name.startswith("bf") else torch.float16

    @property
    def scaler(self):
        # bf16 needs no loss scaling; fp16 does
        if self._scaler is None and self.amp_dtype == torch.float16:
            self._scaler = torch.amp.GradScaler("cuda")
        return self._scaler

    @property
    def lr_scheduler(self):
        if self._lr_sched is None:
            run = self.config.run_cfg
            name = str(run.get("lr_sched", "lp_linear_warmup_cosine"))
            name = LAVIS_SCHEDULER_ALIASES.get(name, name)
            cls = registry.get_lr_scheduler_class(name)
            if cls is None or not name.startswith("lp_"):
                raise unknown_name("run.lr_sched", name,
                                   [n for n in registry.mapping["lr_scheduler_name_mapping"]
                                    if n.startswith("lp_")] + list(LAVIS_SCHEDULER_ALIASES))
            total = self.max_epoch * self.iters_per_epoch // self.accum_grad_iters
            self._lr_sched = cls(optimizer=self.optimizer, total_steps=total,
                                 init_lr=float(run.init_lr), min_lr=float(run.get("min_lr", 0.0)),
                                 warmup_steps=int(run.get("warmup_steps", 0)),
                                 warmup_start_lr=float(run.get("warmup_lr", -1)))
        return self._lr_sched
