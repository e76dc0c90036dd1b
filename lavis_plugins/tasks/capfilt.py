"""``lp_capfilt``: bootstrap captions (BLIP's CapFilt, BLIP-2's variant) under the runner.

Run as an evaluation (``lavis-plugins capfilt --cfg-path projects/capfilt/<x>.yaml``): the
``model:`` is the filter, ``run.capfilt.captioner`` the captioner (empty: the filter model
captions, as ``lp_blip2_qformer`` can with its ITG decoder), the ``lp_capfilt_input`` dataset
the images and web captions (split ``input``; a caption JSON file or shards). Settings:
:class:`~lavis_plugins.capfilt.config.CapFiltConfig`.

The input is cut into batches of ``run.batch_size_eval`` consecutive images: from a JSON file,
batch ``b`` goes to rank ``b % world_size``; from shards, batches never cross a shard and shard
``s``'s go to rank ``s % world_size`` (:mod:`lavis_plugins.capfilt.shard_input`). A batch's
captions are sampled under a seed of (``run.seed``, b), and its records are appended to the
rank's part file when done (:mod:`lavis_plugins.capfilt.parts`). A run into a folder with
finished batches skips them, so a killed run continues where it stopped and writes the same files
as an uninterrupted one. When every batch is done, rank 0 merges the parts into ``capfilt.json`` /
``capfilt_flat.json``, writes the report and, with ``run.capfilt.shards``, a shard set.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from lavis.common.registry import registry
from lavis.tasks.base_task import BaseTask

from lavis_plugins.capfilt.candidates import batch_seed, check_captioner, process_batch
from lavis_plugins.capfilt.config import CapFiltConfig
from lavis_plugins.capfilt import parts
from lavis_plugins.common import dist
from lavis_plugins.common.errors import UserError

logger = logging.getLogger(__name__)


def build_captioner(cfg: CapFiltConfig, device: torch.device):
    """The captioner of ``cfg.captioner`` ({arch, model_type, other keys}) in eval mode."""
    from lavis_plugins.api import load_model

    mcfg = dict(cfg.captioner)
    arch, mtype = mcfg.pop("arch"), mcfg.pop("model_type", None)
    if mtype is None:
        raise UserError(f"run.capfilt.captioner: give model_type (of {arch!r})")
    return load_model(arch, mtype, is_eval=True, device=device, **mcfg)


def run_capfilt(filter_model, captioner, dataset, cfg: CapFiltConfig, batch_size: int,
                seed: int, num_workers: int = 0, force: bool = False,
                ranker=None) -> Dict[str, Any]:
    """CapFilt over ``dataset`` (a :class:`~lavis_plugins.datasets.capfilt_input.
    CapFiltInputDataset` or a :class:`~lavis_plugins.capfilt.shard_input.CapFiltShardInput`) on
    this rank's share of batches; returns the summary counts (rank 0: of the merged output,
    other ranks: ``{}``). ``ranker``: the CLIP model of the "clip" score (``cfg.ranker``)."""
    check_captioner(captioner, cfg)
    if "clip" in cfg.scores and ranker is None:
        raise UserError("run.capfilt.scores has clip but no ranker model was built")
    out = Path(cfg.output).expanduser().absolute()
    n = len(dataset)
    if n == 0:
        raise UserError("CapFilt input holds no image")
    rank, world = dist.get_rank(), dist.get_world_size()
    plan = dataset.work_plan(batch_size, world)
    state = {"format": parts.STATE_FORMAT, "input": str(dataset.source), "images": n,
             "batch_size": batch_size, "seed": seed, "settings": cfg.settings()}
    finished = False
    if dist.is_main_process():
        if cfg.shards:  # refused now, not after the work
            parts.check_shards_folder(out, Path(cfg.shards).expanduser().absolute(), force)
        finished = parts.prepare_output(out, state, force)
    finished = dist.all_gather_object(finished)[0]  # also: the folder is ready for every rank
    if not finished:
        done = parts.done_batches(out)
        # the owner of a batch is fixed by the plan (by batch, or by shard for shard input),
        # so that a rank streams its shards once; any rank count continues any earlier run
        todo = [b for b, (_, owner) in enumerate(plan) if owner == rank and b not in done]
        if len(done):
            logger.info("CapFilt: %d of %d batches already in %s; rank %d does %d", len(done),
                        len(plan), out, rank, len(todo))
        _process(filter_model, captioner, dataset, cfg, plan, todo, seed, num_workers, out, rank,
                 ranker)
    dist.all_gather_object(rank)  # every rank's batches are written
    if not dist.is_main_process():
        return {}
    if not finished:
        merged = parts.merge(out, len(plan), n, dataset.entries)
    else:
        merged = parts.read_merged(out)
    from lavis_plugins.capfilt.report import summarise, write_report

    summary = summarise(merged)
    write_report(out, merged, summary, dataset.example_image, cfg.report_examples)
    if cfg.shards:
        shards = Path(cfg.shards).expanduser().absolute()
        if dataset.entries is None:  # shard input: the images are copied from the input shards
            from lavis_plugins.capfilt.shard_input import write_shards_from_input

            parts.check_shards_folder(out, shards, force)
            index = write_shards_from_input(dataset, merged, shards, cfg.shard_size,
                                            str(out / parts.FLAT))
        else:
            index = parts.write_shards(out, shards, Path(dataset.image_root), cfg.shard_size,
                                       force)
        summary["shards"] = len(index["shards"]) if index else 0
    logger.info("CapFilt: %s", summary)
    return summary


def _process(filter_model, captioner, dataset, cfg: CapFiltConfig, plan, todo: List[int],
             seed: int, num_workers: int, out: Path, rank: int, ranker=None) -> None:
    from lavis_plugins.common.progress import progress

    device = next(filter_model.parameters()).device
    images_todo = sum(len(plan[b][0]) for b in todo)
    bar = progress(images_todo, f"capfilt rank {rank}", unit="image")
    t0, n_done = time.monotonic(), 0
    text_processor = getattr(dataset, "text_processor", None)
    with parts.PartWriter(out, rank) as writer:
        try:
            for b, batch in dataset.iter_batches(todo, plan, num_workers):
                records = []
                if batch["index"]:
                    records = process_batch(captioner, filter_model, batch["image"].to(device),
                                            batch["web"], cfg, batch_seed(seed, b),
                                            text_processor, ranker)
                anns = batch.get("annotation") or [None] * len(records)
                records = [dict(r, index=i, **({"annotation": a} if a is not None else {}))
                           for i, r, a in zip(batch["index"], records, anns)]
                for i, problem in batch["bad"]:  # counted in the report, logged one line each
                    logger.warning("CapFilt: sample %d skipped: %s", i, problem)
                    records.append({"index": i, "bad": problem, "candidates": [], "kept": []})
                writer.write(b, sorted(records, key=lambda r: r["index"]))
                n_done += len(plan[b][0])
                bar.update(len(plan[b][0]))
                bar.set_postfix(images_per_s=f"{n_done / max(time.monotonic() - t0, 1e-9):.2f}")
        finally:
            bar.close()


@registry.register_task("lp_capfilt")
class CapFiltTask(BaseTask):
    """CapFilt as a runner evaluation: writes the filtered captions, returns summary counts."""

    def __init__(self, cfg: CapFiltConfig, seed: int = 42, force: bool = False,
                 num_workers: int = 0) -> None:
        super().__init__()
        self.capfilt = cfg
        self.seed, self.force, self.num_workers = seed, force, num_workers
        self._captioner = None
        self._ranker = None

    @classmethod
    def setup_task(cls, cfg=None, **kwargs) -> "CapFiltTask":
        run = cfg.run_cfg
        return cls(CapFiltConfig.from_mapping(run.get("capfilt", None)),
                   seed=int(run.get("seed", 42)), force=bool(run.get("force", False)),
                   num_workers=int(run.get("num_workers", 0)))

    def build_datasets(self, cfg):
        datasets = super().build_datasets(cfg)
        if not any("input" in d for d in datasets.values()):
            raise UserError("lp_capfilt reads the lp_capfilt_input dataset (split input); add "
                            "it under datasets: and set run.test_splits: [input]")
        return datasets

    def evaluation(self, model, data_loader, **kwargs) -> Optional[Dict[str, Any]]:
        model = getattr(model, "module", model)
        dataset = data_loader.dataset
        if not hasattr(dataset, "entries"):
            raise UserError(f"lp_capfilt reads an lp_capfilt_input dataset, got "
                            f"{type(dataset).__name__}")
        device = next(model.parameters()).device
        if self._captioner is None:
            self._captioner = (build_captioner(self.capfilt, device) if self.capfilt.captioner
                               else model)
        if self._ranker is None and self.capfilt.ranker:
            from lavis_plugins.capfilt.clip_ranker import build_clip_ranker

            self._ranker = build_clip_ranker(self.capfilt.ranker, device)
        batch = int(getattr(data_loader, "batch_size", None) or 1)
        return run_capfilt(model, self._captioner, dataset, self.capfilt, batch, self.seed,
                           self.num_workers, self.force, self._ranker)

    def after_evaluation(self, val_result, split_name=None, epoch=None, **kwargs):
        return val_result
