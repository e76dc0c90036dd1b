"""Minimal repro: torch 2.5.1 inductor on the CPU loses gradient rows of an embedding.

An embedding's backward is an accumulating scatter (``index_put(..., accumulate=True)``) into the
weight gradient. Inductor's vectorised C++ kernel, when specialised for one thread (one OpenMP
thread, or any kernel too small to parallelise), stores the scattered rows instead of adding them
(``CppVecKernel.store`` with mode "atomic_add" drops ``accu_store`` on a contiguous store), so a
token that appears twice keeps only its last occurrence's gradient. Fixed upstream by
pytorch/pytorch#147961 (issues #146390, #147848; first in torch 2.7.0). ``run.compile`` works
around it with inductor's ``cpp.dynamic_threads`` (``lavis_plugins.models.compile.compile_kwargs``),
which sends the scatter through ``atomic_add_vec``.

    .venv/bin/python benchmarks/repro_inductor_scatter_add.py

prints the largest |compiled - eager| gradient difference, without and with the work-around
(torch 2.5.1: about 4 without, 0 with).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def loss(weight: torch.Tensor, ids: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """Embedding lookup (B, L) -> (B, L, D), weighted by a fixed upstream gradient."""
    return (F.embedding(ids, weight) * upstream).sum()


def max_grad_difference(options: dict | None) -> float:
    """|compiled - eager| of the weight gradient, ids with repeated tokens, one thread."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 32, generator=g, requires_grad=True)
    ids = torch.tensor([[2, 5, 66 % 64, 3], [2, 5, 7, 3]])  # tokens 2, 5 and 3 repeat
    upstream = torch.randn(2, 4, 32, generator=g)
    ref, = torch.autograd.grad(loss(weight, ids, upstream), weight)
    compiled = torch.compile(loss, backend="inductor", options=options)
    got, = torch.autograd.grad(compiled(weight, ids, upstream), weight)
    return (got - ref).abs().max().item()


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}")
    print(f"inductor defaults:            max |diff| {max_grad_difference(None):.3g}")
    print("cpp.dynamic_threads = True:   max |diff| "
          f"{max_grad_difference({'cpp.dynamic_threads': True}):.3g}")
