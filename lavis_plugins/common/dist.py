"""Process-group set-up that works on CPU (gloo) and GPU (NCCL), in one process or under torchrun.

LAVIS's ``init_distributed_mode`` hard-codes NCCL and ``torch.cuda.set_device``, so it cannot run
on CPU, and its helpers assume a process group exists. These do not.
"""
from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from lavis_plugins.common.errors import UserError

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


# how long processes wait for each other at start (run.dist_timeout_s)
DEFAULT_JOIN_TIMEOUT_S = 300.0


def _env_int(name: str, value: str, lo: int, hi: Optional[int] = None) -> int:
    try:
        n = int(value)
    except ValueError:
        n = None
    if n is None or n < lo or (hi is not None and n > hi):
        rng = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise UserError(f"environment variable {name}={value!r} must be {rng}; launch with "
                        "torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) "
                        "or unset it for a single process")
    return n


def read_dist_env(env: Optional[Dict[str, str]] = None) -> Optional[Dict[str, Any]]:
    """The distributed launch variables, checked: None for a single process (no ``WORLD_SIZE``
    or ``WORLD_SIZE=1``), else ``{rank, world, local_rank, addr, port}``; a ``UserError`` line
    for each inconsistent or missing variable."""
    env = os.environ if env is None else env
    world = _env_int("WORLD_SIZE", env.get("WORLD_SIZE", "1"), 1)
    if "RANK" not in env:
        if world > 1:
            raise UserError(f"WORLD_SIZE={world} but RANK is not set; launch with torchrun, or "
                            "set RANK (0..WORLD_SIZE-1) in each process")
        return None
    rank = _env_int("RANK", env["RANK"], 0)
    if rank >= world:
        raise UserError(f"RANK={rank} is not below WORLD_SIZE={world}: ranks run from 0 to "
                        f"{world - 1}")
    local_rank = _env_int("LOCAL_RANK", env.get("LOCAL_RANK", "0"), 0)
    if world == 1:
        return None
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(name):
            raise UserError(f"{name} is not set (WORLD_SIZE={world}): every process needs the "
                            "address and port of rank 0; launch with torchrun or set it")
    port = _env_int("MASTER_PORT", env["MASTER_PORT"], 1, 65535)
    return {"rank": rank, "world": world, "local_rank": local_rank,
            "addr": env["MASTER_ADDR"], "port": port}


def _join(env: Dict[str, Any], timeout_s: float):
    """Meet every rank at rank 0's store within ``timeout_s``; returns the store for
    ``init_process_group``. Rank 0 names the ranks that never came; the others say that rank 0
    was not reached. (torch's own rendezvous waits up to 30 minutes in silence.)"""
    rank, world = env["rank"], env["world"]
    where = f"{env['addr']}:{env['port']}"
    timeout = datetime.timedelta(seconds=timeout_s)
    # under torchrun's agent the store already runs in the agent: every rank is a client
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        store = dist.TCPStore(env["addr"], env["port"], world, is_master=rank == 0 and not agent,
                              timeout=timeout, wait_for_workers=False)
    except (RuntimeError, OSError) as e:  # DistNetworkError / DistStoreError are RuntimeErrors
        if rank == 0 and not agent:
            raise UserError(f"rank 0 cannot listen on {where} ({str(e).splitlines()[0][:120]}); "
                            "choose a free MASTER_PORT") from None
        raise UserError(f"rank {rank} could not reach rank 0 at {where} within {timeout_s:g} s; "
                        "is rank 0 running and MASTER_ADDR/MASTER_PORT right? (run.dist_timeout_s "
                        "sets the wait)") from None
    if agent:
        store = dist.PrefixStore(
            f"/worker/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    join = dist.PrefixStore("lavis_plugins/join", store)
    join.set(str(rank), "1")
    keys = [str(r) for r in range(world)]
    deadline = time.monotonic() + timeout_s
    while not join.check(keys):
        if time.monotonic() > deadline:
            missing = [k for k in keys if not join.check([k])]
            raise UserError(
                f"rank {rank}: the process group did not start within {timeout_s:g} s: rank(s) "
                f"{', '.join(missing)} of WORLD_SIZE={world} never joined at {where}; start "
                "every process (torchrun --nnodes/--nproc_per_node) or raise run.dist_timeout_s")
        time.sleep(0.2)
    return store


def init_distributed(requested_device: str | None = "auto", timeout_min: int = 30,
                     join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S) -> DistInfo:
    """Initialise ``torch.distributed`` from torchrun's environment, if there is one.

    Backend: NCCL when running on CUDA, gloo on CPU. In a plain process (no ``WORLD_SIZE`` or
    ``WORLD_SIZE=1``) no process group is created. The launch variables are checked first
    (:func:`read_dist_env`); the ranks must all arrive within ``join_timeout_s`` (the error
    names the missing ones); ``timeout_min`` bounds later collective operations.
    """
    device = choose_device(requested_device)
    env = read_dist_env()
    if env is None:
        return DistInfo(False, 0, 1, 0, "none", device)
    rank, world, local_rank = env["rank"], env["world"], env["local_rank"]
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={local_rank} but this machine shows "
                            f"{torch.cuda.device_count()} GPU(s); use at most that many "
                            "processes per node (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        backend = "gloo"
    if not is_initialized():
        store = _join(env, join_timeout_s)
        dist.init_process_group(backend=backend, store=store, world_size=world, rank=rank,
                                timeout=datetime.timedelta(minutes=timeout_min))
    return DistInfo(True, rank, world, local_rank, backend, device)


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj`` in rank order (a one-element list in a single process)."""
    if not is_initialized() or get_world_size() == 1:
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
