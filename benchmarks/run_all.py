"""Every benchmark's default comparison, one after the other, then their tables (``make bench``).

    .venv/bin/python benchmarks/run_all.py               # all (about an hour on a 2-core CPU)
    .venv/bin/python benchmarks/run_all.py --only stage1_coco stage2
    .venv/bin/python benchmarks/run_all.py --list         # the commands, one per line

The LAVIS side of the model benchmarks runs in LAVIS's own environment (``make bench-env``) as
well as in ours; each command below is the one-liner that docs/benchmarks.md records beside its
figures. Record a run's output there with the date, machine and load average (``uptime``).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name -> script and options (each script's default comparison)
BENCHMARKS = {
    "stage1": ["bench_stage1.py"],
    "stage1_coco": ["bench_stage1.py", "--captions", "coco"],
    "stage1_full": ["bench_stage1.py", "--captions", "full"],
    "stage2": ["bench_stage2.py"],
    "feature_cache": ["bench_feature_cache.py"],
    "video_qa": ["bench_video_qa.py", "--threads", "1"],
    "video_decode": ["bench_video_decode.py"],
    "data": ["bench_data.py"],
}


def command(name: str) -> list:
    script, *opts = BENCHMARKS[name]
    return [sys.executable, str(HERE / script), *opts]


def last_table(output: str) -> str:
    """A script's result: what it printed after its last blank line before the end."""
    blocks = [b for b in output.strip().split("\n\n") if b.strip()]
    return blocks[-1] if blocks else "(no output)"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    p.add_argument("--list", action="store_true", help="print the commands and stop")
    args = p.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    if args.list:
        for n in names:
            print(f"{n}: .venv/bin/python benchmarks/{' '.join(BENCHMARKS[n])}")
        return 0
    summary, failed = [], []
    for n in names:
        print(f"== {n}: {' '.join(BENCHMARKS[n])} (load {load()})", flush=True)
        t0 = time.time()
        proc = subprocess.run(command(n), stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
        print(proc.stdout, flush=True)
        if proc.returncode:
            failed.append(n)
            summary.append(f"== {n}: failed (exit {proc.returncode})")
        else:
            summary.append(f"== {n} ({time.time() - t0:.0f} s, load after {load()})\n"
                           f"{last_table(proc.stdout)}")
    print("\n\n".join(["# summary"] + summary))
    if failed:
        print(f"run_all: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
