"""``lp_runner``'s training loop (a mixin of ``PluginRunner``): one epoch of optimizer steps
with gradient accumulation, DDP ``no_sync``, autocast, clipping and the non-finite guard, and no
per-step host sync (losses and flags stay on the device and are read at log steps).
"""
from __future__ import annotations

import contextlib
import json
import logging
from typing import Dict, List

import torch

from lavis_plugins.common import dist as dist_utils
from lavis_plugins.common.errors import UserError
from lavis_plugins.common.progress import progress
from lavis_plugins.datasets.validation import one_line
from lavis_plugins.runners import fsdp, nonfinite
from lavis_plugins.runners.nonfinite import NonFiniteGuard, grad_norm, honours_found_inf
from lavis_plugins.runners.sampling import move_to_device
from lavis_plugins.runners.step_stats import LossSums

logger = logging.getLogger(__name__)


class TrainLoopMixin:
    """``train_epoch`` and its steps; reads the runner's ``model``, ``optimizer``, ``scaler``,
    ``lr_scheduler``, ``dataloaders``, ``config`` and step counters."""

    @property
    def nonfinite_skipped(self) -> int:
        """Optimizer steps dropped for a non-finite loss or gradients (``on_nonfinite: skip``)."""
        return self._guard.skipped

    @property
    def accum_grad_iters(self) -> int:
        return max(int(self.config.run_cfg.get("accum_grad_iters", 1)), 1)

    def _autocast(self):
        dtype = self.amp_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=dtype)

    def _forward_loss(self, samples) -> tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Loss of one batch and its named components (every ``loss_*`` output of the model),
        as device tensors: the step reads them all in one host sync."""
        task_step = type(self.task).train_step
        from lavis.tasks.base_task import BaseTask

        with self._autocast():
            if task_step is BaseTask.train_step:
                output = self.model(samples)
                loss = output["loss"]
                parts = {k: v.detach() for k, v in output.items()
                         if k.startswith("loss_") and torch.is_tensor(v) and v.numel() == 1}
            else:
                loss, parts = self.task.train_step(model=self.model, samples=samples), {}
        return loss, parts

    def train_epoch(self, epoch: int) -> Dict[str, str]:
        """One epoch of optimizer steps. The step makes no host sync: losses are summed and
        non-finite values flagged on the device (``step_stats``, ``nonfinite``), and read in one
        sync every ``run.log_freq`` steps, before a checkpoint and at the end of the epoch."""
        self.model.train()
        loader = self.dataloaders[self.train_splits[0]]
        start = self.start_iter if epoch == self.start_epoch else 0
        n_iters = self.iters_per_epoch
        data_iter = loader.epoch_batches(epoch, start)
        accum = self.accum_grad_iters
        sched, optimizer, scaler = self.lr_scheduler, self.optimizer, self.scaler
        max_norm = self.config.run_cfg.get("max_grad_norm", None)
        ckpt_freq = int(self.config.run_cfg.get("ckpt_freq", 0) or 0)
        guard = self._guard
        guard.start(self.device)
        sums = LossSums(self.device)
        bar = None
        if dist_utils.is_main_process():
            bar = progress(n_iters, f"train epoch {epoch}", initial=start)
        try:
            for i in range(start, n_iters):
                try:
                    samples = next(data_iter)
                except StopIteration:
                    break
                except UserError as e:  # raised in a worker: drop the traceback it is wrapped in
                    raise type(e)(one_line(e)) from None
                if isinstance(samples, dict) and not samples:
                    continue  # every sample of the batch was left out (counted by the stream)
                samples = move_to_device(samples, self.device)
                if isinstance(samples, dict):
                    samples.update({"epoch": epoch, "num_iters_per_epoch": n_iters, "iters": i})
                last_micro = (i + 1) % accum == 0 or i + 1 == n_iters
                if i % accum == 0:
                    sched.step(self.global_step)
                sync = contextlib.nullcontext()
                if self.use_distributed and not last_micro:
                    sync = self.model.no_sync()
                with sync:
                    loss, parts = self._forward_loss(samples)
                    scaled = loss / accum
                    (scaler.scale(scaled) if scaler else scaled).backward()
                norm = None
                if last_micro:
                    if scaler:
                        scaler.unscale_(optimizer)
                    norm = (fsdp.grad_norm(self.model, max_norm) if fsdp.is_fsdp(self.model)
                            else grad_norm(optimizer, max_norm))
                # fp16 loss scaling makes inf gradients normal: GradScaler skips those steps itself
                counted = guard.micro_batch(loss, None if scaler else norm, last_micro, i,
                                            self.global_step)
                sums.add(loss, parts, counted)
                if last_micro:
                    self._optimizer_step(optimizer, scaler, guard)
                    self.global_step += 1  # counted as taken until the guard is read
                if bar is not None:
                    bar.update(1)
                due_log = (i + 1) % self.log_freq == 0 or i + 1 == n_iters
                # a checkpoint is due by the step count as it stands after the read
                maybe_ckpt = bool(ckpt_freq and last_micro and i + 1 < n_iters)
                if due_log or (maybe_ckpt and self.global_step % ckpt_freq == 0):
                    latest = self._read_step(epoch, sums.latest())
                    if due_log and latest[-1]:  # a dropped step's losses are not logged
                        read = dict(zip(sums.names, latest))
                        if bar is not None:
                            bar.set_postfix(loss=f"{read['loss']:.4f}", refresh=False)
                        self._log_train_step(epoch, i, read)
                    if maybe_ckpt and self.global_step % ckpt_freq == 0:
                        self._save_checkpoint(epoch, is_best=False, next_iter=i + 1)
        finally:  # cleared before any error line, which then starts its own line
            if bar is not None:
                bar.close()
        self.start_iter = 0
        totals = self._read_step(epoch, sums.totals())
        # average over processes
        totals = torch.tensor(totals, dtype=torch.float64)
        if self.use_distributed:
            torch.distributed.all_reduce(totals.to(self.device) if self.device.type == "cuda"
                                         else totals)
        stats = {k: f"{totals[j].item() / max(totals[-1].item(), 1):.6f}"
                 for j, k in sorted(enumerate(sums.names), key=lambda jk: jk[1])}
        stats["lr"] = f"{optimizer.param_groups[0]['lr']:.8f}"
        if self.nonfinite_skipped:
            stats["nonfinite_skipped"] = str(self.nonfinite_skipped)
        stats.update(loader.epoch_summary())  # this rank's data counts (samples, bad ones)
        logger.info("epoch %d averaged stats: %s", epoch, stats)
        if not self.valid_splits:
            self._save_checkpoint(epoch, is_best=False, next_iter=None)
        return stats

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, scaler, guard: NonFiniteGuard
                        ) -> None:
        """Apply the accumulated gradients unless the guard flagged the step, without reading
        the flag on the host where the optimizer takes it as its found-inf input (fused AdamW;
        GradScaler passes its own, which a non-finite loss also sets)."""
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        elif honours_found_inf(optimizer):
            optimizer.grad_scale, optimizer.found_inf = None, guard.found_inf
            optimizer.step()
        elif not bool(guard.found_inf):  # an optimizer without that input: one sync per step
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _read_step(self, epoch: int, values: torch.Tensor) -> List[float]:
        """``values`` and the non-finite guard's counters read in one host sync; steps the guard
        dropped since its last read come off the step count (or the run stops, see
        ``nonfinite``). Returns ``values`` as floats."""
        n = values.numel()
        read = torch.cat([values.to(torch.float64),
                          self._guard.state().to(values.device, torch.float64)]).tolist()
        self.global_step -= int(read[n + nonfinite.SKIPPED])  # before settle() may raise
        self._guard.settle(read[n:], epoch, self._last_ckpt)
        return read[:n]

    def _log_train_step(self, epoch: int, it: int, parts: Dict[str, float]) -> None:
        if not dist_utils.is_main_process():
            return
        rec = {"epoch": epoch, "iter": it, "step": self.global_step,
               "lr": self.optimizer.param_groups[0]["lr"], **parts}
        with open(self.output_dir / "train_log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        self._tensorboard_scalars("train", {"lr": rec["lr"], **parts})
