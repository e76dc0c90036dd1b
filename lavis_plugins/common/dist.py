"""Process-group set-up that works on CPU (gloo) and GPU (NCCL), in one process or under torchrun.

LAVIS's ``init_distributed_mode`` hard-codes NCCL and ``torch.cuda.set_device``, so it cannot run
on CPU, and its helpers assume a process group exists. These do not.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass
class DistInfo:
    distributed: bool  # True under torchrun/SLURM with world size > 1
    rank: int
    world_size: int
    local_rank: int
    backend: str  # "nccl", "gloo" or "none"
    device: str  # "cuda:<local_rank>" or "cpu"


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """``dist.barrier()`` when a process group exists; nothing in a single process."""
    if is_initialized() and get_world_size() > 1:
        dist.barrier()


def choose_device(requested: str | None) -> str:
    """``"auto"``/None -> cuda if available else cpu; ``"cuda"`` without a GPU falls back to cpu."""
    req = (requested or "auto").lower()
    if req == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if req.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("run.device is %r but no CUDA device is visible: running on the CPU", req)
        return "cpu"
    return req


def init_distributed(requested_device: str | None = "auto", timeout_min: int = 30) -> DistInfo:
    """Initialise ``torch.distributed`` from torchrun's environment, if there is one.

    Backend: NCCL when running on CUDA, gloo on CPU. In a plain process (no ``WORLD_SIZE`` or
    ``WORLD_SIZE=1``) no process group is created.
    """
    device = choose_device(requested_device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return DistInfo(False, 0, 1, 0, "none", device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        backend = "gloo"
    if not is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", world_size=world,
                                rank=rank, timeout=datetime.timedelta(minutes=timeout_min))
    return DistInfo(True, rank, world, local_rank, backend, device)


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj`` in rank order (a one-element list in a single process)."""
    if not is_initialized() or get_world_size() == 1:
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
