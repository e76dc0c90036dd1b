"""``lp_runner``: LAVIS's ``RunnerBase`` with what breaks fixed and training made exact.

Kept from LAVIS: the YAML (``run:`` section), dataset concatenation, the task hooks
(``build_datasets``, ``evaluation``, ``after_evaluation``), validation/best-checkpoint/test flow,
and the checkpoint format (``{"model": trainable weights, "optimizer", "scaler", "epoch", ...}``).

Fixed or added:
- runs in one process (no process group needed; LAVIS calls ``dist.barrier()`` unguarded), on CPU
  (DDP without ``device_ids``; gloo) and GPU (NCCL);
- output folder relative to the working directory, not inside LAVIS's package, and a second
  runner in one process works (LAVIS registers the paths twice and fails);
- the lr is scheduled per optimizer step (linear warm-up then cosine), with layer-wise lr decay
  applied through each param group's ``lr_scale``;
- gradient accumulation (``accum_grad_iters``) with DDP ``no_sync``, bf16/fp16 autocast on GPU,
  optional gradient clipping (``max_grad_norm``);
- exact resume: weights, optimizer, scaler, schedule position, data order (epoch and batch) and
  RNG state are saved (``checkpointing``); per-sample augmentation randomness is seeded from
  (seed, epoch, index) (``sampling``), so a run resumed from a checkpoint reproduces the
  uninterrupted run's losses;
- checkpoints written atomically (temp file + rename) in a form that loads weights-only (no code
  runs when resuming), ``checkpoint_latest`` replaced atomically, a failed write is one clear
  line; a run folder is locked while in use and a previous run's folder is not overwritten
  (``checkpoint_io``); resume refuses a checkpoint that lacks trainable weights;
- non-finite loss or gradients are caught before the optimizer step (``run.on_nonfinite``,
  ``nonfinite``), so no NaN reaches a checkpoint;
- a training sample that cannot be read stops the run with its file named, or under
  ``run.on_bad_sample: skip`` is left out and counted, up to ``run.max_bad_fraction`` of an
  epoch's samples (one meaning for every train stream: ``train_stream``);
- evaluation shards samples across ranks without padding, so merged results have no duplicates;
- every train split is a stream with exact epochs and resume (``train_stream``): one map-style
  dataset, webdataset tar shards (``shard_loader``), or several datasets mixed by
  ``sample_ratio`` (``mixture``).
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from lavis.common.registry import registry
from lavis.datasets.data_utils import concat_datasets, reorg_datasets_by_split
from lavis.runners.runner_base import RunnerBase
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, IterableDataset

from lavis_plugins.common import dist as dist_utils
from lavis_plugins.common.errors import UserError, unknown_name
from lavis_plugins.datasets.validation import one_line
from lavis_plugins.runners import fsdp, mixture, nonfinite
from lavis_plugins.runners.checkpoint_io import RunFolder
from lavis_plugins.runners.checkpointing import CheckpointingMixin
from lavis_plugins.runners.nonfinite import NonFiniteGuard, grad_norm, honours_found_inf
from lavis_plugins.runners.sampling import EpochSampler, move_to_device
from lavis_plugins.runners.step_stats import LossSums
from lavis_plugins.runners.train_stream import MapTrainLoader, TrainStream, map_train_options
from lavis_plugins.common.progress import progress
from lavis_plugins.runners import reporting

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


def compile_model(model: torch.nn.Module) -> None:
    """``run.compile: true``: the model compiles its own hot parts (``compile_for_training``:
    the frozen encoder and the Q-Former step of ``lp_blip2_qformer``; for ``lp_blip2_opt`` /
    ``lp_blip2_t5`` also the frozen LLM's forward, see ``models/compile.py``), in place, so
    parameter names, checkpoints and DDP are unchanged."""
    hook = getattr(model, "compile_for_training", None)
    if not callable(hook):
        raise UserError(f"run.compile is true but {type(model).__name__} has no "
                        "compile_for_training (it is implemented for lp_blip2_qformer, "
                        "lp_blip2_opt and lp_blip2_t5); "
                        "remove run.compile")
    hook()


def loader_workers(run) -> Dict[str, Any]:
    """DataLoader worker settings from ``run:``: ``num_workers``, ``persistent_workers`` (keep
    the workers across epochs instead of forking new ones; default true when there are
    workers) and ``prefetch_factor`` (batches each worker loads ahead; torch's default 2)."""
    workers = int(run.get("num_workers", 0))
    persistent = run.get("persistent_workers", None)
    prefetch = run.get("prefetch_factor", None)
    if workers == 0:
        for key, value in (("persistent_workers", persistent), ("prefetch_factor", prefetch)):
            if value:
                raise UserError(f"run.{key} is {value!r} but run.num_workers is 0 (batches are "
                                f"loaded in the training process): set run.num_workers > 0 or "
                                f"remove run.{key}")
        return {"num_workers": 0}
    return {"num_workers": workers,
            "persistent_workers": True if persistent is None else bool(persistent),
            **({"prefetch_factor": int(prefetch)} if prefetch is not None else {})}


@registry.register_runner("lp_runner")
class PluginRunner(CheckpointingMixin, RunnerBase):
    """Train and evaluate a model on datasets with a task, in one or many processes.

    ``run:`` keys read here, beyond LAVIS's (``max_epoch``, ``init_lr``, ``min_lr``,
    ``warmup_lr``, ``warmup_steps``, ``weight_decay``, ``batch_size_train/eval``, ``num_workers``,
    ``seed``, ``output_dir``, ``amp``, ``accum_grad_iters``, ``resume_ckpt_path``,
    ``train/valid/test_splits``, ``evaluate``):
    ``beta1``/``beta2``; ``amp_dtype`` ("bf16" or "fp16"); ``max_grad_norm``; ``layer_decay``
    (layer-wise lr decay for an unfrozen encoder, when the model provides param groups);
    ``iters_per_epoch`` (cap on iterations per epoch); ``ckpt_freq`` (save every N optimizer
    steps as well as at epoch ends); ``log_freq``; ``on_nonfinite`` ("stop": end the run with
    a message naming the last good checkpoint; "skip": skip the optimizer step, at most
    ``max_nonfinite_skips`` in a row); ``on_bad_sample`` ("fail" or "skip") and
    ``max_bad_fraction``; ``force`` (replace a previous run in the same folder; the CLI's
    ``--force``); ``persistent_workers`` / ``prefetch_factor`` (``loader_workers``);
    ``compile`` (``compile_model``). Every key is checked by
    :mod:`lavis_plugins.common.config_check`.
    """

    def __init__(self, cfg, task, model, datasets, job_id):  # noqa: D107 - as RunnerBase
        # RunnerBase.__init__ only stores attributes and calls setup_output_dir; we do the same
        # with our own setup_output_dir (LAVIS's writes into its package and registers twice)
        self.config = cfg
        self.job_id = job_id
        self.task = task
        self.datasets = datasets
        self._optimizer = None
        self._scaler = None
        self._dataloaders = None
        self._lr_sched = None
        self.start_epoch = 0
        self.start_iter = 0  # first batch index of start_epoch (resume inside an epoch)
        self.global_step = 0  # optimizer steps taken
        self._run_folder: Optional[RunFolder] = None
        self._last_ckpt: Optional[Path] = None  # the newest checkpoint written (for messages)
        run = cfg.run_cfg
        self._guard = NonFiniteGuard(str(run.get("on_nonfinite", "stop")),
                                     int(run.get("max_nonfinite_skips", 10)))
        self.setup_output_dir()
        # run.tensorboard: made now, so a missing tensorboard package fails before training
        self._tb = (reporting.TensorboardLogger(self.output_dir)
                    if cfg.run_cfg.get("tensorboard", False) and dist_utils.is_main_process()
                    else None)

        self._device = torch.device(dist_utils.choose_device(self.config.run_cfg.get("device")))
        self._model = model.to(self._device)
        # run.strategy: fsdp (None: ddp); its checkpoints are sharded folders even in one process
        self.fsdp_settings = fsdp.FSDPSettings.from_run(run, self._device)
        if run.get("compile", False):  # (FSDPSettings refuses it with fsdp)
            compile_model(self._model)
        if self.use_distributed and self.fsdp_settings is not None:
            if not self.evaluate_only:
                self.optimizer  # noqa: B018 - groups read p.ndim, which sharding flattens to 1-D
            self._wrapped_model = fsdp.wrap(self._model, self.fsdp_settings, self._device)
        elif self.use_distributed:
            ids = [self._device.index] if self._device.type == "cuda" else None
            self._wrapped_model = DDP(self._model, device_ids=ids,
                                      find_unused_parameters=bool(
                                          self.config.run_cfg.get("find_unused_parameters", False)))
        else:
            self._wrapped_model = self._model

    # ------------------------------------------------------------------ set-up
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def model(self):
        """The (DDP-wrapped when distributed) model, already on the device."""
        return self._wrapped_model

    @property
    def use_distributed(self) -> bool:
        return bool(self.config.run_cfg.get("distributed", False)) and dist_utils.is_initialized()

    @property
    def valid_splits(self) -> List[str]:
        # LAVIS's property logs "No validation splits found." on every read (three per run)
        return list(self.config.run_cfg.get("valid_splits", None) or [])

    @property
    def seed(self) -> int:
        return int(self.config.run_cfg.get("seed", 42))

    def setup_output_dir(self) -> None:
        run = self.config.run_cfg
        output_dir = Path(run.get("output_dir", "output")).expanduser() / self.job_id
        result_dir = output_dir / "result"
        # the main process locks the folder and checks it may be written; every rank learns
        # its verdict, so no rank goes on alone (and hangs in its first collective)
        error = None
        if dist_utils.is_main_process():
            self._run_folder = RunFolder(output_dir, run.get("resume_ckpt_path"),
                                         bool(run.get("force", False)))
            try:
                self._run_folder.acquire()
                atexit.register(self._run_folder.release)
            except UserError as e:
                error = str(e)
        error = dist_utils.all_gather_object(error)[0]
        if error:
            raise UserError(error)
        result_dir.mkdir(parents=True, exist_ok=True)
        # registry.register_path refuses a second registration; LAVIS tasks read these paths
        registry.mapping["paths"]["result_dir"] = str(result_dir)
        registry.mapping["paths"]["output_dir"] = str(output_dir)
        self.result_dir, self.output_dir = result_dir, output_dir

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

    # ------------------------------------------------------------------ data
    @property
    def dataloaders(self) -> dict:
        if self._dataloaders is None:
            run = self.config.run_cfg
            by_split = reorg_datasets_by_split(self.datasets)
            # train splits with shard (webdataset) datasets or mixing ratios are streamed
            # (LAVIS's concat_datasets refuses generic iterable datasets)
            loaders = mixture.build_train_streams(
                self.datasets, getattr(self.config, "datasets_cfg", None) or {}, by_split,
                self.train_splits, seed=self.seed, run_cfg=run,
                pin_memory=self.device.type == "cuda")
            by_split = concat_datasets(by_split)
            self.datasets = {**by_split, **{k: getattr(v, "dataset", v) for k, v in loaders.items()}}
            for split, dataset in by_split.items():
                is_train = split in self.train_splits
                if isinstance(dataset, (tuple, list)) or isinstance(dataset, IterableDataset):
                    raise UserError(
                        f"split {split!r} holds an iterable dataset that lp_runner cannot "
                        "partition exactly; use a map-style dataset or lp_webdataset_caption "
                        "shards (train split only)")
                bs = run.get("batch_size_train") if is_train else (
                    run.get("batch_size_eval") or run.get("batch_size_train"))
                if not bs:
                    raise UserError(f"split {split!r} needs run.batch_size_"
                                    f"{'train' if is_train else 'eval'}")
                bs = int(bs)
                if is_train:  # the same stream as a map-style member of a mixture
                    loaders[split] = MapTrainLoader(
                        dataset, seed=self.seed, batch_size=bs, **loader_workers(run),
                        pin_memory=self.device.type == "cuda", name=split,
                        pretokenize=self._pretokenize, **map_train_options(run))
                    continue
                sampler = EpochSampler(len(dataset), shuffle=False, seed=self.seed,
                                       rank=dist_utils.get_rank(),
                                       world_size=dist_utils.get_world_size(),
                                       equal_shards=False)
                loaders[split] = DataLoader(
                    dataset, batch_size=bs, sampler=sampler,
                    collate_fn=getattr(dataset, "collater", None), drop_last=False,
                    pin_memory=self.device.type == "cuda",
                    # its own generator: creating an iterator must not draw from the global RNG
                    # (it would shift dropout randomness between a run and its resume)
                    generator=torch.Generator().manual_seed(self.seed),
                    worker_init_fn=None, **loader_workers(run))
            self._dataloaders = loaders
        return self._dataloaders

    def train_stream(self) -> Optional[TrainStream]:
        """The train split's loader (map-style, shards or a mixture), or None without one."""
        split = self.train_splits[0] if self.train_splits else None
        loader = self.dataloaders.get(split) if split else None
        return loader if isinstance(loader, TrainStream) else None

    @property
    def iters_per_epoch(self) -> int:
        """Batches per epoch of one rank (full epoch, capped by ``run.iters_per_epoch``)."""
        split = self.train_splits[0] if self.train_splits else None
        if split is None or split not in self.dataloaders:
            raise UserError(f"no training split: run.train_splits is {list(self.train_splits)}, "
                            f"datasets provide {sorted(self.dataloaders)}")
        n = len(self.dataloaders[split])  # a TrainStream: arithmetic, nothing drawn or read
        if n == 0:
            raise UserError(f"the {split!r} split has fewer samples per process than "
                            f"run.batch_size_train; lower the batch size or add data")
        cap = self.config.run_cfg.get("iters_per_epoch", None)
        return min(n, int(cap)) if cap else n

    @property
    def _pretokenize(self):
        """The model's ``pretokenize`` when training batches go to its ``forward`` as they come
        from the loader (the task's train step is LAVIS's default), else None: a task that
        rewrites the text before calling the model gets the text, not stale ids."""
        from lavis.tasks.base_task import BaseTask

        fn = getattr(self._model, "pretokenize", None)
        if callable(fn) and type(self.task).train_step is BaseTask.train_step:
            return fn
        return None

    # ------------------------------------------------------------------ training
    @property
    def nonfinite_skipped(self) -> int:
        """Optimizer steps dropped for a non-finite loss or gradients (``on_nonfinite: skip``)."""
        return self._guard.skipped

    def finish(self, completed: bool = True) -> None:
        """Mark the run folder finished (``completed``) and release its lock."""
        if self._run_folder is not None:
            if completed:
                self._run_folder.mark_finished()
            self._run_folder.release()

    def train(self) -> Optional[Dict[str, Any]]:
        """Train (and evaluate) as the YAML says; each test split's metrics ``{split: metrics}``."""
        completed = False
        try:
            test_logs = self._train()
            completed = True
        finally:
            self.finish(completed)
        return test_logs

    def _train(self) -> Optional[Dict[str, Any]]:
        start_time = time.time()
        best_agg_metric, best_epoch = -math.inf, 0
        self.log_config()
        if not self.evaluate_only and self.resume_ckpt_path:
            self._load_checkpoint(self.resume_ckpt_path)
        cur_epoch = self.start_epoch
        for cur_epoch in range(self.start_epoch, self.max_epoch):
            if not self.evaluate_only:
                stats = self.train_epoch(cur_epoch)
                self.log_stats(split_name="train", stats=stats)
            if self.valid_splits:
                for split_name in self.valid_splits:
                    val_log = self.eval_epoch(split_name=split_name, cur_epoch=cur_epoch)
                    is_best = False
                    if val_log is not None and dist_utils.is_main_process():
                        agg = val_log.get("agg_metrics")
                        if agg is None:
                            raise UserError(f"task {type(self.task).__name__} returned no "
                                            f"'agg_metrics' for split {split_name!r}")
                        if agg > best_agg_metric and split_name == "val":
                            best_epoch, best_agg_metric, is_best = cur_epoch, agg, True
                        val_log.update({"best_epoch": best_epoch})
                        self.log_stats(val_log, split_name)
                        self._tensorboard_scalars(split_name, val_log)
                    # rank 0 decides; every process saves (saving gathers RNG, fsdp shards)
                    if dist_utils.all_gather_object(is_best)[0]:
                        self._save_checkpoint(cur_epoch, is_best=True)
            if self.evaluate_only:
                break
            if dist_utils.is_main_process():
                reporting.plot_run_curves(self.output_dir)  # loss_curves.png, every epoch
            dist_utils.barrier()
        test_epoch = "best" if self.valid_splits and not self.evaluate_only else cur_epoch
        test_logs = self.evaluate(cur_epoch=test_epoch, skip_reload=self.evaluate_only)
        for split_name, metrics in (test_logs or {}).items():
            self._tensorboard_scalars(split_name, metrics or {})
        if self._tb is not None:
            self._tb.close()
        logger.info("Training time %s", datetime.timedelta(seconds=int(time.time() - start_time)))
        return test_logs

    def evaluate(self, cur_epoch="best", skip_reload=False):
        """Each test split's metrics ``{split: metrics}``. An evaluation-only run has no epoch:
        its result files are named by split alone (LAVIS passes "best")."""
        return super().evaluate(cur_epoch=None if self.evaluate_only else cur_epoch,
                                skip_reload=skip_reload)

    def _tensorboard_scalars(self, prefix: str, values: Dict[str, Any]) -> None:
        """``run.tensorboard: true``: log ``values`` under ``prefix`` at the current step."""
        if self._tb is not None:
            self._tb.scalars(prefix, values, self.global_step)

    @property
    def evaluate_only(self) -> bool:
        return bool(self.config.run_cfg.get("evaluate", False))

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

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval_epoch(self, split_name, cur_epoch, skip_reload=False):
        loader = self.dataloaders.get(split_name)
        if loader is None:
            raise UserError(f"no dataset split {split_name!r} to evaluate; available: "
                            f"{sorted(self.dataloaders)} (check run.valid_splits/test_splits)")
        model = self.unwrap_dist_model(self.model)
        if not skip_reload and cur_epoch == "best":
            model = self._reload_best_model(model)
        # fsdp: gathered weights, evaluated without collectives (the model itself otherwise)
        with fsdp.full_params(self.model) as full:
            model = self.unwrap_dist_model(full)
            model.eval()
            self.task.before_evaluation(model=model, dataset=self.datasets[split_name])
            try:
                results = self.task.evaluation(model, loader, cuda_enabled=self.cuda_enabled)
            except UserError as e:  # e.g. a BadSample raised in a worker: drop the traceback
                raise type(e)(one_line(e)) from None
        if results is not None:
            return self.task.after_evaluation(val_result=results, split_name=split_name,
                                              epoch=cur_epoch)
        return None

    def unwrap_dist_model(self, model):
        return model.module if isinstance(model, DDP) or fsdp.is_fsdp(model) else model

    def log_stats(self, stats, split_name):
        if dist_utils.is_main_process() and isinstance(stats, dict):
            with open(self.output_dir / "log.txt", "a") as f:
                f.write(json.dumps({f"{split_name}_{k}": v for k, v in stats.items()}) + "\n")

    def log_config(self):
        if dist_utils.is_main_process():
            with open(self.output_dir / "log.txt", "a") as f:
                f.write(json.dumps(self.config.to_dict(), indent=4) + "\n")
