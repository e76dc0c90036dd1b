"""Loading weight files without running code from them.

``torch.load(weights_only=False)`` unpickles arbitrary objects, so a ``.pth`` downloaded from the
internet can run any code before a single check. Every file this package reads (model
``pretrained``/``finetuned``, ``stage1_checkpoint``, ``vit_path``, ``run.resume_ckpt_path``, the
text-LM export) goes through :func:`load_weights`: ``.safetensors`` files through safetensors,
anything else through ``torch.load(weights_only=True)`` with a small allow-list (numpy scalars and
arrays, which older LAVIS-era checkpoints hold for epochs and metrics). A file that would need
more is refused with the reason and the command that converts a trusted copy once
(``lavis-plugins convert --trust``, :func:`convert_trusted`).

Each way a file can be wrong (missing, empty, text, truncated, pickled code) is one
:class:`~lavis_plugins.common.errors.UserError` line.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch

from lavis_plugins.common.errors import UserError

SAFETENSORS_SUFFIX = ".safetensors"
FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch reads it at every torch.load call


def _numpy_allow_list() -> List[Any]:
    """What numpy arrays and scalars unpickle through: they build plain data, never call user
    code (the unpickler still checks every global they name against this list)."""
    try:
        from numpy._core import multiarray  # numpy 2
    except ImportError:
        from numpy.core import multiarray
    allowed: List[Any] = [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype]
    allowed += [type(np.dtype(t)) for t in ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4",
                                             "u8", "f2", "f4", "f8")]
    return allowed


def _trust_hint(path: str) -> str:
    return (f"If you trust the file, convert it once with `lavis-plugins convert --trust {path} "
            f"{_converted_name(path)}` and use the converted file")


def _converted_name(path: str) -> str:
    p = Path(path)
    return str(p.with_name(p.stem + ".safe.pth"))


def _describe_failure(path: str, err: BaseException) -> str:
    """One line saying why ``path`` did not load, from the error and the file's first bytes."""
    text = str(err)
    with open(path, "rb") as f:
        head = f.read(64)
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        shown = head[:24].decode("ascii", "replace").strip()
        return (f"{path} is a text file (starts with {shown!r}), not a weights file: a failed "
                "download often saves an error page; download it again")
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m or "Weights only load failed" in text:
        what = f" (it pickles {m.group(1)})" if m else ""
        return (f"refusing to load {path}: loading it would run code stored in the file{what}, "
                "which weights-only loading does not allow. " + _trust_hint(path))
    if isinstance(err, (EOFError, zipfile.BadZipFile)) or "central directory" in text \
            or "truncated" in text or "unexpected EOF" in text.lower():
        return (f"{path} is truncated or damaged ({text.splitlines()[0][:120]}); copy or download "
                "it again (an interrupted copy or a full disk leaves such files)")
    first = text.splitlines()[0][:200] if text else type(err).__name__
    return f"cannot read {path} as a weights file: {first}"


