"""Sharded checkpoints of ``run.strategy: fsdp`` through ``torch.distributed.checkpoint`` (DCP).

Each process writes its own shard of the trainable weights and optimizer state; nothing is
gathered on one process (a full ViT-g AdamW state is 12 GB). A checkpoint is a folder::

    checkpoint_step40.dcp/
        .metadata            DCP's index of every tensor's shards (written by rank 0)
        __0_0.distcp         rank 0's shards
        __1_0.distcp         rank 1's shards ...
        trainer_state.pth    what the .pth checkpoints of strategy ddp hold besides weights and
                             optimizer: schedule, data position, step, counters, every rank's RNG

Tensors are stored by their names in the unwrapped model, so a folder resumes under another
number of processes (DCP reshards on load) and converts to one ``.pth`` with
``python -m torch.distributed.checkpoint.format_utils dcp_to_torch <folder> <file>``.

Loading runs no code from the folder: DCP itself unpickles ``.metadata`` with ``pickle.load``
and non-tensor values with ``torch.load(weights_only=False)``; :class:`SafeReader` and
:class:`SafePlanner` replace both with allow-listed / weights-only loads.
"""
from __future__ import annotations

import importlib
import io
import pathlib
import pickle
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader

from lavis_plugins.common.errors import UserError

SUFFIX = ".dcp"
TRAINER_STATE = "trainer_state.pth"


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` is a sharded checkpoint folder (it holds DCP's ``.metadata``)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and nothing else: the index's own dataclasses, tensor sizes,
    dtypes, layouts and the path it was written to."""

    _ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                ("torch.serialization", "_get_layout"), ("torch", "Size"),
                ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        if module == dcp_metadata.__name__ and isinstance(getattr(dcp_metadata, name, None), type):
            return getattr(dcp_metadata, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in self._ALLOWED:
            if module == "pathlib":
                return getattr(pathlib, name)
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


class SafeReader(FileSystemReader):
    """DCP's file reader with ``.metadata`` read through :class:`_MetadataUnpickler`."""

    def read_metadata(self) -> dcp_metadata.Metadata:
        path = Path(self.path) / ".metadata"
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor values (lr, betas, step counts) loaded weights-only."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                        loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen weights come from model.pretrained / the LLM's own files, as with .pth checkpoints;
    # not strict, because those frozen keys are absent: every trainable key is still required,
    # as dcp.load fails for a key of the model's state that the folder lacks
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def save(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every process writes its shards of the trainable weights and optimizer state into
    ``folder`` (collective: all processes call it)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    dcp.save({"model": model_sd, "optim": optim_sd},
             storage_writer=dcp.FileSystemWriter(str(folder), single_file_per_rank=True))


def load(folder: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
         what: str) -> None:
    """Restore the trainable weights (and the optimizer state, when given) from ``folder``
    (collective). ``what`` names the option the folder came from, for errors."""
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                         set_model_state_dict, set_state_dict)

    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
        state: Dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    else:
        state = {"model": get_model_state_dict(model, options=_options())}
    try:
        index = SafeReader(str(folder)).read_metadata().state_dict_metadata
    except (pickle.UnpicklingError, EOFError, OSError, AttributeError) as e:
        raise UserError(f"{what}: {folder} is not a readable sharded checkpoint "
                        f"({str(e).splitlines()[0][:160]}); resume from another checkpoint "
                        "folder of the run") from None
    _check_matches(index, state["model"], folder, what)
    try:
        dcp.load(state, storage_reader=SafeReader(str(folder)), planner=SafePlanner())
    except (RuntimeError, KeyError, ValueError, AssertionError) as e:  # CheckpointException
        raise UserError(f"{what}: {folder} could not be loaded into the model "
                        f"({' '.join(str(e).split())[:200]})") from None
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=_options())
    else:
        set_model_state_dict(model, state["model"], options=_options())


def _check_matches(index: Dict[str, Any], model_sd: Dict[str, Any], folder: Path,
                   what: str) -> None:
    """Every trainable weight of the model is in the folder's index with its shape (DCP itself
    copies a differently shaped tensor's overlap without a word)."""
    problems = []
    for name, value in model_sd.items():
        entry = index.get(f"model.{name}")
        if entry is None:
            problems.append(f"{name} is missing")
        elif hasattr(entry, "size") and tuple(entry.size) != tuple(value.size()):
            problems.append(f"{name} has shape {list(entry.size)} there, "
                            f"{list(value.size())} in the model")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{what}: {folder} does not match the model: {'; '.join(problems[:3])}"
                        f"{more}. Was it written by a run of the same model config?")
