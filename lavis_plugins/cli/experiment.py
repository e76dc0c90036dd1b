"""``lavis-plugins train|evaluate|cache-features``: YAML-driven runs, in one process or under
torchrun.

LAVIS's ``train.py``/``evaluate.py`` are not in its wheel; this replaces them, with the plugin
imported first (so its names are registered) and the same YAML structure (model/datasets/run).
"""
from __future__ import annotations

import argparse
import os
import random
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

from lavis_plugins.cli.run_options import run_options_help
from lavis_plugins.common.errors import UserError, unknown_name


def _check_options(options: List[str],
                   example: str = "run.max_epoch=1 model.max_txt_len=32") -> None:
    for opt in options:
        if "=" not in opt or opt.startswith("="):
            raise UserError(f"--options takes key=value pairs; got {opt!r} "
                            f"(e.g. --options {example})")


def model_options(options: Optional[List[str]],
                  example: str = "vit_path=/weights/eva_vit_g.pth max_txt_len=32",
                  ) -> Dict[str, Any]:
    """``--options key=value ...`` of the model commands (predict, export) as a config dict
    (dotted keys nest; values read as YAML scalars), each checked as ``train``'s are."""
    from omegaconf import OmegaConf

    _check_options(list(options or []), example)
    return OmegaConf.to_container(OmegaConf.from_dotlist(list(options or [])), resolve=True)


def load_config(cfg_path: str, options: List[str]):
    """LAVIS's ``Config`` for ``cfg_path`` + ``options``, after checking every name it refers to.

    LAVIS fails on a bad name deep inside (``NoneType has no attribute default_config_path``);
    here each registered name, type and file is checked first and reported with the choices.
    """
    from lavis.common.config import Config
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    from lavis_plugins.common.config_check import check_dataset, check_run, check_top_level
    from lavis_plugins.paths import resolve_cfg_path

    _check_options(options)
    path = resolve_cfg_path(cfg_path)
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - YAML syntax errors come in many types
        raise UserError(f"cannot parse {path}: {e}") from e
    try:
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(options))
    except Exception as e:  # noqa: BLE001 - omegaconf merge errors (e.g. key into a scalar)
        raise UserError(f"--options {' '.join(options)}: cannot apply to {path}: "
                        f"{str(e).splitlines()[0]}") from None
    check_top_level(raw)
    for key in ("model", "run"):
        if key not in raw:
            raise UserError(f"{path} has no '{key}:' section "
                            "(LAVIS YAMLs need model, datasets, run)")
    check_run(raw.run)
    arch = raw.model.get("arch")
    model_cls = registry.get_model_class(arch)
    if model_cls is None:
        raise unknown_name("model.arch", arch, registry.mapping["model_name_mapping"],
                           "List them with `lavis-plugins zoo`.")
    mtype = raw.model.get("model_type")
    types = getattr(model_cls, "PRETRAINED_MODEL_CONFIG_DICT", {})
    if mtype not in types:
        raise unknown_name(f"model.model_type of {arch!r}", mtype, types)
    if not Path(model_cls.default_config_path(mtype)).is_file():
        raise UserError(f"default config of {arch}/{mtype} is missing: "
                        f"{model_cls.default_config_path(mtype)}")
    datasets = raw.get("datasets") or {}
    if not datasets and not raw.run.get("evaluate", False) and raw.run.get("train_splits"):
        raise UserError(f"{path} has no datasets but run.train_splits is set")
    for ds_name, ds_cfg in datasets.items():
        builder = registry.get_builder_class(ds_name)
        if builder is None:
            raise unknown_name("dataset", ds_name, registry.mapping["builder_name_mapping"])
        ds_type = (ds_cfg or {}).get("type", "default")
        if ds_type not in builder.DATASET_CONFIG_DICT:
            raise unknown_name(f"type of dataset {ds_name!r}", ds_type, builder.DATASET_CONFIG_DICT)
        if hasattr(builder, "default_section"):  # a builder registered under several names
            defaults = builder.default_section()
        else:
            defaults = OmegaConf.load(
                builder.default_config_path(ds_type)).datasets.get(ds_name, {})
        check_dataset(ds_name, ds_cfg, defaults)
    task = raw.run.get("task")
    training = not raw.run.get("evaluate", False) and raw.run.get("train_splits")
    if training and raw.run.get("init_lr") is None:
        raise UserError(f"{path}: run.init_lr is not set; training needs a learning rate "
                        "(e.g. run.init_lr: 1e-4)")
    if registry.get_task_class(task) is None:
        raise unknown_name("run.task", task, registry.mapping["task_name_mapping"])
    runner = raw.run.get("runner", "lp_runner")
    if registry.get_runner_class(runner) is None:
        raise unknown_name("run.runner", runner, registry.mapping["runner_name_mapping"])
    if "datasets" not in raw:
        raw.datasets = {}
    # LAVIS's Config reads the YAML from disk itself: hand it the checked file
    cfg = Config(argparse.Namespace(cfg_path=str(path), options=list(options)))
    if "datasets" not in cfg.config:  # LAVIS drops an empty datasets: section
        cfg.config.datasets = {}
    _check_data_paths(cfg)
    return cfg


