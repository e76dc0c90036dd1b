"""lp_runner: per-step lr schedule, layer-wise decay, accumulation, checkpoints and exact resume.

The runner is the unit under test, so a small regression model and dataset stand in for BLIP-2
here; the CLI tests run the real stage-1 model through the same runner.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn


class _Cfg:
    """The part of LAVIS's ``Config`` the runner reads."""

    def __init__(self, **run):
        self.config = OmegaConf.create({"run": run, "model": {}, "datasets": {}})

    @property
    def run_cfg(self):
        return self.config.run

    def to_dict(self):
        return OmegaConf.to_container(self.config)


class NoisyPairs(torch.utils.data.Dataset):
    """x -> y = W x; each sample adds augmentation noise drawn from torch's global RNG (as LAVIS
    processors do), so exact resume needs the per-sample seeding."""

    def __init__(self, n=48, dim=6):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, 2, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i] + 0.05 * torch.randn(self.x.shape[1]), "y": self.y[i]}

    def collater(self, samples):
        return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


class Regressor(nn.Module):
    def __init__(self, dim=6, dropout=0.1, fail_at_call=None, nan_loss_at=(), nan_grad_at=()):
        super().__init__()
        self.nan_loss_at, self.nan_grad_at = set(nan_loss_at), set(nan_grad_at)
        self.embed = nn.Linear(dim, 16)  # "layer 0"
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(16, 2)  # "layer 1"
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.calls = 0
        self.fail_at_call = fail_at_call

    @property
    def device(self):
        return next(self.parameters()).device

    def forward(self, samples):
        self.calls += 1
        if self.fail_at_call is not None and self.calls == self.fail_at_call:
            raise KeyboardInterrupt("simulated kill")
        pred = self.head(self.drop(torch.relu(self.embed(samples["x"]))))
        if self.calls in self.nan_grad_at:  # finite loss, NaN gradients
            pred.register_hook(lambda g: g * float("nan"))
        loss_mse = ((pred - samples["y"]) ** 2).mean()
        if self.calls in self.nan_loss_at:
            loss_mse = loss_mse * float("nan")
        loss_l1 = (pred - samples["y"]).abs().mean()
        return {"loss": loss_mse + 0.1 * loss_l1, "loss_mse": loss_mse, "loss_l1": loss_l1}

    def before_evaluation(self, **kwargs):
        pass


class LayerDecayRegressor(Regressor):
    def optimizer_param_groups(self, weight_decay, layer_decay):
        return [
            {"params": list(self.embed.parameters()), "weight_decay": weight_decay,
             "lr_scale": layer_decay},
            {"params": list(self.head.parameters()), "weight_decay": weight_decay, "lr_scale": 1.0},
        ]


def _runner(tmp_path, model, job="job", **run):
    from lavis.tasks.base_task import BaseTask

    from lavis_plugins.runners.runner import PluginRunner

    base = dict(max_epoch=2, init_lr=1e-2, min_lr=1e-4, warmup_steps=3, weight_decay=0.05,
                batch_size_train=8, batch_size_eval=8, num_workers=0, seed=7,
                output_dir=str(tmp_path), device="cpu", train_splits=["train"], log_freq=1,
                lr_sched="lp_linear_warmup_cosine")
    base.update(run)
    cfg = _Cfg(**base)
    return PluginRunner(cfg=cfg, task=BaseTask(), model=model,
                        datasets={"pairs": {"train": NoisyPairs()}}, job_id=job)


def _log(runner):
    return [json.loads(l) for l in (runner.output_dir / "train_log.jsonl").read_text().splitlines()]


