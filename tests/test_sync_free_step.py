"""The training step makes no host sync (issue #14, item 2): counted on a CPU run.

Synchronising calls (``tests/_sync_count.py``) are counted per step of ``lp_runner``, for the
runner's own loop (a small regression model) and for the tiny stage-1 and stage-2 models through
the public API: 0 in a step that logs nothing, 1 (the one ``.tolist()`` of the losses and the
non-finite counters) in a step that logs. Data loading is not counted (it runs in the loader's
workers on a real run).
"""
from __future__ import annotations

from typing import List

import pytest
import torch

from _sync_count import count_syncs
from test_runner import NoisyPairs, Regressor, _Cfg


class Captions(torch.utils.data.Dataset):
    """Random images with captions of varying length (LAVIS caption samples)."""

    WORDS = "a red circle left of blue square above small green triangle near big".split()

    def __init__(self, n: int = 24, size: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, size, size, generator=g)
        lengths = torch.randint(2, 12, (n,), generator=g).tolist()
        self.text = [" ".join(self.WORDS[(i + j) % len(self.WORDS)] for j in range(k))
                     for i, k in enumerate(lengths)]

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, i: int):
        return {"image": self.images[i], "text_input": self.text[i]}

    def collater(self, samples):
        return {"image": torch.stack([s["image"] for s in samples]),
                "text_input": [s["text_input"] for s in samples]}


def make_runner(tmp_path, model, dataset, job: str, **run):
    from lavis.tasks.base_task import BaseTask

    from lavis_plugins.runners.runner import PluginRunner

    base = dict(max_epoch=1, init_lr=1e-3, warmup_steps=2, weight_decay=0.05, batch_size_train=4,
                num_workers=0, seed=7, output_dir=str(tmp_path), device="cpu",
                train_splits=["train"], log_freq=3, iters_per_epoch=6)
    base.update(run)
    return PluginRunner(cfg=_Cfg(**base), task=BaseTask(), model=model,
                        datasets={"d": {"train": dataset}}, job_id=job)


def syncs_per_step(runner, monkeypatch) -> List[List[str]]:
    """Train one epoch; the synchronising calls of each step (data loading not counted)."""
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    from lavis_plugins.runners import runner as runner_module
    from lavis_plugins.runners import train_loop

    marks: List[int] = []
    with count_syncs() as counter:
        real_move, real_next = train_loop.move_to_device, _BaseDataLoaderIter.__next__

        def move(samples, device):  # the step starts when its batch goes to the device
            marks.append(len(counter.calls))
            counter.active = True
            return real_move(samples, device)

        def next_batch(self):
            with counter.paused():
                return real_next(self)

        monkeypatch.setattr(train_loop, "move_to_device", move)
        monkeypatch.setattr(_BaseDataLoaderIter, "__next__", next_batch)
        runner_module.PluginRunner._save_checkpoint, saved = (
            lambda self, *a, **k: None, runner_module.PluginRunner._save_checkpoint)
        try:
            runner.train_epoch(0)
        finally:
            runner_module.PluginRunner._save_checkpoint = saved
        counter.active = False
    # the last step's count includes the end of the epoch: left out
    return [counter.calls[a:b] for a, b in zip(marks, marks[1:])]


def check_counts(steps: List[List[str]], log_freq: int, host_only: str = "") -> None:
    """``host_only``: where reads of CPU-only tensors happen (not device syncs); left out."""
    for i, calls in enumerate(steps):
        calls = [c for c in calls if not (host_only and host_only in c)]
        expected = 1 if (i + 1) % log_freq == 0 else 0
        assert len(calls) == expected, f"step {i}: {len(calls)} syncs, expected {expected}: {calls}"


def test_runner_step_makes_no_sync_outside_logging(lp, tmp_path, monkeypatch):
    torch.manual_seed(0)
    runner = make_runner(tmp_path, Regressor(), NoisyPairs(), "regressor", batch_size_train=8,
                         max_grad_norm=1.0)
    steps = syncs_per_step(runner, monkeypatch)
    assert len(steps) == 5
    check_counts(steps, log_freq=3)


def test_runner_step_with_accumulation_makes_no_sync(lp, tmp_path, monkeypatch):
    torch.manual_seed(0)
    runner = make_runner(tmp_path, Regressor(), NoisyPairs(), "accum", batch_size_train=4,
                         accum_grad_iters=2)
    check_counts(syncs_per_step(runner, monkeypatch), log_freq=3)


@pytest.mark.parametrize("name", ["lp_blip2_qformer", "lp_blip2_opt", "lp_blip2_t5"])
def test_model_step_makes_no_sync_outside_logging(lp, tmp_path, monkeypatch, name):
    from lavis_plugins.api import load_model_and_preprocess

    torch.manual_seed(0)
    model, _, _ = load_model_and_preprocess(name, "tiny")
    runner = make_runner(tmp_path, model, Captions(), name)
    # T5's prefix-LM draws where to split each caption from torch's CPU generator (host text
    # work, no device tensor involved)
    host_only = "in split_caption" if name == "lp_blip2_t5" else ""
    steps = syncs_per_step(runner, monkeypatch)
    check_counts(steps, log_freq=3, host_only=host_only)
    if host_only:  # one draw per caption of the batch (4), in every step
        assert all(sum(host_only in c for c in calls) == 4 for calls in steps), steps
