"""Issue #15's GPU check: every GPU goal measured in one run, each check in its own process with
its own time budget, results in one JSON file plus a log per check.

    bash benchmarks/gpu/run.sh                      # on the GPU machine (installs .whl/ first)
    python benchmarks/gpu/gpu_check.py --dry-run --out /tmp/gpu_dry   # here: CPU, tiny sizes

Checks (``--only`` picks some, by letter):
  a  correctness on CUDA: the stage-1/stage-2 parity tests' fp32 cases against LAVIS, bf16
     autocast losses vs fp32, fp16 + GradScaler steps (LAVIS issue 267: fp16 NaN)
  b  ``torchrun --nproc_per_node=1`` tiny stage-1 training through the CLI, and an NCCL collective
  c  real-size stage-1 training step, ours vs LAVIS, with and without cached encoder features
  d  real-size stage-2 training step (ViT-g + OPT-2.7B shapes) and batched generation
  e  zero-shot video QA end to end, 8 frames, real-size shapes, ours vs the LAVIS-built pipeline
  f  ``run.compile`` and ``run.strategy: fsdp`` through the CLI, where those keys exist

Output folder (``--out``; the device's $OUT brings back at most 8 files): ``results.json``
(rewritten after every check, so a run stopped midway keeps what finished) and ``check_<x>.log``
per check. A check that outlives its budget is killed with its whole process group; what it had
recorded so far stays in the JSON with status "timeout". ``--dry-run`` runs the same checks on the
CPU at tiny sizes (the default suite runs it, so the script cannot rot while no GPU is at hand).
``summary.py`` turns results.json into docs/benchmarks.md rows.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

GPU_DIR = Path(__file__).resolve().parent
REPO = GPU_DIR.parents[1]
for p in (str(REPO), str(REPO / "benchmarks"), str(GPU_DIR)):
    if p not in sys.path:
        sys.path.insert(0, p)

from _record import Record, write_json  # noqa: E402

# name -> (module, function, budget on the GPU in seconds, what it measures); run in this order.
# The budgets add up to 440 s (--total-s), so that with the wheel install and the import check
# run.sh stays under the 8 minutes the issue allows one device call.
CHECKS: Dict[str, tuple] = {
    "a": ("check_correctness", "check_a", 85, "CUDA correctness: parity fp32, bf16, fp16"),
    "b": ("check_launch", "check_b", 45, "torchrun 1 process, CLI stage-1 run, NCCL"),
    "c": ("check_speed", "check_c", 90, "stage-1 step, real size, ours vs LAVIS, cache"),
    "d": ("check_speed", "check_d", 110, "stage-2 step + generation, real size"),
    "e": ("check_speed", "check_e", 75, "zero-shot video QA, 8 frames, real size"),
    "f": ("check_launch", "check_f", 35, "run.compile and run.strategy: fsdp"),
}
GPU_TOTAL_S = 440.0
DRY_BUDGET_S = 300  # per check on a shared 2-core CPU; a quiet one takes well under a minute
DRY_TOTAL_S = DRY_BUDGET_S * len(CHECKS)
MIN_START_S = 10  # a check is not started with less time than this left


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        self.exit(2, f"gpu_check: {message}\n")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"),
                   help="folder for results.json and the logs (default $OUT)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, same code path")
    p.add_argument("--only", default="", help="comma-separated check letters (default: all)")
    p.add_argument("--total-s", type=float,
                   help="wall-clock limit of all checks together; budgets shrink to fit it "
                        f"(default {GPU_TOTAL_S:g}, dry run {DRY_TOTAL_S:g})")
    p.add_argument("--budget", action="append", default=[], metavar="X=SECONDS",
                   help="override one check's budget, e.g. --budget c=150")
    p.add_argument("--in-process", action="store_true",
                   help="run the checks in this process, without budgets (the test's dry run)")
    p.add_argument("--skip-parts", default="",
                   help="comma-separated parts of check f to skip (compile, fsdp): the default "
                        "suite's dry run skips compile, whose CPU compilation takes minutes")
    p.add_argument("--one", help=argparse.SUPPRESS)  # child: run this check
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)  # child: its JSON file
    args = p.parse_args(argv)
    from check_launch import PARTS  # the parts of check f

    args.skip_parts = [x.strip() for x in args.skip_parts.split(",") if x.strip()]
    if any(x not in PARTS for x in args.skip_parts):
        p.error(f"--skip-parts {','.join(args.skip_parts)!r}: the parts are {', '.join(PARTS)}")
    args.only = [x.strip() for x in args.only.split(",") if x.strip()] or list(CHECKS)
    unknown = [x for x in args.only if x not in CHECKS]
    if unknown:
        p.error(f"--only: unknown check {', '.join(unknown)}; the checks are "
                f"{', '.join(CHECKS)}")
    if args.total_s is None:
        args.total_s = DRY_TOTAL_S if args.dry_run else GPU_TOTAL_S
    elif args.total_s <= 0:
        p.error(f"--total-s {args.total_s:g}: must be > 0 seconds")
    args.budgets = {}
    for item in args.budget:
        name, _, secs = item.partition("=")
        try:
            value = float(secs)
        except ValueError:
            value = -1.0
        if name not in CHECKS or value <= 0:
            p.error(f"--budget {item!r}: expected X=SECONDS with X one of {', '.join(CHECKS)} "
                    "and SECONDS > 0, e.g. --budget c=150")
        args.budgets[name] = value
    return args


def check_function(name: str) -> Callable[[Record, bool], None]:
    module, func = CHECKS[name][:2]
    return getattr(importlib.import_module(module), func)


def environment() -> Dict[str, Any]:
    """What ran the checks: versions read from package metadata (no heavy imports here)."""
    from importlib import metadata

    versions = {}
    for dist in ("torch", "transformers", "tokenizers", "huggingface-hub", "salesforce-lavis",
                 "timm", "numpy", "decord", "av", "accelerate", "opencv-python-headless"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    env = {"python": platform.python_version(), "host": platform.node(), "versions": versions,
           "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        env["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        env["gpu"] = out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        env["gpu"] = None
    return env


def run_child(cmd: List[str], budget_s: float, log_path: Path, result_path: Path,
              env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Run one check's process for at most ``budget_s`` seconds, its output to ``log_path``;
    return what it recorded in ``result_path`` (partial if it was killed) with its status."""
    t0 = time.perf_counter()
    with open(log_path, "ab") as log:
        # a new session: the check's own children (torchrun, benchmark processes) die with it
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)
        try:
            proc.wait(timeout=budget_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            timed_out = True
    try:
        rec = json.loads(result_path.read_text())
    except (OSError, ValueError):
        rec = {}
    if timed_out:
        rec["status"] = "timeout"
        rec["error"] = f"killed after its budget of {budget_s:.0f} s"
    elif proc.returncode != 0 and rec.get("status", "ok") == "ok":
        rec["status"] = "failed"
        rec.setdefault("error", f"exit code {proc.returncode} (see {log_path.name})")
    rec.setdefault("status", "ok")
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    rec["budget_s"] = budget_s
    return rec


def run_in_process(name: str, dry_run: bool, result_path: Path) -> Dict[str, Any]:
    """The child's work, or the whole check in this process (``--in-process``)."""
    rec = Record(result_path)
    t0 = time.perf_counter()
    try:
        check_function(name)(rec, dry_run)
    except Exception as e:  # noqa: BLE001 - one check's failure must not lose the others
        traceback.print_exc()
        rec.fail(f"{type(e).__name__}: {e}".splitlines()[0][:500])
    rec.data.setdefault("status", "ok")
    rec.data["wall_s"] = round(time.perf_counter() - t0, 1)
    rec.flush()
    return rec.data


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.skip_parts:  # children inherit it; check f reads it
        from check_launch import SKIP_PARTS_ENV

        os.environ[SKIP_PARTS_ENV] = ",".join(args.skip_parts)
    if args.one:  # child process of one check
        data = run_in_process(args.one, args.dry_run, args.result)
        return 0 if data["status"] in ("ok", "skipped") else 1
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    results: Dict[str, Any] = {"dry_run": args.dry_run, "environment": environment(),
                               "checks": {}}
    write_json(out / "results.json", results)
    deadline = time.monotonic() + args.total_s
    # the children's own JSON files live outside --out, which comes back file by file
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    for name in args.only:
        what = CHECKS[name][3]
        budget = args.budgets.get(name, DRY_BUDGET_S if args.dry_run else CHECKS[name][2])
        left = deadline - time.monotonic()
        log_path, result_path = out / f"check_{name}.log", scratch / f"check_{name}.json"
        print(f"[gpu_check] {name}: {what} (budget {min(budget, left):.0f} s)", flush=True)
        if args.in_process:
            rec = run_in_process(name, args.dry_run, result_path)
        elif left < MIN_START_S:
            rec = {"status": "skipped", "reason": f"only {left:.0f} s of --total-s left"}
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name,
                   "--result", str(result_path)] + (["--dry-run"] if args.dry_run else [])
            rec = run_child(cmd, min(budget, left), log_path, result_path)
        result_path.unlink(missing_ok=True)
        rec["what"] = what
        results["checks"][name] = rec
        write_json(out / "results.json", results)
        print(f"[gpu_check] {name}: {rec['status']} in {rec.get('wall_s', 0):.0f} s"
              + (f" ({rec.get('error') or rec.get('reason')})"
                 if rec["status"] != "ok" else ""), flush=True)
    bad = [n for n, r in results["checks"].items() if r["status"] in ("failed", "timeout")]
    print(f"[gpu_check] results in {out / 'results.json'}; "
          + (f"not ok: {', '.join(bad)}" if bad else "every check ok or skipped"), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
