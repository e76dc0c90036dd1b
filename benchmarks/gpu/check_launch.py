"""Checks b and f: training runs launched as a user launches them, through the CLI.

b. ``torchrun --nproc_per_node=1 -m lavis_plugins.cli train`` of a tiny stage-1 model
   (lp_blip2_qformer ``tiny``) on CUDA with amp, reading webdataset shards that
   ``lavis-plugins make-shards`` writes from generated images (the shapes dataset needs PyAV,
   which the GPU machine lacks); then an NCCL process group of one rank runs all_reduce and
   all_gather. Our ``common/dist.py`` makes no process group at WORLD_SIZE=1, so the torchrun
   run itself does not touch NCCL: the collective does.
f. ``run.compile: true`` (one process) and ``run.strategy: fsdp`` (torchrun, one process) on the
   same tiny run, each only where ``common/config_check`` knows the key (both are being built on
   other branches); otherwise the part is skipped with the checker's own message.

Every run must exit 0 and log finite losses for every step. The dry run does the same on the CPU
(no amp, gloo instead of NCCL).
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from _gpu_common import device

ITERS = 4
BATCH = 8
IMAGES = 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_run_inputs(root: Path) -> Dict[str, Path]:
    """A tiny BERT and webdataset shards of ``IMAGES`` random 64 px images with captions."""
    import numpy as np
    from PIL import Image

    from _bench_common import captions
    from lavis_plugins.cli import main as cli_main
    from lavis_plugins.common.tiny_bert import make_tiny_bert

    bert = make_tiny_bert(root / "bert")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(IMAGES):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            images / f"{i}.png")
    ann = root / "ann.json"
    ann.write_text(json.dumps([{"image": f"{i}.png", "caption": c}
                               for i, c in enumerate(captions(IMAGES))]))
    code = cli_main(["make-shards", "--ann", str(ann), "--images", str(images),
                     "--out", str(root / "shards"), "--shard-size", "16"])
    if code:
        raise RuntimeError(f"make-shards exited {code}")
    return {"bert": bert, "shards": root / "shards"}


def write_config(root: Path, inputs: Dict[str, Path], dev: str, name: str) -> Path:
    import yaml

    cfg = {
        "model": {"arch": "lp_blip2_qformer", "model_type": "tiny",
                  "bert_path": str(inputs["bert"]), "image_size": 64},
        "datasets": {"lp_webdataset_caption": {
            "build_info": {"shards": str(inputs["shards"])},
            "vis_processor": {"train": {"name": "blip_image_eval", "image_size": 64}}}},
        "run": {"task": "lp_image_text_pretrain", "runner": "lp_runner",
                "lr_sched": "lp_linear_warmup_cosine", "init_lr": 1e-4, "min_lr": 1e-5,
                "warmup_steps": 2, "weight_decay": 0.05, "max_epoch": 1,
                "iters_per_epoch": ITERS, "batch_size_train": BATCH, "batch_size_eval": BATCH,
                "num_workers": 0, "log_freq": 1, "seed": 42, "device": dev,
                "amp": dev.startswith("cuda"), "output_dir": str(root / f"out_{name}"),
                "train_splits": ["train"], "valid_splits": [], "test_splits": []},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_train(cfg: Path, root: Path, torchrun: bool, options: List[str]) -> Dict[str, Any]:
    """``lavis-plugins train`` (under torchrun with one process when ``torchrun``): exit code,
    wall seconds and the logged losses."""
    cli = ["-m", "lavis_plugins.cli", "train", "--cfg-path", str(cfg)]
    cli += ["--options", *options] if options else []
    launch = ["-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
              f"--master_port={_free_port()}"] if torchrun else []
    cmd = [sys.executable, *launch, *cli]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    print(" ".join(cmd), proc.stdout[-6000:], proc.stderr[-6000:], sep="\n", flush=True)
    logs = sorted((root / f"out_{cfg.stem}").glob("*/train_log.jsonl"))
    rows = [json.loads(x) for x in logs[-1].read_text().splitlines()] if logs else []
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"command": " ".join(cmd[1:]), "exit_code": proc.returncode, "wall_s": round(wall, 1),
            "steps_logged": len(losses), "losses": losses,
            "ok": proc.returncode == 0 and len(losses) == ITERS
            and all(math.isfinite(x) for x in losses),
            "last_error_line": (proc.stderr.strip().splitlines() or [""])[-1][:300]}


def collective(dev: str) -> Dict[str, Any]:
    """One-rank process group (NCCL on CUDA, gloo on the CPU): all_reduce and all_gather."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if dev.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    try:
        x = torch.arange(4.0, device=dev)
        dist.all_reduce(x)
        gathered = [torch.zeros(4, device=dev)]
        dist.all_gather(gathered, x)
        ok = torch.equal(gathered[0].cpu(), torch.arange(4.0))
    finally:
        dist.destroy_process_group()
    return {"backend": backend, "all_reduce_all_gather_ok": bool(ok)}


def check_b(rec, dry_run: bool) -> None:
    dev = device(dry_run)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs = make_run_inputs(root)
        res = rec.put("torchrun_1proc", run_train(write_config(root, inputs, dev, "b"), root,
                                                  torchrun=True, options=[]))
    if not res["ok"]:
        rec.fail(f"torchrun stage-1 run: exit {res['exit_code']}, {res['steps_logged']} of "
                 f"{ITERS} steps logged ({res['last_error_line']})")
    res = rec.put("collective", collective(dev))
    if not res["all_reduce_all_gather_ok"]:
        rec.fail(f"{res['backend']} all_reduce/all_gather gave wrong values")


# f's parts: the run: option each needs, and whether it runs under torchrun
PARTS = {"compile": ({"compile": True}, False), "fsdp": ({"strategy": "fsdp"}, True)}
SKIP_PARTS_ENV = "LP_GPU_CHECK_SKIP_PARTS"  # set by gpu_check --skip-parts


def check_f(rec, dry_run: bool) -> None:
    from lavis_plugins.common.config_check import check_run
    from lavis_plugins.common.errors import UserError

    dev = device(dry_run)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs = None
        skipped = os.environ.get(SKIP_PARTS_ENV, "").split(",")
        for part, (option, torchrun) in PARTS.items():
            if part in skipped:
                rec.put(part, {"status": "skipped", "reason": "gpu_check --skip-parts"})
                continue
            try:
                check_run(option)
            except UserError as e:  # the key has not landed on this branch
                rec.put(part, {"status": "skipped", "reason": str(e).splitlines()[0][:200]})
                continue
            inputs = inputs or make_run_inputs(root)
            options = [f"run.{k}={str(v).lower() if isinstance(v, bool) else v}"
                       for k, v in option.items()]
            res = run_train(write_config(root, inputs, dev, part), root, torchrun, options)
            res["status"] = "ok" if res["ok"] else "failed"
            rec.put(part, res)
            if not res["ok"]:
                rec.fail(f"{part}: exit {res['exit_code']}, {res['steps_logged']} of {ITERS} "
                         f"steps logged ({res['last_error_line']})")
    if all(rec.data[p]["status"] == "skipped" for p in PARTS):
        rec.skip("neither run.compile nor run.strategy is a known run: key on this branch")