def test_lr_follows_per_step_warmup_then_cosine(lp, tmp_path):
    torch.manual_seed(0)
    runner = _runner(tmp_path, Regressor())
    runner.train()
    log = _log(runner)
    total = 2 * (48 // 8)
    assert len(log) == total
    sched = runner.lr_scheduler
    for rec in log:
        step = rec["step"] - 1  # lr logged after the optimizer step taken with it
        assert rec["lr"] == pytest.approx(sched.lr_at(step), rel=1e-9)
    # warm-up is linear from 0 over 3 steps; the last step is near min_lr (cosine end)
    assert [round(r["lr"], 8) for r in log[:3]] == [0.0, round(1e-2 / 3, 8), round(2e-2 / 3, 8)]
    assert log[-1]["lr"] == pytest.approx(
        1e-4 + 0.5 * (1e-2 - 1e-4) * (1 + math.cos(math.pi * (total - 1 - 3) / (total - 3))))
    # component losses are logged beside the total
    assert {"loss", "loss_mse", "loss_l1"} <= set(log[0])
    assert (runner.output_dir / "checkpoint_1.pth").is_file()
    assert "train_loss" in (runner.output_dir / "log.txt").read_text()


def test_layer_decay_scales_each_group(lp, tmp_path):
    runner = _runner(tmp_path, LayerDecayRegressor(), layer_decay=0.5, warmup_steps=0,
                     max_epoch=1)
    runner.train()
    g_embed, g_head = runner.optimizer.param_groups
    assert g_embed["lr"] == pytest.approx(0.5 * g_head["lr"])
    assert g_head["lr"] > 0


def test_grad_accumulation_equals_larger_batch(lp, tmp_path):
    def weights_after_one_step(**run):
        torch.manual_seed(0)
        model = Regressor(dropout=0.0)
        runner = _runner(tmp_path, model, job=f"acc{run['batch_size_train']}", max_epoch=1,
                         iters_per_epoch=run.pop("iters"), warmup_steps=0, lr_sched="lp_constant",
                         **run)
        runner.train()
        assert runner.global_step == 1
        return {k: v.clone() for k, v in model.state_dict().items()}

    big = weights_after_one_step(batch_size_train=16, iters=1)
    acc = weights_after_one_step(batch_size_train=8, accum_grad_iters=2, iters=2)
    for k in big:
        torch.testing.assert_close(acc[k], big[k], rtol=1e-6, atol=1e-7)


def test_resume_reproduces_uninterrupted_losses(lp, tmp_path):
    """Kill a run after a mid-epoch checkpoint, resume it, and get the same per-step losses."""
    torch.manual_seed(0)
    full = _runner(tmp_path, Regressor(), job="full", ckpt_freq=4)
    full.train()
    ref = [r["loss"] for r in _log(full)]

    torch.manual_seed(0)
    killed = _runner(tmp_path, Regressor(fail_at_call=8), job="killed", ckpt_freq=4)
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    ckpt = killed.output_dir / "checkpoint_step4.pth"
    assert ckpt.is_file() and not list(killed.output_dir.glob("*.tmp"))

    torch.manual_seed(123)  # a different process state: the checkpoint must restore it all
    resumed = _runner(tmp_path, Regressor(), job="resumed", ckpt_freq=4,
                      resume_ckpt_path=str(ckpt))
    resumed.train()
    got = [r["loss"] for r in _log(resumed)]
    assert len(got) == len(ref) - 4
    assert got == pytest.approx(ref[4:], rel=1e-6, abs=1e-7)
    # the runner's checkpoints hold nothing that needs code to unpickle
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4


def test_checkpoints_of_earlier_versions_still_resume(lp, tmp_path):
    """Checkpoints written before RNG state was stored as tensors (numpy's key array as an
    ndarray) load through the weights-only allow-list and restore the same RNG state."""
    import random

    import numpy as np

    from lavis_plugins.runners.checkpoint_io import pack_rng

    runner = _runner(tmp_path, Regressor(), job="old", max_epoch=1)
    runner.train()
    path = runner.output_dir / "checkpoint_0.pth"
    ckpt = torch.load(path, weights_only=True)
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    ckpt["rng"] = [{"python": random.getstate(), "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state()}]
    expected = pack_rng()
    torch.save(ckpt, path)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    _runner(tmp_path, Regressor(), job="old", max_epoch=1,
            resume_ckpt_path=str(path))._load_checkpoint(str(path))
    got = pack_rng()
    assert got["python"] == expected["python"]
    assert torch.equal(got["numpy"][1], expected["numpy"][1])
    assert got["numpy"][2] == expected["numpy"][2]
    assert torch.equal(got["torch"], expected["torch"])


def test_disk_full_keeps_previous_checkpoint_and_resume_stays_exact(lp, tmp_path, monkeypatch):
    """A checkpoint write that fails half-way (disk full) is one clear error; the partial file
    is removed, checkpoint_latest still names the previous checkpoint, and resuming from it
    reproduces the uninterrupted run's losses."""
    import errno

    from lavis_plugins.common.errors import UserError

    torch.manual_seed(0)
    full = _runner(tmp_path, Regressor(), job="full", ckpt_freq=4)
    full.train()
    ref = [r["loss"] for r in _log(full)]

    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            open(f, "wb").write(b"\0" * 64)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    torch.manual_seed(0)
    monkeypatch.setattr(torch, "save", save)
    failing = _runner(tmp_path, Regressor(), job="full_disk", ckpt_freq=4)
    with pytest.raises(UserError, match="No space left on device; free disk space"):
        failing.train()
    monkeypatch.undo()
    folder = failing.output_dir
    assert not list(folder.glob("*.tmp")) and not (folder / "checkpoint_step8.pth").exists()
    assert (folder / "checkpoint_latest.pth").resolve() == (folder / "checkpoint_step4.pth")
    assert not (folder / ".lavis_plugins.lock").exists()  # released on the error

    torch.manual_seed(5)
    resumed = _runner(tmp_path, Regressor(), job="full_disk", ckpt_freq=4,
                      resume_ckpt_path=str(folder / "checkpoint_latest.pth"))
    resumed.train()
    assert [r["loss"] for r in _log(resumed)][-(len(ref) - 4):] == pytest.approx(
        ref[4:], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nonfinite_stop_names_last_good_checkpoint_and_saves_no_nan(lp, tmp_path, kind):
    from lavis_plugins.common.errors import TrainingDiverged

    torch.manual_seed(0)
    model = Regressor(**{f"nan_{kind}_at": {7}})
    runner = _runner(tmp_path, model, job=f"stop_{kind}", ckpt_freq=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    what = "non-finite loss" if kind == "loss" else "non-finite gradients"
    with pytest.raises(TrainingDiverged, match=f"{what}.* at epoch 1, iteration 0 .*"
                                               "last good checkpoint is .*checkpoint_0.pth"):
        runner.train()
    assert runner.global_step == 6 and before  # step 7 was not applied
    for p in runner.output_dir.glob("checkpoint_*.pth"):
        for k, v in torch.load(p, weights_only=True)["model"].items():
            assert torch.isfinite(v).all(), (p, k)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_nonfinite_skip_counts_and_stops_after_too_many_in_a_row(lp, tmp_path):
    from lavis_plugins.common.errors import TrainingDiverged

    torch.manual_seed(0)
    runner = _runner(tmp_path, Regressor(nan_loss_at={3}, nan_grad_at={9}), job="skip",
                     on_nonfinite="skip")
    runner.train()
    assert runner.nonfinite_skipped == 2 and runner.global_step == 12 - 2
    assert len(_log(runner)) == 10  # the skipped steps are not logged as losses
    assert "nonfinite_skipped" in (runner.output_dir / "log.txt").read_text()

    torch.manual_seed(0)
    runner = _runner(tmp_path, Regressor(nan_loss_at=set(range(4, 20))), job="skip_many",
                     on_nonfinite="skip", max_nonfinite_skips=3)
    with pytest.raises(TrainingDiverged, match="3 optimizer steps in a row"):
        runner.train()
    assert runner.global_step == 3


def test_resume_refuses_checkpoint_without_trainable_weights(lp, tmp_path):
    from lavis_plugins.common.errors import UserError

    runner = _runner(tmp_path, Regressor(), job="a", max_epoch=1)
    runner.train()
    ckpt = torch.load(runner.output_dir / "checkpoint_0.pth", weights_only=False)
    # frozen weights are not saved (as in LAVIS); trainable ones must be
    assert "frozen.weight" not in ckpt["model"] and "embed.weight" in ckpt["model"]
    del ckpt["model"]["head.weight"]
    bad = tmp_path / "bad.pth"
    torch.save(ckpt, bad)
    with pytest.raises(UserError, match="head.weight"):
        _runner(tmp_path, Regressor(), job="b", resume_ckpt_path=str(bad)).train()
    with pytest.raises(UserError, match="not found"):
        _runner(tmp_path, Regressor(), job="c", resume_ckpt_path=str(tmp_path / "nope.pth")).train()


def test_eval_sampler_shards_without_duplicates():
    from lavis_plugins.runners.runner import EpochSampler

    shards = [list(EpochSampler(10, shuffle=False, seed=0, rank=r, world_size=3,
                                equal_shards=False)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))
    train = [list(EpochSampler(10, shuffle=True, seed=0, rank=r, world_size=3,
                               equal_shards=True)) for r in range(3)]
    assert len({len(s) for s in train}) == 1 and len(set(sum(train, []))) == 9


def test_stage1_layer_decay_sets_each_vit_block_lr(lp, tmp_path, tiny_bert_dir):
    """An unfrozen encoder with run.layer_decay: block i of L gets lr * decay ** (L + 1 - (i+1)),
    the embeddings decay ** (L + 1), the Q-Former the full lr — in the optimizer the runner uses."""
    from lavis.tasks.base_task import BaseTask

    from lavis_plugins.runners.runner import PluginRunner

    model = lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir),
                          freeze_vit=False, tiny_vit={"depth": 3})
    cfg = _Cfg(max_epoch=1, init_lr=1e-3, min_lr=0.0, warmup_steps=0, weight_decay=0.05,
               batch_size_train=8, num_workers=0, seed=1, output_dir=str(tmp_path), device="cpu",
               train_splits=["train"], layer_decay=0.5, lr_sched="lp_constant")
    runner = PluginRunner(cfg=cfg, task=BaseTask(), model=model,
                          datasets={"pairs": {"train": NoisyPairs()}}, job_id="ld")
    runner.lr_scheduler.step(0)
    lr_of = {}
    for g in runner.optimizer.param_groups:
        for p in g["params"]:
            lr_of[id(p)] = g["lr"]
    named = dict(model.named_parameters())
    for i in range(3):
        w = named[f"visual_encoder.blocks.{i}.mlp.fc1.weight"]
        assert lr_of[id(w)] == pytest.approx(1e-3 * 0.5 ** (3 - i))
    assert (lr_of[id(named["visual_encoder.patch_embed.proj.weight"])]
            == pytest.approx(1e-3 * 0.5 ** 4))
    assert lr_of[id(named["query_tokens"])] == pytest.approx(1e-3)
