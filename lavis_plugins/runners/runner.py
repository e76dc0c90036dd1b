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

``PluginRunner`` is assembled from one mixin per concept: the train loop (``train_loop``), the
optimizer, lr schedule and mixed precision (``optimization``), the data loaders (``loaders``) and
checkpoints (``checkpointing``); this module holds set-up, the epoch flow and evaluation.
"""
from __future__ import annotations

import atexit
import datetime
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from lavis.common.registry import registry
from lavis.runners.runner_base import RunnerBase
from torch.nn.parallel import DistributedDataParallel as DDP

from lavis_plugins.common import dist as dist_utils
from lavis_plugins.common.errors import UserError
from lavis_plugins.datasets.validation import one_line
from lavis_plugins.runners import fsdp, reporting
from lavis_plugins.runners.checkpoint_io import RunFolder
from lavis_plugins.runners.checkpointing import CheckpointingMixin
from lavis_plugins.runners.loaders import LoadersMixin
from lavis_plugins.runners.nonfinite import NonFiniteGuard
from lavis_plugins.runners.optimization import (LAVIS_SCHEDULER_ALIASES, OptimizationMixin,
                                                fused_adamw_supported)
from lavis_plugins.runners.sampling import EpochSampler
from lavis_plugins.runners.train_loop import TrainLoopMixin
from lavis_plugins.runners.train_stream import MapTrainLoader, TrainStream, loader_workers

# the runner's public names, importable from here as before the split into mixins
__all__ = ["PluginRunner", "compile_model", "loader_workers", "fused_adamw_supported",
           "LAVIS_SCHEDULER_ALIASES", "EpochSampler", "MapTrainLoader", "TrainStream"]

logger = logging.getLogger(__name__)


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


@registry.register_runner("lp_runner")
class PluginRunner(TrainLoopMixin, OptimizationMixin, LoadersMixin, CheckpointingMixin,
                   RunnerBase):
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
    ``--force``); ``persistent_workers`` / ``prefetch_factor``
    (``train_stream.loader_workers``);
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

    # ------------------------------------------------------------------ running
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
