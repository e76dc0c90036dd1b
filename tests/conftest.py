"""Shared fixtures: everything offline, CPU-only and tiny.

One pytest process imports LAVIS once (about 20 s on 2 cores); tests that need a fresh
interpreter (CLI, torchrun) are few and marked in their names.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    # benchmarks/gpu/ runs the fp32 parity cases on CUDA with --device cuda; the default suite
    # never needs a GPU
    parser.addoption("--device", default="cpu",
                     help="device of the parity tests' fp32 cases (default cpu)")


def pytest_configure(config):
    # tiny models are overhead-bound: one intra-op thread is faster than two fighting for cores
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def device(request) -> str:
    """``--device`` (cpu unless given). On CUDA, LAVIS's ``maybe_autocast`` turns on fp16
    autocast for any model on the GPU, fp32 weights included; the fp32 parity cases compare
    fp32 with fp32, so it is switched off there (the half-precision paths are benchmarks/gpu's
    check a)."""
    dev = request.config.getoption("--device")
    if dev != "cpu":
        import contextlib

        from lavis.models.blip2_models.blip2 import Blip2Base

        Blip2Base.maybe_autocast = lambda self, dtype=None: contextlib.nullcontext()
    return dev


@pytest.fixture(scope="session")
def lp():
    """The imported plugin package (registers everything into LAVIS's registry)."""
    import lavis_plugins

    return lavis_plugins


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A folder named ``bert-base-uncased`` holding a tiny random BERT (hidden 32, 2 layers).

    Its parent is a good working directory for building LAVIS's reference BLIP-2 classes, which
    load the literal name "bert-base-uncased".
    """
    from lavis_plugins.common.tiny_bert import make_tiny_bert

    root = tmp_path_factory.mktemp("hf")
    return make_tiny_bert(root / "bert-base-uncased")


@pytest.fixture
def in_bert_parent(tiny_bert_dir, monkeypatch):
    """chdir to the folder that holds ``bert-base-uncased`` (for LAVIS's reference classes)."""
    monkeypatch.chdir(tiny_bert_dir.parent)
    return tiny_bert_dir


def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def shapes_home(tmp_path_factory) -> Path:
    """A data home (``LAVIS_PLUGINS_DATA``) holding the built-in shapes dataset, made once.

    The variable is set for the whole session (and inherited by subprocesses) so that builders
    with ``root: default`` find this copy instead of the user's cache.
    """
    home = tmp_path_factory.mktemp("lp_data")
    os.environ["LAVIS_PLUGINS_DATA"] = str(home)
    from lavis_plugins.demo_data import ensure_shapes_dataset

    ensure_shapes_dataset()
    return home


def run_forked(target, args_per_process, timeout: int = 300) -> None:
    """Run ``target(*args)`` in one forked process per args tuple (LAVIS already imported in
    them), wait for all, and fail the test if one hangs or exits non-zero."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=target, args=args) for args in args_per_process]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():
            p.terminate()
            pytest.fail(f"forked process did not finish in {timeout} s")
        assert p.exitcode == 0, f"forked process exit code {p.exitcode}"
