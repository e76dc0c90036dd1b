"""What the GPU checks share: the device of a run, building models directly on it, keeping the
working directory (LAVIS's builders chdir to find "bert-base-uncased"), freeing memory between
models, and the benchmark scripts' option parsers at dry-run or GPU sizes."""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
from typing import Iterator, List

# the dry run's tiny stage-1/stage-2 sizes, as bench_stage1/bench_stage2 options
TINY_STAGE1 = ["--hidden", "64", "--layers", "2", "--vit-width", "64", "--vit-depth", "1",
               "--max-txt-len", "16"]
TINY_STAGE2 = ["--opt-layers", "2", "--opt-hidden", "64"]


def device(dry_run: bool) -> str:
    return "cpu" if dry_run else "cuda"


@contextlib.contextmanager
def building_on(dev: str) -> Iterator[None]:
    """Create tensors on ``dev`` by default: a real-size model is initialised on the GPU in
    seconds instead of on the CPU in minutes (a no-op on the CPU)."""
    import torch

    if dev == "cpu":
        yield
        return
    with torch.device(dev):
        yield


@contextlib.contextmanager
def keep_cwd() -> Iterator[None]:
    cwd = os.getcwd()
    try:
        yield
    finally:
        os.chdir(cwd)


def free() -> None:
    """Release the last model's memory before the next one is measured."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stage1_args(dry_run: bool, gpu: List[str], dry: List[str] = ()) -> argparse.Namespace:
    """bench_stage1's options: ``gpu`` on the GPU; tiny sizes and ``dry`` in a dry run."""
    import bench_stage1

    return bench_stage1.parse_args(["--device", device(dry_run),
                                    *(TINY_STAGE1 + list(dry) if dry_run else gpu)])


def stage2_args(dry_run: bool, gpu: List[str], dry: List[str] = ()) -> argparse.Namespace:
    """bench_stage2's options: ``gpu`` on the GPU; tiny sizes and ``dry`` in a dry run."""
    import bench_stage2

    return bench_stage2.parse_args(["--device", device(dry_run),
                                    *(TINY_STAGE2 + list(dry) if dry_run else gpu)])
