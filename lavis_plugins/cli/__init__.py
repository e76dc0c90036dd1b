"""``lavis-plugins``: train, evaluate and list models, in one process or under torchrun.

    lavis-plugins train    --cfg-path projects/demo/stage1.yaml [--options run.max_epoch=2 ...]
    lavis-plugins evaluate --cfg-path projects/blip2/eval/vqav2_zeroshot_opt2.7b.yaml
    lavis-plugins cache-features --cfg-path X   # frozen-encoder outputs for feature_cache datasets
    lavis-plugins predict  --model lp_blip2_opt --model-type X --checkpoint Y --image A.jpg
    lavis-plugins make-shards --ann X.json --images DIR --out DIR --shard-size N
    lavis-plugins capfilt  --cfg-path projects/capfilt/blip2_coco.yaml   # CapFilt captions
    lavis-plugins interpolate --zero-shot A.pth --finetuned B.pth --alpha 0.0,0.1,...,1.0 --out D
    lavis-plugins zoo      # LAVIS's and the plugin's models
    lavis-plugins names    # the names this plugin registered
    lavis-plugins convert --trust old.pth new.pth   # a trusted pickled file -> weights-only
    lavis-plugins projects # the shipped experiment YAMLs
    lavis-plugins export   --checkpoint X --out DIR   # to a transformers folder + LAVIS .pth
    torchrun --nproc_per_node=2 -m lavis_plugins.cli train --cfg-path ...

Each sub-command lives in its own module of this package, which exposes ``add_parsers(sub)``
(adding its parsers with ``set_defaults(func=...)``); heavy imports stay inside the functions, so
building the parser (and ``--help``) imports neither LAVIS nor torch. The plugin is registered into
LAVIS just before a command runs, unless its parser sets ``registers=False``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

from lavis_plugins.common.errors import UserError

# one module per group of sub-commands, in the order ``--help`` lists them
COMMAND_MODULES = (
    "lavis_plugins.cli.experiment",
    "lavis_plugins.cli.predict",
    "lavis_plugins.cli.info",
    "lavis_plugins.cli.convert",
    "lavis_plugins.cli.export",
    "lavis_plugins.cli.make_shards",
    "lavis_plugins.cli.interpolate",
    "lavis_plugins.cli.capfilt",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lavis-plugins", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parsers(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    finished = False
    try:
        if getattr(args, "registers", True):
            import lavis_plugins

            lavis_plugins.register()
        rc = args.func(args)
        finished = True
        return int(rc or 0)
    except UserError as e:
        print(f"lavis-plugins: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        _shut_down_process_group(finished)


# how long a finished rank waits for the others at exit before it leaves anyway
EXIT_BARRIER_SECONDS = 120


def _shut_down_process_group(finished: bool) -> None:
    """Destroy the process group a command used, if any (importing torch here would cost light
    commands seconds). After a command that finished, a gloo group first waits for every rank:
    torch < 2.8's gloo destructor joins its worker threads while holding the GIL, and a worker
    still freeing the last collective's tensors needs the GIL (pytorch#56297, fixed by
    pytorch#154976): a rank of a finished 2-process run hung at exit that way. The barrier waits
    without the GIL, so the workers finish first. It is bounded (``monitored_barrier``), and a
    failed command skips it: its peers may be inside another collective."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is None or not dist.is_available() or not dist.is_initialized():
            return
        if finished and dist.get_backend() == "gloo":
            from datetime import timedelta

            try:
                dist.monitored_barrier(timeout=timedelta(seconds=EXIT_BARRIER_SECONDS))
            except Exception:  # noqa: BLE001 - a peer gone or late: leave without it
                logging.getLogger(__name__).warning(
                    "not every rank reached the end of the run within %d s; leaving without them",
                    EXIT_BARRIER_SECONDS)
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - shutting down; nothing useful to report
        logging.getLogger(__name__).debug("process group shutdown failed", exc_info=True)


def __getattr__(name: str):
    # ``from lavis_plugins.cli import run, load_config, cache_features`` (the run module's API)
    if name in ("run", "load_config", "cache_features"):
        return getattr(importlib.import_module("lavis_plugins.cli.experiment"), name)
    raise AttributeError(name)
