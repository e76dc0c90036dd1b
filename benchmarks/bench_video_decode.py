"""Frames/s of sparse uniform frame sampling: PyAV, torchcodec and decord backends vs LAVIS's
``load_video``.

    .venv/bin/python benchmarks/bench_video_decode.py                # all clips, n = 8 and 16
    .venv/bin/python benchmarks/bench_video_decode.py --reps 3 --sizes 360p

Generates H.264 clips (10 s at 30 fps: 360p and 720p, keyframe interval (GOP) 30 and 250) once
and caches them in ``--cache-dir``. Each measurement is one full call on a file, opening it
included: ``read_frames(path, n, "uniform", backend=...)`` for our backends (uint8 RGB frames)
and ``lavis.datasets.data_utils.load_video(path, n)`` for LAVIS (decord; float frames). Methods
run round-robin for ``--reps`` rounds after one warm-up call each; the figure is the fastest call
(other processes only ever add time, so on a shared machine the minimum is the stable statistic;
``--stat median`` reports medians). frames/s = n / seconds per call. The ratios are frames/s
over LAVIS's and over the fastest method on the same clip and n (1.00 = as fast).

Benchmarks are scripts, never timed tests: run it on a quiet machine and record the table in
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from lavis_plugins.video.synthetic import write_moving_video

SIZES = {"144p": (176, 144), "360p": (640, 360), "720p": (1280, 720)}
GOPS = (30, 250)
FPS = 30
SECONDS = 10


def clips(cache_dir: Path, sizes: List[str]) -> List[Tuple[str, Path]]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for size in sizes:
        w, h = SIZES[size]
        for gop in GOPS:
            path = cache_dir / f"clip_{size}_gop{gop}.mp4"
            if not path.exists():
                print(f"generating {path} ...", file=sys.stderr, flush=True)
                tmp = path.with_suffix(".part.mp4")
                write_moving_video(tmp, w, h, FPS * SECONDS, gop, fps=FPS)
                tmp.rename(path)
            out.append((f"{size} GOP {gop}", path))
    return out


LAVIS = "LAVIS load_video"


def methods() -> Dict[str, Callable[[str, int], object]]:
    from lavis.datasets.data_utils import load_video  # LAVIS's own loader (decord)

    from lavis_plugins.video.decode import read_frames

    from lavis_plugins.video.torchcodec_backend import torchcodec_problem

    out = {
        LAVIS: lambda p, n: load_video(p, n_frms=n),
        "pyav": lambda p, n: read_frames(p, n, "uniform", backend="pyav"),
        "decord": lambda p, n: read_frames(p, n, "uniform", backend="decord"),
    }
    if torchcodec_problem() is None:
        out["torchcodec"] = lambda p, n: read_frames(p, n, "uniform", backend="torchcodec")
    else:
        print(f"# torchcodec left out: {torchcodec_problem()}", file=sys.stderr)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", type=Path,
                    default=Path(tempfile.gettempdir()) / "lavis_plugins_bench_video")
    ap.add_argument("--sizes", nargs="+", default=["360p", "720p"], choices=list(SIZES))
    ap.add_argument("--n", nargs="+", type=int, default=[8, 16])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--stat", choices=["min", "median"], default="min")
    args = ap.parse_args(argv)

    todo = clips(args.cache_dir, args.sizes)
    fns = methods()
    import av
    import decord

    print(f"# host: {platform.machine()}, {os.cpu_count()} CPUs visible, load average "
          f"{os.getloadavg()[0]:.1f} at start; python {platform.python_version()}; av "
          f"{av.__version__} (libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))}), "
          f"decord {decord.__version__}")
    print(f"# frames/s from the {args.stat} wall time of {args.reps} calls (after 1 warm-up), "
          "open included; CPU = median process CPU time per call (all threads)")
    print()
    others = [m for m in fns if m != LAVIS]
    header = ("| clip | n | " + " | ".join(f"{m} frames/s (CPU ms)" for m in fns)
              + " | " + " | ".join(f"{m} / LAVIS" for m in others)
              + " | " + " | ".join(f"{m} / fastest" for m in fns) + " |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    worst = {m: (float("inf"), float("inf")) for m in fns}  # (min ratio vs LAVIS, vs fastest)
    for name, path in todo:
        for n in args.n:
            wall: Dict[str, List[float]] = {m: [] for m in fns}
            cpu: Dict[str, List[float]] = {m: [] for m in fns}
            for m, fn in fns.items():
                fn(str(path), n)  # warm-up: page cache, lazy imports
            for _ in range(args.reps):
                for m, fn in fns.items():  # round-robin, so slow phases of the machine hit all
                    t0, c0 = time.perf_counter(), time.process_time()
                    fn(str(path), n)
                    wall[m].append(time.perf_counter() - t0)
                    cpu[m].append(time.process_time() - c0)
            stat = min if args.stat == "min" else statistics.median
            fps = {m: n / stat(ts) for m, ts in wall.items()}
            best = max(fps.values())
            vs_lavis = {m: fps[m] / fps[LAVIS] for m in fns}
            vs_best = {m: fps[m] / best for m in fns}
            for m in fns:
                worst[m] = (min(worst[m][0], vs_lavis[m]), min(worst[m][1], vs_best[m]))
            cells = [f"{fps[m]:.1f} ({1000 * statistics.median(cpu[m]):.0f})" for m in fns]
            print(f"| {name} | {n} | " + " | ".join(cells) + " | "
                  + " | ".join(f"{vs_lavis[m]:.2f}" for m in others)
                  + " | " + " | ".join(f"{vs_best[m]:.2f}" for m in fns) + " |", flush=True)
    print()
    print(f"# load average at the end {os.getloadavg()[0]:.1f}")
    for m, (wl, wb) in worst.items():
        print(f"# {m}: lowest ratio vs LAVIS {wl:.2f}, lowest ratio vs fastest {wb:.2f}")


if __name__ == "__main__":
    main()
