"""lp_runner's train streams (runners/train_stream.py): the map-style stream is one path shared by
a lone train split and a mixture member (so run.on_bad_sample reaches JSON members of a mixture),
max_bad_fraction has one meaning (per dataset, per process, per epoch of that dataset) for
map-style and shard data, and epoch lengths are arithmetic (no permutation drawn for a length)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from torch import nn


class MapCaptions(torch.utils.data.Dataset):
    """40 map-style captions with random augmentation noise; the indices in ``bad`` raise
    ``BadSample`` (an unreadable file)."""

    def __init__(self, n=40, bad=()):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        from lavis_plugins.datasets.validation import BadSample

        if i in self.bad:
            raise BadSample(f"image {i}.jpg cannot be decoded")
        image = torch.full((3, 8, 8), i / self.n) + 0.1 * torch.randn(3, 8, 8)
        return {"image": image, "text_input": f"map caption {i}"}

    def collater(self, samples):
        return {"image": torch.stack([s["image"] for s in samples]),
                "text_input": [s["text_input"] for s in samples]}


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 1)

    def forward(self, samples):
        return {"loss": self.proj(samples["image"].mean(dim=(2, 3))).pow(2).mean()}


def _png(value: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _shard_dataset(tmp_path, n=40, bad=(), max_bad_fraction=None):
    """A one-shard set of ``n`` samples; those in ``bad`` hold a corrupt image."""
    import torchvision.transforms as T
    import webdataset as wds

    from lavis_plugins.datasets.shard_plan import load_shard_set
    from lavis_plugins.datasets.webdataset_caption import ShardCaptionDataset

    path = tmp_path / "s-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(n):
            sink.write({"__key__": f"k{i}", "png": b"broken" if i in bad else _png(i),
                        "txt": f"shard caption {i}"})
    return ShardCaptionDataset(load_shard_set([str(path)], "t"), T.ToTensor(), None,
                               shuffle_buffer=8, max_bad_fraction=max_bad_fraction, name="web")


def _runner(tmp_path, job, datasets, run=None, datasets_cfg=None, model=None):
    from lavis.tasks.base_task import BaseTask
    from omegaconf import OmegaConf

    from lavis_plugins.runners.runner import PluginRunner

    class Cfg:
        def __init__(self):
            self.config = OmegaConf.create({"run": {**dict(
                max_epoch=3, init_lr=1e-2, min_lr=1e-4, warmup_steps=0, batch_size_train=4,
                num_workers=0, seed=5, output_dir=str(tmp_path), device="cpu",
                train_splits=["train"], log_freq=1, lr_sched="lp_linear_warmup_cosine"),
                **(run or {})}, "model": {}, "datasets": datasets_cfg or {}})
            self.run_cfg, self.datasets_cfg = self.config.run, self.config.datasets

        def to_dict(self):
            return OmegaConf.to_container(self.config)

    torch.manual_seed(0)
    return PluginRunner(cfg=Cfg(), task=BaseTask(), model=model or Toy(), datasets=datasets,
                        job_id=job)


def _epoch_stats(folder):
    return [json.loads(l) for l in (folder / "log.txt").read_text().splitlines()
            if l.startswith('{"train_')]


# ------------------------------------------------------------------ on_bad_sample in a mixture
def test_mixture_json_member_honours_on_bad_sample_skip(lp, tmp_path):
    """A JSON member with an unreadable sample, mixed with shards, under on_bad_sample: skip:
    the sample is left out and counted under the member's name (before the fix the mixture built
    its own map path without skip_bad, and the BadSample stopped the run)."""
    mix = {"maps": {"sample_ratio": 3}, "web": {"sample_ratio": 1}}
    runner = _runner(tmp_path, "mix_skip",
                     {"maps": {"train": MapCaptions(bad={7})},
                      "web": {"train": _shard_dataset(tmp_path)}},
                     run={"on_bad_sample": "skip", "max_bad_fraction": 0.05, "max_epoch": 1,
                          "iters_per_epoch": 30},
                     datasets_cfg=mix)
    runner.train()
    stats = _epoch_stats(tmp_path / "mix_skip")[-1]
    # sample 7 is read once per epoch of the member; 30 steps at ratio 3:1 use 2 of its epochs
    assert int(stats["train_data_bad_maps"]) == 2
    assert stats["train_data_bad_web"] == "0"

    from lavis_plugins.datasets.validation import BadSample

    runner = _runner(tmp_path, "mix_fail", {"maps": {"train": MapCaptions(bad={7})},
                                            "web": {"train": _shard_dataset(tmp_path)}},
                     run={"max_epoch": 1, "iters_per_epoch": 30}, datasets_cfg=mix)
    with pytest.raises(BadSample, match="7.jpg cannot be decoded"):  # on_bad_sample: fail
        runner.train()


# ------------------------------------------------------------------ one max_bad_fraction
@pytest.mark.parametrize("kind", ["map", "shards"])
def test_max_bad_fraction_is_per_epoch_of_the_dataset_on_each_process(lp, tmp_path, kind):
    """Same numbers, same verdict, map-style or shards: 1 bad sample in an epoch of 40 passes a
    bound of 0.03 (1.2 allowed) in every epoch (the counts restart: before the fix the map path
    summed over the run and stopped in epoch 1), and fails a bound of 0.02 (0.8) in epoch 0."""
    from lavis_plugins.common.errors import UserError

    def train(job, fraction):
        ds = MapCaptions(bad={7}) if kind == "map" else _shard_dataset(tmp_path, bad={7})
        runner = _runner(tmp_path, job, {"d": {"train": ds}},
                         run={"on_bad_sample": "skip", "max_bad_fraction": fraction})
        runner.train()
        return _epoch_stats(tmp_path / job)

    stats = train(f"{kind}_ok", 0.03)
    assert [s["train_data_bad"] for s in stats] == ["1", "1", "1"]
    assert [s["train_data_samples"] for s in stats] == ["40", "40", "40"]
    with pytest.raises(UserError, match=r"1 training samples could not be read in epoch 0 on "
                                        r"rank 0, more than max_bad_fraction=0.02 of the 40"):
        train(f"{kind}_too_many", 0.02)


def test_shard_dataset_own_bound_overrides_the_runs(lp, tmp_path):
    """build_info.max_bad_fraction, when set, is the dataset's bound; unset, the run's applies
    (same meaning). Shards lost at build time are checked against it before training."""
    from lavis_plugins.common.errors import UserError
    from lavis_plugins.runners.shard_loader import ShardTrainLoader

    own = _shard_dataset(tmp_path, bad={1, 2}, max_bad_fraction=0.1)
    assert len(list(ShardTrainLoader(own, seed=0, batch_size=4,
                                     max_bad_fraction=0.0).epoch_batches(0))) == 10
    runs = _shard_dataset(tmp_path, bad={1, 2})
    with pytest.raises(UserError, match="max_bad_fraction=0.01 of the 40"):
        list(ShardTrainLoader(runs, seed=0, batch_size=4,
                              max_bad_fraction=0.01).epoch_batches(0))
    runs.shards.bad, runs.shards.problems = 5, ["shard x.tar is missing (5 samples lost)"]
    with pytest.raises(UserError, match="5 of 45 samples are lost in missing or truncated"):
        ShardTrainLoader(runs, seed=0, batch_size=4, max_bad_fraction=0.1)


def test_run_max_bad_fraction_out_of_range_is_refused(lp):
    from lavis_plugins.common.config_check import check_run
    from lavis_plugins.common.errors import UserError

    with pytest.raises(UserError, match="max_bad_fraction"):
        check_run({"max_bad_fraction": 1.5})


# ------------------------------------------------------------------ lengths and epochs
@pytest.mark.parametrize("n", [0, 1, 7, 40, 41, 1003])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("equal", [True, False])
def test_epoch_sampler_length_is_arithmetic_and_equals_the_drawn_one(lp, n, world, equal):
    from lavis_plugins.runners.sampling import EpochSampler

    for rank in range(world):
        s = EpochSampler(n, shuffle=True, seed=1, rank=rank, world_size=world,
                         equal_shards=equal)
        assert s.num_indices() == len(s._indices())
        s.set_epoch(2, start=3)
        assert len(s) == len(list(s)) == max(len(s._indices()) - 3, 0)


def test_lengths_draw_no_permutation(lp, tmp_path, monkeypatch):
    """len(MapTrainLoader) and the runner's iters_per_epoch come from arithmetic."""
    from lavis_plugins.runners.mixture import MapTrainLoader

    loader = MapTrainLoader(MapCaptions(n=41), seed=0, batch_size=4)
    runner = _runner(tmp_path, "len", {"d": {"train": MapCaptions(n=41)}})

    def no_randperm(*a, **k):
        raise AssertionError("a length drew a permutation")

    monkeypatch.setattr(torch, "randperm", no_randperm)
    assert len(loader) == 10 and runner.iters_per_epoch == 10


