"""``lavis-plugins capfilt``: bootstrap captions with a captioner and a filter (task lp_capfilt).

    lavis-plugins capfilt --cfg-path projects/capfilt/blip2_coco.yaml [--shards DIR] [--force]
    torchrun --nproc_per_node=8 -m lavis_plugins.cli capfilt --cfg-path ...

A killed run continues where it stopped when started again with the same YAML and options.
"""
from __future__ import annotations

from typing import List


def capfilt_options(args) -> List[str]:
    """The ``--options`` this command adds to the YAML's."""
    extra = []
    if args.output:
        extra.append(f"run.capfilt.output={args.output}")
    if args.shards:
        extra.append(f"run.capfilt.shards={args.shards}")
    return list(args.options) + extra


def add_parsers(sub) -> None:
    """The ``capfilt`` sub-command."""
    p = sub.add_parser("capfilt", help="write synthetic captions, filter them with the web "
                                       "captions, keep the best (BLIP/BLIP-2 CapFilt)")
    p.add_argument("--cfg-path", required=True, help="lp_capfilt YAML (projects/capfilt/)")
    p.add_argument("--options", nargs="+", default=[],
                   help="overrides as key=value, e.g. run.capfilt.top_k=1")
    p.add_argument("--output", default=None, help="output folder (run.capfilt.output)")
    p.add_argument("--shards", default=None,
                   help="also write the kept captions as webdataset shards into this folder "
                        "(run.capfilt.shards)")
    p.add_argument("--job-id", default=None, help="runner log sub-folder name (default: time)")
    p.add_argument("--force", action="store_true",
                   help="replace an output folder of another or finished CapFilt run")
    p.set_defaults(func=_command)


def _command(args) -> int:
    from omegaconf import OmegaConf

    from lavis_plugins.cli.experiment import run
    from lavis_plugins.common.errors import UserError
    from lavis_plugins.paths import resolve_cfg_path

    path = resolve_cfg_path(args.cfg_path)
    try:
        task = (OmegaConf.load(path).get("run") or {}).get("task")
    except Exception as e:  # noqa: BLE001 - YAML syntax errors come in many types
        raise UserError(f"cannot parse {path}: {e}") from None
    if task != "lp_capfilt":
        raise UserError(f"{path}: run.task is {task!r}; `lavis-plugins capfilt` runs lp_capfilt "
                        "YAMLs (projects/capfilt/)")
    run(str(path), capfilt_options(args), evaluate_only=True, job_id=args.job_id,
        force=args.force)
    return 0