def load_weights(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """The object stored in ``path`` (a ``.pth``/``.bin`` torch file or a ``.safetensors``
    file), on the CPU, loaded without running code from the file.

    Args:
        path: the file.
        what: names the option the file came from in error messages (e.g. "model.pretrained").
    Raises:
        UserError: missing, empty, text, truncated or damaged file, or one that holds pickled
            code (with the ``convert --trust`` command).
    """
    path = str(path)
    if not os.path.exists(path):
        raise UserError(f"{what}: file not found: {path}")
    if not os.path.isfile(path):
        raise UserError(f"{what}: {path} is a folder, not a weights file")
    if os.path.getsize(path) == 0:
        raise UserError(f"{what}: {path} is empty (0 bytes): an interrupted download or copy; "
                        "download or copy it again")
    if path.endswith(SAFETENSORS_SUFFIX):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise UserError(f"{what}: {path} is not a complete safetensors file ({e}); copy or "
                            "download it again") from None
    try:
        with torch.serialization.safe_globals(_numpy_allow_list()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile,
            AttributeError, TypeError, IndexError, KeyError) as e:
        raise UserError(f"{what}: {_describe_failure(path, e)}") from None


def state_dict_of(obj: Any, path: str, what: str) -> Dict[str, torch.Tensor]:
    """The weights in a loaded file: ``obj["model"]`` when present (LAVIS's layout), else
    ``obj`` itself; a ``UserError`` when that is not a dict of tensors."""
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = (type(obj).__name__ if not isinstance(obj, dict)
                else f"dict with keys {sorted(map(str, obj))[:6]}")
        raise UserError(f"{what}: {path} holds no state dict (a dict of tensors, or one under "
                        f"'model'); it holds a {kind}")
    return state


@contextlib.contextmanager
def weights_only_loads(named: Sequence[str] = ()) -> Iterator[None]:
    """Make every ``torch.load`` inside weights-only, LAVIS's own included (its models'
    ``load_checkpoint`` and ViT builders unpickle fully): used around model building. A refused
    file becomes a ``UserError`` listing ``named`` (the config's weights paths)."""
    previous = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1"
    try:
        with torch.serialization.safe_globals(_numpy_allow_list()):
            yield
    except pickle.UnpicklingError as e:
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        files = ", ".join(str(n) for n in named if n) or "a weights file the model loads"
        raise UserError(f"refusing to load {files}: loading it would run code stored in the file"
                        f"{f' (it pickles {m.group(1)})' if m else ''}, which weights-only "
                        "loading does not allow. If you trust the file, convert it once with "
                        "`lavis-plugins convert --trust <file> <new file>` and use the new file"
                        ) from None
    finally:
        if previous is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = previous


# ------------------------------------------------------------------------------ conversion
def _plain(obj: Any, where: str, dropped: List[str]) -> Any:
    """``obj`` rebuilt from the types weights-only loading accepts (tensors, numbers, strings,
    containers); numpy arrays become tensors, objects with a ``__dict__`` (e.g. argparse
    namespaces) dicts, anything else is dropped and listed in ``dropped``."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.Size,
                                       torch.dtype, torch.device)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)):
                dropped.append(f"{where}[{k!r}] (key of type {type(k).__name__})")
                continue
            value = _plain(v, f"{where}[{k!r}]", dropped)
            if value is not _DROP:
                out[k] = value
        return out
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]", dropped) for i, v in enumerate(obj)]
        items = [v for v in items if v is not _DROP]
        return type(obj)(items) if isinstance(obj, list) or type(obj) is tuple else items
    if hasattr(obj, "__dict__") and not callable(obj):
        return _plain(dict(vars(obj)), where, dropped)
    dropped.append(f"{where} ({type(obj).__module__}.{type(obj).__name__})")
    return _DROP


_DROP = object()


def convert_trusted(src: str | os.PathLike, dst: str | os.PathLike) -> Tuple[Path, List[str]]:
    """Load ``src`` with full unpickling (it RUNS code stored in the file: only for files the
    user trusts) and write its data to ``dst`` in a form :func:`load_weights` reads.

    Returns ``dst`` and what was dropped (objects that are not data). ``dst`` ending in
    ``.safetensors`` takes a flat state dict (``src`` or its ``"model"``); anything else is a
    torch file holding the whole converted object.
    """
    src, dst = str(src), Path(dst)
    if not os.path.isfile(src):
        raise UserError(f"convert: {src} is not a file")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise UserError(f"convert: the output {dst} must differ from the input")
    forced = os.environ.pop(FORCE_ENV, None)  # the user chose to trust this one file
    try:
        obj = torch.load(src, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is not loadable
        raise UserError(f"convert: cannot load {src} even with full unpickling: "
                        f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    finally:
        if forced is not None:
            os.environ[FORCE_ENV] = forced
    dropped: List[str] = []
    data = _plain(obj, "file", dropped)
    if data is _DROP:
        raise UserError(f"convert: {src} holds a {type(obj).__name__}, which is no data to keep")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        if dst.suffix == SAFETENSORS_SUFFIX:
            from safetensors.torch import save_file

            state = state_dict_of(data, src, "convert")
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        else:
            torch.save(data, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"convert: cannot write {dst}: {e.strerror or e}") from None
    load_weights(dst, "convert")  # what we wrote must load weights-only
    return dst, dropped