def _check_data_paths(cfg) -> None:
    """Every annotation/storage path a LAVIS-style dataset config names must exist (LAVIS would
    otherwise try to download it, which cannot work offline). Builders of this plugin check
    their own paths (and may generate data), so they are skipped here."""
    from lavis.common.registry import registry
    from lavis.common.utils import get_cache_path

    for name, ds in (cfg.datasets_cfg or {}).items():
        if registry.get_builder_class(name).__module__.startswith("lavis_plugins."):
            continue
        info = ds.get("build_info", {}) or {}
        for split, ann in (info.get("annotations", {}) or {}).items():
            storages = ann.get("storage", [])
            for s in [storages] if isinstance(storages, str) else storages:
                p = s if os.path.isabs(s) else get_cache_path(s)
                if not os.path.exists(p):
                    raise UserError(
                        f"dataset {name!r}: annotation file for split {split!r} not found: {p}. "
                        f"Set datasets.{name}.build_info.annotations.{split}.storage to a local "
                        "file (no downloads happen here).")
        for kind in ("images", "videos"):
            store = (info.get(kind, {}) or {}).get("storage")
            if store:
                p = store if os.path.isabs(store) else get_cache_path(store)
                if not os.path.exists(p):
                    raise UserError(f"dataset {name!r}: {kind} folder not found: {p}. Set "
                                    f"datasets.{name}.build_info.{kind}.storage.")


def _weights_paths(cfg) -> List[str]:
    """The weights files a model config names (for messages)."""
    m = cfg.model_cfg
    return [str(m[k]) for k in ("pretrained", "finetuned", "stage1_checkpoint", "vit_path")
            if m.get(k)]