class Recorder(Toy):
    """Keeps every training batch's (epoch, caption, image) it is given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, samples):
        for img, text in zip(samples["image"], samples["text_input"]):
            self.seen.append((samples["epoch"], int(text.split()[-1]), img.clone()))
        return super().forward(samples)


def test_runner_workers_augment_with_the_epoch_they_read(lp, tmp_path):
    """With a worker process, sample i of epoch e is augmented from (seed, e, i): the stream sets
    the epoch before its workers copy the dataset (the runner set it after making the iterator,
    so from epoch 1 on the workers repeated the previous epoch's augmentation)."""
    from lavis_plugins.runners.sampling import SeededSamples

    runner = _runner(tmp_path, "workers", {"d": {"train": MapCaptions(n=8)}},
                     run={"num_workers": 1})
    model = runner._model = runner._wrapped_model = Recorder()
    runner.train()
    ref = SeededSamples(MapCaptions(n=8), 5)  # the run's seed
    assert sorted({e for e, _, _ in model.seen}) == [0, 1, 2]
    for epoch, i, img in model.seen:
        ref.epoch = epoch
        assert torch.equal(img, ref[i]["image"]), (epoch, i)


def test_map_stream_logs_no_bad_count_without_bad_samples(lp, tmp_path, caplog):
    runner = _runner(tmp_path, "clean", {"d": {"train": MapCaptions()}}, run={"max_epoch": 1})
    with caplog.at_level(logging.WARNING):
        runner.train()
    assert _epoch_stats(tmp_path / "clean")[0]["train_data_bad"] == "0"
    assert "could not be read" not in caplog.text


class Killed(Toy):
    """Toy that raises KeyboardInterrupt (a kill) on its ``at``-th call."""

    def __init__(self, at):
        super().__init__()
        self.calls, self.at = 0, at

    def forward(self, samples):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt("simulated kill")
        return super().forward(samples)


def test_shard_run_killed_mid_epoch_resumes_to_the_same_losses(lp, tmp_path):
    """Shards read by 2 workers: a run killed at step 8 of epoch 0 (10 steps per epoch), resumed
    from its last checkpoint (step 6), gives the uninterrupted run's losses for every later
    step, across the epoch boundary."""
    def run(job, model, **extra):
        runner = _runner(tmp_path, job, {"web": {"train": _shard_dataset(tmp_path)}},
                         run={"max_epoch": 2, "num_workers": 2, "ckpt_freq": 3, **extra})
        runner._model = runner._wrapped_model = model
        runner.train()
        return [json.loads(l)["loss"]
                for l in (tmp_path / job / "train_log.jsonl").read_text().splitlines()]

    torch.manual_seed(0)
    ref = run("full", Toy())
    assert len(ref) == 20
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        run("killed", Killed(at=8))
    torch.manual_seed(321)  # another process state: the checkpoint restores what matters
    got = run("resumed", Toy(),
              resume_ckpt_path=str(tmp_path / "killed" / "checkpoint_step6.pth"))
    assert got == pytest.approx(ref[6:], rel=1e-6, abs=1e-7)
