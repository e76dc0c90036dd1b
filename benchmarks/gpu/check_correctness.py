"""Check a: correctness on CUDA.

1. The stage-1 and stage-2 parity tests' fp32 cases against LAVIS (``tests/test_stage1_parity.py``,
   ``tests/test_stage2_parity.py``, ``-k "equal_lavis or equals_lavis"``) run by pytest with
   ``--device cuda``: ours and LAVIS's models on the GPU, LAVIS's fp16 ``maybe_autocast`` off.
   The dry run collects them only (the default suite runs them on the CPU).
2. bf16 autocast vs fp32: lp_blip2_qformer's stage-1 losses (bench_stage1's small config, eval
   mode, hardest negatives instead of sampled ones) under bf16 autocast within ``BF16_TOL`` of
   fp32 for ITC and ITG (ITM is recorded: a near tie can pick another hard negative).
3. fp16 + GradScaler: ``FP16_STEPS`` training steps of ours and of LAVIS's Blip2Qformer with the
   EVA ViT-g (random weights, fp16) and fp16 autocast with loss scaling, as LAVIS's runner trains
   (``_bench_common.train_step``); every loss must be finite. LAVIS issue 267 saw the stage-1
   LM loss go to inf within a few iterations with the Q-Former itself in fp16 (DeepSpeed);
   autocast keeps fp32 master weights, softmax and norms, which is what this checks holds for
   ours, on the real fp16 encoder's features. The dry run uses the tiny fp32 encoder and no
   autocast (the CPU has no fp16 training).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from _gpu_common import building_on, device, free, keep_cwd, stage1_args

REPO = Path(__file__).resolve().parents[2]
PARITY_FILES = ["tests/test_stage1_parity.py", "tests/test_stage2_parity.py"]
PARITY_K = "equal_lavis or equals_lavis"  # the fp32 forward/gradient/generation cases
PARITY_MIN = 12  # the cases that -k selects today; fewer means the selection went stale
BF16_TOL = 0.02  # |bf16 - fp32| <= BF16_TOL * max(1, |fp32|): bf16 keeps ~3 significant digits
FP16_STEPS = 8
BATCH = 8


def check_a(rec, dry_run: bool) -> None:
    parity(rec, dry_run)
    bf16_vs_fp32(rec, dry_run)
    fp16_steps(rec, dry_run)


class _Collected:
    """A pytest plugin that keeps the ids a session collected."""

    def __init__(self) -> None:
        self.ids: list = []

    def pytest_collection_finish(self, session) -> None:
        self.ids = [item.nodeid for item in session.items]


def _collect_in_process(args: list) -> tuple:
    """``pytest --collect-only`` in this process, from the repository root: (exit code, the
    collected ids). A fresh interpreter would spend its time importing LAVIS (about 17 s of
    CPU); the collection is the same."""
    import pytest

    plugin = _Collected()
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        code = pytest.main([*args, "--collect-only"], plugins=[plugin])
    finally:
        os.chdir(cwd)
    return int(code), plugin.ids


def parity(rec, dry_run: bool) -> None:
    """pytest on the parity files with ``--device``; the dry run only collects them (the default
    suite runs the CPU cases itself), in this process, to check that the option and the
    selection still work."""
    args = ["-q", "-rf", "-p", "no:cacheprovider", "--device", device(dry_run), "-k", PARITY_K,
            *PARITY_FILES]
    cmd = [sys.executable, "-m", "pytest", *args]
    if dry_run:
        code, ids = _collect_in_process(args)
        print("\n".join(ids), flush=True)
        res = {"command": " ".join(cmd[1:] + ["--collect-only"]), "exit_code": code,
               "collected": len(ids)}
        rec.put("parity_fp32", res)
        if code != 0 or len(ids) < PARITY_MIN:
            rec.fail(f"parity fp32 on {device(dry_run)}: exit {code}, {len(ids)} cases "
                     f"collected (expected >= {PARITY_MIN})")
        return
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(proc.stdout[-20000:], proc.stderr[-5000:], sep="\n", flush=True)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?)", proc.stdout)}
    res = {"command": " ".join(cmd[1:]), "exit_code": proc.returncode,
           "passed": counts.get("passed", 0),
           "failed": counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0),
           "failed_tests": re.findall(r"^FAILED (\S+)", proc.stdout, re.M)}
    rec.put("parity_fp32", res)
    if proc.returncode != 0 or res["passed"] < PARITY_MIN:
        rec.fail(f"parity fp32 on {device(dry_run)}: exit {proc.returncode}, {res['passed']} "
                 f"cases passed (expected >= {PARITY_MIN})")


def _samples(batch: int, dev: str):
    import torch

    from _bench_common import captions

    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(batch, 3, 224, 224, generator=g).to(dev),
            "text_input": captions(batch)}


def bf16_vs_fp32(rec, dry_run: bool) -> None:
    import torch

    import bench_stage1

    dev = device(dry_run)
    ns = stage1_args(dry_run, [])  # the small config: fp32 weights, tiny encoder
    ns.impl = "ours"
    with tempfile.TemporaryDirectory() as tmp, keep_cwd():
        bert = bench_stage1.make_bert(ns, Path(tmp))
        with building_on(dev):
            model = bench_stage1.build(ns, bert).to(dev).eval()
    samples = _samples(BATCH, dev)
    hardest = torch.multinomial  # the hardest negative, the same one in both precisions
    torch.multinomial = lambda w, n, *a, **k: w.argmax(-1, keepdim=True)
    try:
        with torch.no_grad():
            ref = model(dict(samples))
            with torch.autocast(dev, dtype=torch.bfloat16):
                low = model(dict(samples))
    finally:
        torch.multinomial = hardest
    names = ("loss_itc", "loss_itm", "loss_itg")
    fp32 = torch.stack([getattr(ref, n).float() for n in names]).tolist()
    bf16 = torch.stack([getattr(low, n).float() for n in names]).tolist()
    diffs = {n: abs(a - b) / max(1.0, abs(a)) for n, a, b in zip(names, fp32, bf16)}
    rec.put("bf16_vs_fp32", {"fp32": dict(zip(names, fp32)), "bf16": dict(zip(names, bf16)),
                             "relative_diff": diffs, "tolerance": BF16_TOL,
                             "checked": ["loss_itc", "loss_itg"], "batch": BATCH})
    bad = [n for n in ("loss_itc", "loss_itg") if not diffs[n] <= BF16_TOL]
    if bad:
        rec.fail(f"bf16 autocast: {', '.join(bad)} differ from fp32 by more than "
                 f"{BF16_TOL:g} (relative)")
    del model
    free()


def fp16_steps(rec, dry_run: bool) -> None:
    import torch

    import bench_stage1
    from _bench_common import train_step

    dev = device(dry_run)
    ns = stage1_args(dry_run, [])
    steps = 2 if dry_run else FP16_STEPS
    out = {"steps": steps, "batch": BATCH,
           "precision": "fp32 (dry run)" if dry_run else "ViT-g fp16 weights, fp16 autocast, "
                                                         "GradScaler"}
    with tempfile.TemporaryDirectory() as tmp:
        with keep_cwd():
            bert = bench_stage1.make_bert(ns, Path(tmp))  # the small Q-Former
        ns.real_size = not dry_run  # bench_stage1's real-size encoder: EVA ViT-g, fp16
        for impl in ("ours", "lavis"):
            ns.impl = impl
            torch.manual_seed(0)
            with keep_cwd(), building_on(dev):
                model = bench_stage1.build(ns, bert).to(dev)
            model.train()
            step = train_step(model, _samples(BATCH, dev), amp=not dry_run)
            losses = torch.stack([step().detach().float() for _ in range(steps)]).tolist()
            finite = all(x == x and abs(x) != float("inf") for x in losses)
            out[impl] = {"losses": losses, "all_finite": finite}
            rec.put("fp16_gradscaler", out)
            if not finite:
                rec.fail(f"fp16 + GradScaler: {impl} gave a non-finite loss in {steps} "
                         "steps")
            del model, step
            free()