def _setup_seeds(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fresh_job_id(output_root: Path) -> str:
    """A job id (the run folder's name under ``run.output_dir``) from the time to the second,
    with ``-2``, ``-3``... when a run started in the same second already took that folder
    (a second run would otherwise be refused as "already holds a finished run")."""
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    job_id, n = stamp, 1
    while (output_root / job_id).exists():
        n += 1
        job_id = f"{stamp}-{n}"
    return job_id


def run(cfg_path: str, options: List[str], evaluate_only: bool, job_id: Optional[str] = None,
        force: bool = False):
    """Build task, datasets, model and runner from the YAML and train or evaluate.

    ``force`` replaces a previous run in the ``output_dir/job_id`` folder (otherwise refused).
    """
    import lavis_plugins

    lavis_plugins.register()  # before the config is read (the console script defers it)
    from lavis.common.logger import setup_logger
    from lavis.common.registry import registry
    from lavis.tasks import setup_task

    from lavis_plugins.common import dist as dist_utils
    from lavis_plugins.common.safe_load import weights_only_loads

    opts = list(options) + (["run.evaluate=True"] if evaluate_only else []) + (
        ["run.force=True"] if force else [])
    cfg = load_config(cfg_path, opts)
    run_cfg = cfg.run_cfg
    info = dist_utils.init_distributed(
        run_cfg.get("device", "auto"),
        join_timeout_s=float(run_cfg.get("dist_timeout_s", dist_utils.DEFAULT_JOIN_TIMEOUT_S)))
    run_cfg.distributed = info.distributed
    run_cfg.rank, run_cfg.world_size, run_cfg.gpu = info.rank, info.world_size, info.local_rank
    run_cfg.device = info.device
    run_cfg.dist_backend = info.backend
    setup_logger()
    _setup_seeds(int(run_cfg.get("seed", 42)) + info.rank)
    if job_id is None:
        job_id = fresh_job_id(Path(str(run_cfg.get("output_dir", "output"))).expanduser())
        if info.distributed:  # every rank must write into the same folder
            job_id = dist_utils.all_gather_object(job_id)[0]
    task = setup_task(cfg)
    datasets = task.build_datasets(cfg) if len(cfg.datasets_cfg) else {}
    with weights_only_loads(_weights_paths(cfg)):  # LAVIS's own models unpickle fully
        model = task.build_model(cfg)
    runner_cls = registry.get_runner_class(run_cfg.get("runner", "lp_runner"))
    runner = runner_cls(cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets)
    if evaluate_only:
        finish = getattr(runner, "finish", None)  # lp_runner: mark the folder, free its lock
        completed = False
        try:
            result = runner.evaluate(skip_reload=True)
            completed = True
        finally:
            if finish is not None:
                finish(completed)
    else:
        result = runner.train()
    if dist_utils.is_main_process():
        from lavis_plugins.runners.reporting import format_metrics_table

        table = format_metrics_table(result if isinstance(result, dict) else None)
        if table:
            print(table, flush=True)
        print(f"lavis-plugins: output in {runner.output_dir}", flush=True)
    return runner, result


def cache_features(cfg_path: str, options: List[str], split: str = "train") -> List[Path]:
    """Build the feature cache of every dataset in the YAML that names one (``feature_cache``)."""
    import lavis_plugins

    lavis_plugins.register()
    from lavis.tasks import setup_task
    from lavis.tasks.base_task import BaseTask

    from lavis_plugins.common import dist as dist_utils
    from lavis_plugins.common.feature_cache import build_feature_cache, cache_views
    from lavis_plugins.common.safe_load import weights_only_loads

    cfg = load_config(cfg_path, list(options))
    wanted = {n: d.feature_cache for n, d in cfg.datasets_cfg.items() if d.get("feature_cache")}
    if not wanted:
        raise UserError(f"no dataset in {cfg_path} sets feature_cache: <folder>")
    seed = int(cfg.run_cfg.get("seed", 42))
    _setup_seeds(seed)  # as `train` does: same random init, if any
    task = setup_task(cfg)
    # LAVIS's plain dataset building: the plugin's task would read the cache being built
    datasets = BaseTask.build_datasets(task, cfg)
    with weights_only_loads(_weights_paths(cfg)):
        model = BaseTask.build_model(task, cfg)
    device = dist_utils.choose_device(cfg.run_cfg.get("device"))
    out = []
    for name, folder in wanted.items():
        if split not in datasets[name]:
            raise UserError(f"dataset {name!r} has no split {split!r}: {sorted(datasets[name])}")
        out.append(build_feature_cache(
            model.visual_encoder, datasets[name][split], folder,
            image_size=int(cfg.model_cfg.get("image_size", 224)),
            batch_size=int(cfg.run_cfg.get("batch_size_eval") or 32), device=device,
            views=cache_views(cfg.datasets_cfg[name], name), seed=seed))
        print(f"lavis-plugins: cached {name}/{split} encoder features in {folder}", flush=True)
    return out


def add_parsers(sub) -> None:
    """The ``train``, ``evaluate`` and ``cache-features`` sub-commands."""
    for name, help_ in (("train", "train (and evaluate) as the YAML says"),
                        ("evaluate", "evaluate only (run.evaluate=True)")):
        p = sub.add_parser(name, help=help_, epilog=run_options_help(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--cfg-path", required=True, help="experiment YAML (model/datasets/run)")
        p.add_argument("--options", nargs="+", default=[],
                       help="overrides as key=value in dot notation, e.g. run.max_epoch=1")
        p.add_argument("--job-id", default=None, help="output sub-folder name (default: time)")
        p.add_argument("--force", action="store_true",
                       help="replace a previous run in the output_dir/job-id folder (without it "
                            "such a folder is refused, unless resuming into it)")
        p.set_defaults(func=_run_command)
    p = sub.add_parser("cache-features",
                       help="pre-compute the frozen image encoder's outputs of each dataset that "
                            "sets feature_cache: <folder> in the YAML")
    p.add_argument("--cfg-path", required=True)
    p.add_argument("--options", nargs="+", default=[])
    p.add_argument("--split", default="train")
    p.set_defaults(func=_cache_command)


def _cache_command(args) -> int:
    cache_features(args.cfg_path, args.options, args.split)
    return 0


def _run_command(args) -> int:
    run(args.cfg_path, args.options, evaluate_only=args.command == "evaluate", job_id=args.job_id,
        force=args.force)
    return 0
