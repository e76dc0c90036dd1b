"""``lp_runner``'s checkpoints: what it saves and how it resumes (a mixin of ``PluginRunner``).

A checkpoint holds the trainable weights (frozen ones are not saved, as in LAVIS), optimizer,
scaler, lr schedule, data position (epoch and next batch), step, skip counters and every rank's
RNG state, all as data that loads with ``torch.load(weights_only=True)``; so a resume runs no
code from the file and reproduces the uninterrupted run. File writing, ``checkpoint_latest``
and the run-folder lock are in :mod:`lavis_plugins.runners.checkpoint_io`.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from lavis_plugins.common import dist as dist_utils
from lavis_plugins.common.errors import TrainingDiverged, UserError
from lavis_plugins.common.safe_load import load_weights
from lavis_plugins.runners import sharded_checkpoint
from lavis_plugins.runners.checkpoint_io import (TMP_SUFFIX, pack_rng, point_latest,
                                                 replace_folder, save_checkpoint_file, unpack_rng,
                                                 write_error)

logger = logging.getLogger(__name__)


class CheckpointingMixin:
    """Save and resume; reads the runner's ``model``, ``optimizer``, ``scaler``,
    ``lr_scheduler``, ``config``, ``output_dir`` and step counters."""

    def _save_checkpoint(self, cur_epoch, is_best=False, next_iter: Optional[int] = None):
        """Save weights (trainable ones), optimizer, scaler, schedule, data position and RNG.

        ``next_iter`` is the first batch of ``cur_epoch`` not yet trained (None: epoch done).
        Written to a temp file and renamed, so a crash never leaves a half-written checkpoint;
        every object in it loads with ``torch.load(weights_only=True)``. Under
        ``run.strategy: fsdp`` every process writes its shards into a folder instead
        (:meth:`_save_sharded`); all processes call this.
        """
        rng_all = dist_utils.all_gather_object(pack_rng())  # every rank's RNG
        done = next_iter is None
        stem = "checkpoint_best" if is_best else (
            f"checkpoint_{cur_epoch}" if done else f"checkpoint_step{self.global_step}")
        if self.fsdp_settings is not None:
            return self._save_sharded(self.output_dir / (stem + sharded_checkpoint.SUFFIX),
                                      self._trainer_state(cur_epoch, next_iter, rng_all), is_best)
        if not dist_utils.is_main_process():
            return
        model = self.unwrap_dist_model(self.model)
        trainable = {k for k, p in model.named_parameters() if p.requires_grad}
        frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
        state = {k: v for k, v in model.state_dict().items() if k not in frozen or k in trainable}
        obj = {"model": state, "optimizer": self.optimizer.state_dict(),
               **self._trainer_state(cur_epoch, next_iter, rng_all)}
        path = self.output_dir / (stem + ".pth")
        # the step loop never applies a non-finite update; this guards any other way in (one
        # sync per checkpoint, not per step)
        bad = _not_finite(state.items())
        if bad:
            raise TrainingDiverged(f"not writing {path}: weights {bad[:3]} are not finite; the "
                                   f"last good checkpoint is {self._last_ckpt}")
        save_checkpoint_file(obj, path)
        self._wrote_checkpoint(path, is_best)

    def _trainer_state(self, cur_epoch, next_iter: Optional[int], rng_all) -> Dict[str, Any]:
        """What a checkpoint holds besides weights and optimizer state."""
        done = next_iter is None
        return {
            "config": self.config.to_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "lr_sched": self.lr_scheduler.state_dict(),
            "epoch": cur_epoch,
            "next_epoch": cur_epoch + 1 if done else cur_epoch,
            "next_iter": 0 if done else int(next_iter),
            "global_step": self.global_step,
            "nonfinite_skipped": self.nonfinite_skipped,
            "rng": rng_all,
            "world_size": dist_utils.get_world_size(),
            # what a streamed train split's order depends on besides (epoch, next_iter)
            "data": stream.state_dict() if (stream := self.train_stream()) else None,
        }

    def _wrote_checkpoint(self, path: Path, is_best: bool) -> None:
        if not is_best:
            point_latest(self.output_dir, path.name)
            self._last_ckpt = path
        logger.info("saved checkpoint %s", path)

    def _save_sharded(self, folder: Path, trainer_state: Dict[str, Any], is_best: bool) -> None:
        """``run.strategy: fsdp``: every process writes its shards into ``folder`` (through a
        temp folder renamed when complete); rank 0 adds ``trainer_state.pth``. A failure on any
        process is raised on every process, so none goes on alone."""
        # each process checks its own shards; all learn every verdict
        local = [(n, p) for n, p in self.unwrap_dist_model(self.model).named_parameters()
                 if p.requires_grad]
        bad = sum(dist_utils.all_gather_object(_not_finite(local)), [])
        if bad:
            raise TrainingDiverged(f"not writing {folder}: weights {bad[:3]} are not finite; "
                                   f"the last good checkpoint is {self._last_ckpt}")
        tmp = folder.with_name(folder.name + TMP_SUFFIX)
        main = dist_utils.is_main_process()
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist_utils.barrier()
        error = None
        try:
            sharded_checkpoint.save(tmp, self.model, self.optimizer)
            if main:
                save_checkpoint_file(trainer_state, tmp / sharded_checkpoint.TRAINER_STATE)
        except UserError as e:
            error = str(e)
        except (OSError, RuntimeError) as e:  # DCP raises CheckpointException (RuntimeError)
            error = str(write_error(folder, e))
        errors = [e for e in dist_utils.all_gather_object(error) if e]
        if errors:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(errors[0])
        if main:
            replace_folder(tmp, folder)
        self._wrote_checkpoint(folder, is_best)
        dist_utils.barrier()  # the folder is complete before any process goes on

    def _read_checkpoint(self, path: str) -> Dict[str, Any]:
        ckpt = load_weights(path, "run.resume_ckpt_path")
        if not isinstance(ckpt, dict):
            raise UserError(f"run.resume_ckpt_path: {path} holds a {type(ckpt).__name__}, not a "
                            "training checkpoint (a dict with 'model' and 'optimizer')")
        return ckpt

    def _load_model_weights(self, model, state: Dict[str, torch.Tensor], path: str) -> None:
        msg = model.load_state_dict(state, strict=False)
        trainable = {k for k, p in model.named_parameters() if p.requires_grad}
        missing = [k for k in msg.missing_keys if k in trainable]
        if missing or msg.unexpected_keys:
            raise UserError(
                f"checkpoint {path} does not match the model: missing trainable weights "
                f"{missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected keys "
                f"{msg.unexpected_keys[:8]}{'...' if len(msg.unexpected_keys) > 8 else ''}. "
                "Was it written by a run of the same model config?")

    def _load_checkpoint(self, url_or_filename):
        """Resume: restore weights, optimizer, scaler, schedule, data position and RNG."""
        if self._check_format(url_or_filename):
            ckpt = self._read_checkpoint(
                str(Path(url_or_filename) / sharded_checkpoint.TRAINER_STATE))
            sharded_checkpoint.load(Path(url_or_filename), self.model, self.optimizer,
                                    "run.resume_ckpt_path")
        else:
            ckpt = self._read_checkpoint(url_or_filename)
            if "model" not in ckpt or "optimizer" not in ckpt:
                raise UserError(f"{url_or_filename} is not a training checkpoint (needs 'model' "
                                "and 'optimizer'); to initialise weights use model.pretrained "
                                "instead")
            self._load_model_weights(self.unwrap_dist_model(self.model), ckpt["model"],
                                     url_or_filename)
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self._last_ckpt = Path(url_or_filename)
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch = int(ckpt.get("next_epoch", ckpt["epoch"] + 1))
        self.start_iter = int(ckpt.get("next_iter", 0))
        self.global_step = int(ckpt.get("global_step", 0))
        self._guard.skipped = int(ckpt.get("nonfinite_skipped", 0))
        if "lr_sched" in ckpt:
            self.lr_scheduler.load_state_dict(ckpt["lr_sched"])
        rng = ckpt.get("rng")
        if rng:
            if ckpt.get("world_size", 1) != dist_utils.get_world_size():
                logger.warning("checkpoint written by %s processes, resuming with %s: data order "
                               "and RNG streams differ from the original run",
                               ckpt.get("world_size"), dist_utils.get_world_size())
            unpack_rng(rng[min(dist_utils.get_rank(), len(rng) - 1)])
        if (stream := self.train_stream()) is not None:
            stream.check_resume(ckpt.get("data"), url_or_filename)
        logger.info("resumed from %s at epoch %d, iteration %d (step %d)", url_or_filename,
                    self.start_epoch, self.start_iter, self.global_step)

    def _check_format(self, path: str) -> bool:
        """Whether ``path`` is a sharded checkpoint folder; refuses one that the run's
        ``run.strategy`` did not write."""
        sharded = sharded_checkpoint.is_sharded(path)
        if self.fsdp_settings is not None and not sharded:
            raise UserError(f"run.resume_ckpt_path: {path} is not a sharded checkpoint folder "
                            "(checkpoint_*.dcp with a .metadata file); run.strategy: fsdp "
                            "resumes from those. A .pth checkpoint resumes with run.strategy: ddp")
        if sharded and self.fsdp_settings is None:
            raise UserError(f"run.resume_ckpt_path: {path} is a sharded checkpoint folder written "
                            "by run.strategy: fsdp; resume it with run.strategy: fsdp (any "
                            "number of processes)")
        return sharded

    def _reload_best_model(self, model):
        if self.fsdp_settings is not None:  # into the sharded model, every process
            sharded_checkpoint.load(
                self.output_dir / ("checkpoint_best" + sharded_checkpoint.SUFFIX),
                self.model, None, "the best checkpoint")
            return model
        path = str(self.output_dir / "checkpoint_best.pth")
        ckpt = self._read_checkpoint(path)
        self._load_model_weights(model, ckpt["model"], path)
        return model


def _not_finite(named: Iterable[Tuple[str, torch.Tensor]]) -> List[str]:
    """Names of the floating tensors holding a NaN or inf; their finite flags are gathered on
    one device and read with one ``.tolist()`` (one host sync)."""
    floats = [(k, v) for k, v in named if v.is_floating_point() and v.numel()]
    if not floats:
        return []
    dev = floats[0][1].device
    finite = torch.stack([torch.isfinite(v).all().to(dev) for _, v in floats]).tolist()
    return [k for (k, _), ok in zip(floats, finite) if not ok]
