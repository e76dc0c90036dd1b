"""``run.strategy: fsdp``: shard the model across processes with torch's FullyShardedDataParallel.

What it is for: fine-tuning with the image encoder unfrozen (ViT-g, 1B parameters, plus its
AdamW state) and stage 2 with a frozen LLM too large to copy on every GPU (FlanT5-XXL, OPT-6.7B).
Each repeated transformer block (ViT blocks, T5/OPT layers) becomes one FSDP unit whose weights,
gradients and optimizer state are split across the processes and gathered only while that block
runs.

Why FSDP (``torch.distributed.fsdp.FullyShardedDataParallel``) and not FSDP2
(``fully_shard``): in torch 2.5.1 FSDP2 refuses to run without CUDA ("FSDP requires CUDA for
streams"), while FSDP runs on the CPU with gloo when given ``device_id=cpu``; so the same code
path is tested on the CPU (2 gloo processes) and used on GPUs.

Decisions a user does not have to make:
- units: every class that fills an ``nn.ModuleList`` on its own with modules that have
  children of their own (:func:`block_classes`); the rest of the model (the Q-Former among it,
  whose layers' weights are read outside their forward) is the root unit, sharded at rest and
  gathered for the model's forward and backward.
- FSDP flattens the weights of one unit into one tensor, which needs one dtype. A frozen part
  kept in another dtype (``vit_precision: fp16`` keeps LayerNorms in fp32; an LLM loaded in
  bf16 beside the fp32 Q-Former) is left out of sharding and kept whole on every process, as
  DDP would keep it (:func:`plan`); a trainable part in mixed dtypes is refused with the fix.
- weights are made equal on every process before sharding (rank 0's, as DDP does).
- ``use_orig_params``: parameters keep their names and identity, so the optimizer's groups
  (weight decay, layer-wise lr) are those of the unwrapped model.

Options (``run:``; defaults in :class:`FSDPSettings`): ``fsdp_sharding``, ``fsdp_mixed_precision``,
``fsdp_cpu_offload``. Checkpoints of an FSDP run are folders written by
``torch.distributed.checkpoint`` (:mod:`lavis_plugins.runners.sharded_checkpoint`).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, fields
from typing import Any, Iterator, List, Mapping, Optional, Set, Tuple, Type

import torch
from torch import nn

from lavis_plugins.common.config_check import (FSDP_MIXED_PRECISION, FSDP_SHARDING,
                                               STRATEGIES)
from lavis_plugins.common.errors import UserError

logger = logging.getLogger(__name__)

FSDP_KEYS = ("fsdp_sharding", "fsdp_mixed_precision", "fsdp_cpu_offload")


@dataclass(frozen=True)
class FSDPSettings:
    """The ``run.fsdp_*`` options.

    Attributes:
        sharding: what is split across processes: ``full_shard`` (weights, gradients and
            optimizer state; least memory), ``shard_grad_op`` (gradients and optimizer state;
            weights stay gathered between forward and backward: less communication),
            ``hybrid_shard`` (full_shard inside a node, replicated across nodes), ``no_shard``
            (DDP-like, for comparison).
        mixed_precision: ``none`` (float32 everywhere) or ``bf16`` (weights gathered and computed
            in bfloat16, gradients reduced in float32; the sharded master weights stay float32).
        cpu_offload: keep the sharded weights and gradients in CPU memory between uses (CUDA
            only: saves GPU memory at the cost of copies every step).
    """

    sharding: str = "full_shard"
    mixed_precision: str = "none"
    cpu_offload: bool = False

    @classmethod
    def from_run(cls, run: Mapping[str, Any], device: torch.device) -> Optional["FSDPSettings"]:
        """The settings of ``run:``; None for ``strategy: ddp`` (the default). Cross-key
        mistakes are one ``UserError`` line (single keys are checked by ``config_check``)."""
        strategy = str(run.get("strategy", STRATEGIES[0])).lower()
        if strategy not in STRATEGIES:
            raise UserError(f"run.strategy is {strategy!r}; it must be one of "
                            f"{', '.join(STRATEGIES)}")
        given = {k: run[k] for k in FSDP_KEYS if run.get(k) is not None}
        if strategy != "fsdp":
            if given:
                raise UserError(f"run.{next(iter(given))} is set but run.strategy is "
                                f"{strategy!r}: set run.strategy: fsdp, or remove the fsdp_ keys")
            return None
        names = {f.name: f for f in fields(cls)}
        values = {k[len("fsdp_"):]: v for k, v in given.items()}
        for k in ("sharding", "mixed_precision"):
            if k in values:
                values[k] = str(values[k]).lower()
        settings = cls(**{k: v for k, v in values.items() if k in names})
        if settings.sharding not in FSDP_SHARDING:
            raise UserError(f"run.fsdp_sharding is {settings.sharding!r}; it must be one of "
                            f"{', '.join(FSDP_SHARDING)}")
        if settings.mixed_precision not in FSDP_MIXED_PRECISION:
            raise UserError(f"run.fsdp_mixed_precision is {settings.mixed_precision!r}; it must "
                            f"be one of {', '.join(FSDP_MIXED_PRECISION)}")
        if settings.cpu_offload and device.type != "cuda":
            raise UserError("run.fsdp_cpu_offload needs CUDA (it moves sharded weights between "
                            "GPU and CPU memory); this run is on the CPU: remove it")
        amp_fp16 = bool(run.get("amp", False)) and str(run.get("amp_dtype", "bf16")).lower() \
            in ("fp16", "float16")
        if amp_fp16:
            raise UserError("run.amp_dtype: fp16 with run.strategy: fsdp is not supported (its "
                            "loss scaler would decide per process whether to skip a step); use "
                            "run.amp_dtype: bf16 or run.fsdp_mixed_precision: bf16")
        if run.get("compile", False):
            raise UserError("run.compile: true with run.strategy: fsdp is not supported yet (the "
                            "model compiles its parts before FSDP would wrap them, untested); "
                            "remove one of the two")
        return settings


# --------------------------------------------------------------------------------- wrapping
def block_classes(model: nn.Module) -> Set[Type[nn.Module]]:
    """Classes of the model's transformer blocks: those that fill an ``nn.ModuleList`` on their
    own (one class per list) and have children of their own: the ViT's ``Block``,
    ``T5Block``, ``OPTDecoderLayer``. Not a list of plain ``Linear`` heads (code may read their
    ``.weight`` outside ``forward``, which a shard would break), nor lists of mixed classes (a
    ``T5Block``'s attention / feed-forward sub-layers), nor a class that says
    ``fsdp_unit = False`` (the Q-Former's layers: their weights are read outside their
    ``forward``; the Q-Former is then sharded as part of the root unit)."""
    containers = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
    found: Set[Type[nn.Module]] = set()
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 1:
            kinds = {type(c) for c in m}
            first = m[0]
            if len(kinds) == 1 and not isinstance(first, containers) \
                    and getattr(first, "fsdp_unit", True) \
                    and any(True for _ in first.children()) \
                    and any(True for _ in first.parameters()):
                found.add(type(first))
    return found


def _own_params(module: nn.Module, units: Set[nn.Module]) -> Iterator[Tuple[str, nn.Parameter]]:
    """Parameters of ``module`` that no nested unit in ``units`` holds (what FSDP flattens into
    ``module``'s own unit)."""
    def walk(m: nn.Module, prefix: str):
        for n, p in m.named_parameters(recurse=False):
            yield prefix + n, p
        for n, c in m.named_children():
            if c not in units:
                yield from walk(c, f"{prefix}{n}.")
    yield from walk(module, "")


@dataclass
class WrapPlan:
    """Which modules become FSDP units, and which parameters are kept whole on every process."""

    unit_classes: Set[Type[nn.Module]]
    ignored: List[nn.Parameter]  # frozen weights in a dtype their unit does not share; scalars
    ignored_names: List[str]  # their modules' (or the scalars' own) names

    @property
    def replicated(self) -> List[nn.Parameter]:
        """Ignored parameters that train (scalars such as stage 1's ``temp``): their gradients
        are averaged across processes by :func:`grad_norm`, as DDP would."""
        return [p for p in self.ignored if p.requires_grad]


def plan(model: nn.Module) -> WrapPlan:
    """Units and ignored modules of ``model`` (see the module docstring).

    A unit's own parameters (those not inside a nested unit) must share one dtype. Where they
    do not: frozen leaf modules in a minority dtype are ignored (kept whole, never sharded);
    trainable parameters in two dtypes are a ``UserError`` naming them. FSDP refuses 0-d
    parameters (stage 1's learned temperature ``temp``): they are ignored too.
    """
    classes = block_classes(model)
    units = {m for m in model.modules() if type(m) in classes}
    ignored: List[nn.Parameter] = []
    ignored_names: List[str] = []
    for n, p in model.named_parameters():
        if p.ndim == 0:
            ignored.append(p)
            ignored_names.append(n)
    names = {m: n for n, m in model.named_modules()}
    for unit in [model, *sorted(units, key=lambda u: names[u])]:
        params = list(_own_params(unit, units))
        dtypes = {p.dtype for _, p in params}
        if len(dtypes) <= 1:
            continue
        trainable = {p.dtype for _, p in params if p.requires_grad}
        if len(trainable) > 1:
            raise UserError(
                f"run.strategy: fsdp cannot shard {names[unit] or 'the model'}: its trainable "
                f"weights mix dtypes {sorted(str(d) for d in trainable)}; keep an unfrozen "
                "part in float32 (e.g. model.vit_precision: fp32) and use "
                "run.fsdp_mixed_precision: bf16 for speed")
        # the dtype of the trainable weights (else the most common) stays; the rest is ignored
        keep = next(iter(trainable)) if trainable else max(
            dtypes, key=lambda d: sum(p.numel() for _, p in params if p.dtype == d))
        for m in _leaf_holders(unit, units):
            own = list(m.parameters(recurse=False))
            if any(p.dtype != keep for p in own):
                ignored.extend(p for p in own if p.ndim > 0)
                ignored_names.append(names[m])
    return WrapPlan(classes, ignored, ignored_names)


def _leaf_holders(unit: nn.Module, units: Set[nn.Module]) -> Iterator[nn.Module]:
    """Modules under ``unit`` (not in nested units) that hold parameters directly."""
    stack = [unit]
    while stack:
        m = stack.pop()
        if any(True for _ in m.parameters(recurse=False)):
            yield m
        stack.extend(c for c in m.children() if c not in units)


def _sync_from_rank0(model: nn.Module) -> None:
    """Rank 0's weights and buffers on every process (what DDP does at construction; FSDP's
    ``sync_module_states`` refuses CPU tensors)."""
    from torch.distributed.utils import _sync_module_states

    _sync_module_states(model, torch.distributed.group.WORLD, 250 * 1024 * 1024, 0, set())


def wrap(model: nn.Module, settings: FSDPSettings, device: torch.device) -> nn.Module:
    """``model`` (already on ``device``) sharded across the process group as :func:`plan` says.

    The parameter objects are kept (``use_orig_params``): an optimizer built from them before
    wrapping stays valid (its groups must be built before: wrapping flattens each local shard
    to 1-D, so ``p.ndim`` no longer tells weights from biases).
    """
    from torch.distributed.fsdp import (CPUOffload, FullyShardedDataParallel, MixedPrecision,
                                        ShardingStrategy)
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    if device.type == "cuda" and device.index is None:  # run.device: cuda under torchrun
        device = torch.device("cuda", torch.cuda.current_device())
    p = plan(model)
    logger.info("fsdp: units %s, sharding %s, mixed precision %s%s",
                sorted(c.__name__ for c in p.unit_classes), settings.sharding,
                settings.mixed_precision,
                f"; kept whole on every process (frozen, another dtype): {p.ignored_names}"
                if p.ignored else "")
    _sync_from_rank0(model)
    mp = None
    if settings.mixed_precision == "bf16":
        mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                            buffer_dtype=torch.bfloat16, cast_forward_inputs=True)
    wrapped = FullyShardedDataParallel(
        model, auto_wrap_policy=ModuleWrapPolicy(p.unit_classes) if p.unit_classes else None,
        sharding_strategy=getattr(ShardingStrategy, settings.sharding.upper()),
        mixed_precision=mp, cpu_offload=CPUOffload(offload_params=settings.cpu_offload),
        ignored_states=p.ignored or None, device_id=device, use_orig_params=True,
        limit_all_gathers=True, device_mesh=_mesh(settings, device))
    wrapped._lp_replicated = p.replicated  # read by grad_norm
    return wrapped


def _mesh(settings: FSDPSettings, device: torch.device):
    """The process mesh. Given one, FSDP's sharded state dicts hold DTensors: with its default
    ShardedTensors, torch 2.5.1's ``get_state_dict`` fails on a process that holds no part of a
    weight whose first dimension is below the number of processes (``query_tokens`` (1, 32,
    768): "Only single local shard is supported"). hybrid_shard: (nodes, processes per node)."""
    import os

    from torch.distributed.device_mesh import init_device_mesh

    world = torch.distributed.get_world_size()
    if settings.sharding != "hybrid_shard":
        return init_device_mesh(device.type, (world,))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % per_node:
        raise UserError(f"run.fsdp_sharding: hybrid_shard needs the same number of processes "
                        f"on every node (WORLD_SIZE={world}, LOCAL_WORLD_SIZE={per_node})")
    return init_device_mesh(device.type, (world // per_node, per_node))


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def grad_norm(model: nn.Module, max_norm: Optional[float]) -> torch.Tensor:
    """Total gradient norm over every process's shards (a device tensor: no host sync),
    clipping to ``max_norm`` when set. Equal on every process, so all agree on skipping a
    non-finite step."""
    _average_replicated_grads(getattr(model, "_lp_replicated", []))
    # FSDP's own clip counts sharded and replicated gradients correctly; with max_norm=inf its
    # clip coefficient is clamped to 1 (gradients multiplied by exactly 1)
    return model.clip_grad_norm_(float(max_norm) if max_norm else math.inf)


def _average_replicated_grads(params: List[nn.Parameter]) -> None:
    """Average the gradients of trainable parameters FSDP does not manage over processes, in
    one all-reduce (a missing gradient counts as zero, so every process joins)."""
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p).clone()


@contextlib.contextmanager
def full_params(model: nn.Module) -> Iterator[nn.Module]:
    """The unsharded model for evaluation, run without collectives.

    Every weight is gathered on every process (FSDP's ``summon_full_params``, in float32) and
    the nested units' FSDP ``forward`` is bypassed while evaluating: it would all-gather and
    reshard at each call, and processes evaluate different numbers of batches (and generate
    different lengths), so sharded evaluation would deadlock. Needs the whole model to fit on
    one device; evaluation computes in float32 even under ``fsdp_mixed_precision: bf16``.
    """
    if not is_fsdp(model):
        yield model
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    nested = [m for m in model.modules()
              if isinstance(m, FullyShardedDataParallel) and m is not model]
    with FullyShardedDataParallel.summon_full_params(model, writeback=False):
        for m in nested:  # an instance attribute shadows FSDP's forward (it has no hooks)
            m.forward = m._fsdp_wrapped_module.forward
        try:
            yield model.module
        finally:
            for m in nested:
                del m.forward
