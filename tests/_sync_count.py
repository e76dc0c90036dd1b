"""Count the calls that make the host wait for the device, on a CPU run.

On a GPU these calls block the Python thread until the device has finished the work queued so
far (or, for boolean-mask indexing and ``nonzero``, until it knows an output size), so a training
step that makes none keeps the device busy while Python queues the next step. A CPU run has no
device to wait for, so here each call is counted instead, wherever it is made from: reading a
value (``item``, ``tolist``, ``bool``/``float``/``int``/``index``, ``format``), copying to the
host (``cpu``, ``numpy``), and ops whose output size depends on the data (``nonzero``,
``masked_select``, ``unique``, boolean-mask ``[]`` and ``[]=``).
"""
from __future__ import annotations

import contextlib
import traceback
from typing import Iterator, List

import torch

_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__format__",
          "cpu", "numpy", "nonzero", "masked_select", "unique")
_TORCH_FNS = ("nonzero", "masked_select", "unique")


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


class SyncCounter:
    """``calls``: one ``"name at file:line in function"`` per synchronising call while
    ``active``."""

    def __init__(self) -> None:
        self.calls: List[str] = []
        self.active = False

    def _note(self, name: str) -> None:
        if not self.active:
            return
        self.active = False  # calls made while formatting the note are not the code's
        frame = next((f for f in reversed(traceback.extract_stack()[:-2])
                      if "_sync_count" not in f.filename), None)
        self.calls.append(f"{name} at {frame.filename}:{frame.lineno} in {frame.name}"
                          if frame else name)
        self.active = True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        was, self.active = self.active, False
        try:
            yield
        finally:
            self.active = was


@contextlib.contextmanager
def count_syncs() -> Iterator[SyncCounter]:
    """Patch the synchronising Tensor methods and torch functions; yields the counter (inactive:
    set ``counter.active`` around the code to count)."""
    counter = SyncCounter()
    saved = []

    def wrap(owner, name, check=None):
        original = getattr(owner, name)
        saved.append((owner, name, original))

        def patched(*args, **kwargs):
            if check is None or check(*args, **kwargs):
                counter._note(name)
            return original(*args, **kwargs)

        setattr(owner, name, patched)

    for name in _READS:
        wrap(torch.Tensor, name)
    for name in _TORCH_FNS:
        wrap(torch, name)
    wrap(torch.Tensor, "__getitem__", lambda self, index: _has_bool_index(index))
    wrap(torch.Tensor, "__setitem__", lambda self, index, value: _has_bool_index(index))
    try:
        yield counter
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)
