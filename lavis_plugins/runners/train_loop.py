"""``lp_runner``'s training loop (a mixin of ``PluginRunner``): one epoch of optimizer steps
with gradient accumulation, DDP ``no_sync``, autocast, clipping and the non-finite guard, and no
per-step host sync (losses and flags stay on the device and are read at log steps).

A batch whose samples were all left out (``run.on_bad_sample: skip``) is skipped in one process.
Under DDP or FSDP every rank must take the same collectives (the gradient all-reduce, and any
all-gather inside the model's forward), and the other ranks cannot know that this rank's batch
is empty without a collective and a host sync per step. So that rank runs a stand-in batch with
loss weight 0 instead (:class:`EpochBatches`): its collectives match the other ranks', its
gradients add nothing, its loss is not counted, and the step is the same optimizer step on every
rank. What remains of the stand-in is the forward's side effects (features it contributes to an
in-forward all-gather, e.g. stage 1's ITC negatives, and the randomness it draws).
"""
from __future__ import annotations

import contextlib
import json
import logging
from collections import deque
from typing import Any, Deque, Dict, Iterator, List, Optional

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


def _is_empty(batch: Any) -> bool:
    """A batch whose samples were all left out: the streams yield ``{}`` for it."""
    return isinstance(batch, dict) and not batch


class EpochBatches:
    """One rank's batches of an epoch (``TrainStream.epoch_batches``), able to lend a stand-in
    for a batch whose samples were all left out (see the module doc).

    The stand-in is the rank's next non-empty batch of the epoch, read ahead and still trained
    on at its own step (a resumed run picks the same one); at the end of the epoch, the last
    non-empty batch read. Nothing is read ahead unless a stand-in is asked for.
    """

    def __init__(self, batches: Iterator[Any], start: int, end: int) -> None:
        self._batches = batches
        self._ahead: Deque[Any] = deque()  # read from the stream, not handed out yet
        self._last: Optional[Any] = None  # the last non-empty batch handed out
        self._next = start  # index in the epoch of the next batch read from the stream
        self._end = end  # batches the loop runs this epoch (run.iters_per_epoch caps it)

    def _read(self) -> Any:
        try:
            batch = next(self._batches)
        except UserError as e:  # raised in a worker: drop the traceback it is wrapped in
            raise type(e)(one_line(e)) from None
        self._next += 1
        return batch

    def __iter__(self) -> "EpochBatches":
        return self

    def __next__(self) -> Any:
        batch = self._ahead.popleft() if self._ahead else self._read()
        if not _is_empty(batch):
            self._last = batch
        return batch

    def stand_in(self, it: int, epoch: int) -> Any:
        """A non-empty batch to run with loss weight 0 in place of empty batch ``it``."""
        for batch in self._ahead:
            if not _is_empty(batch):
                return batch
        while self._next < self._end:
            try:
                batch = self._read()
            except StopIteration:
                break
            self._ahead.append(batch)
            if not _is_empty(batch):
                return batch
        if self._last is not None:
            return self._last
        raise UserError(
            f"rank {dist_utils.get_rank()}: every sample of batch {it} of epoch {epoch} and of "
            "each batch after it in the epoch could not be read, and this process has read no "
            "good batch since it started, so it has nothing to take part in the other "
            "processes' gradient all-reduce with; fix or drop the bad data")


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
        batches = EpochBatches(loader.epoch_batches(epoch, start), start, n_iters)
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
                    samples = next(batches)
                except StopIteration:
                    break
                stand_in = _is_empty(samples)  # every sample was left out (the stream counted)
                if stand_in and not self.use_distributed:
                    continue
                if stand_in:  # the other ranks wait for this one's gradients (module doc)
                    samples = batches.stand_in(i, epoch)
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
                    if stand_in:
                        loss = loss * 0.0
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
                if stand_in:  # not a batch of this rank's: not in its loss statistics
                    counted = torch.zeros_like(counted)
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
