"""Shard (webdataset) pre-training data: make-shards, the (rank, worker) partition, multi-caption
draws, bad data, and exact mid-epoch resume through lp_runner (1 process via the CLI with the
tiny Q-Former; 2 gloo processes x 2 workers with a toy model). All shards are tiny and written
here."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import run_forked

N_IMAGES = 37  # not a multiple of any batch x world: the tail is exercised


@pytest.fixture(scope="module")
def caption_folder(tmp_path_factory) -> Path:
    """37 tiny PNGs (each its own colour) and a LAVIS caption annotation file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("captions")
    (root / "img").mkdir()
    anns = []
    for i in range(N_IMAGES):
        Image.fromarray(np.full((8, 8, 3), (i * 6, 255 - i * 6, i), np.uint8)).save(
            root / "img" / f"{i}.png")
        anns.append({"image": f"{i}.png", "caption": f"a shape number {i}", "image_id": i})
    (root / "ann.json").write_text(json.dumps(anns))
    return root


@pytest.fixture(scope="module")
def shards(caption_folder, lp) -> str:
    """make-shards output: 8 shards of up to 5 samples; returns the brace pattern."""
    from lavis_plugins.cli import main

    out = caption_folder / "shards"
    assert main(["make-shards", "--ann", str(caption_folder / "ann.json"), "--images",
                 str(caption_folder / "img"), "--out", str(out), "--shard-size", "5"]) == 0
    return f"{out}/train-{{000000..000007}}.tar"


def _dataset(pattern, shuffle_buffer=6, processor=None, **kw):
    import torchvision.transforms as T

    from lavis_plugins.datasets.shard_plan import expand_shard_spec, load_shard_set
    from lavis_plugins.datasets.webdataset_caption import ShardCaptionDataset

    shard_set = load_shard_set(expand_shard_spec(pattern, "test"), "test")
    return ShardCaptionDataset(shard_set, processor or T.ToTensor(), None,
                               shuffle_buffer=shuffle_buffer, **kw)


def _epoch(ds, rank, world, workers, batch, epoch=0, start=0, field="sample_key"):
    from torch.utils.data import DataLoader

    ds.configure(seed=3, rank=rank, world_size=world, batch_size=batch, num_workers=workers)
    ds.set_epoch(epoch, start)
    return [b[field] for b in DataLoader(ds, batch_size=None, num_workers=workers)]


# ------------------------------------------------------------------------------ make-shards
def test_make_shards_round_trip_every_annotation_is_one_sample(caption_folder, shards):
    from lavis_plugins.datasets.shard_plan import INDEX_FILE, expand_shard_spec, load_shard_set
    from lavis_plugins.datasets.webdataset_caption import read_segments
    from lavis_plugins.datasets.shard_plan import Segment

    index = json.loads((caption_folder / "shards" / INDEX_FILE).read_text())
    assert [e["samples"] for e in index["shards"]] == [5] * 7 + [2]
    shard_set = load_shard_set(expand_shard_spec(shards, "t"), "t")
    raws = list(read_segments(shard_set, [Segment(i, 0, n) for i, n in enumerate(shard_set.sizes)]))
    anns = json.loads((caption_folder / "ann.json").read_text())
    assert len(raws) == len(anns)
    for raw, ann in zip(raws, anns):  # same order, bytes and fields
        assert raw.files["png"] == (caption_folder / "img" / ann["image"]).read_bytes()
        assert raw.files["txt"].decode() == ann["caption"]
        assert json.loads(raw.files["json"]) == ann


@pytest.mark.parametrize("case, expect", [
    ("missing_ann", "does not exist"),
    ("no_caption", "annotation 1 (1.png) has no caption"),
    ("missing_image", "image nope.png is not under --images"),
    ("shard_size", "--shard-size must be a positive integer"),
    ("not_empty", "is not empty"),
])
def test_make_shards_bad_input_one_line(caption_folder, tmp_path, capsys, case, expect):
    from lavis_plugins.cli import main

    anns = json.loads((caption_folder / "ann.json").read_text())[:3]
    ann = tmp_path / "a.json"
    size, out = "2", tmp_path / "out"
    if case == "no_caption":
        del anns[1]["caption"]
    if case == "missing_image":
        anns[2]["image"] = "nope.png"
    if case == "shard_size":
        size = "0"
    if case == "not_empty":
        out.mkdir()
        (out / "x").write_text("")
    if case != "missing_ann":
        ann.write_text(json.dumps(anns))
    code = main(["make-shards", "--ann", str(ann), "--images", str(caption_folder / "img"),
                 "--out", str(out), "--shard-size", size])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expect in err and len(err.splitlines()) == 1, err
    if case in ("no_caption", "missing_image"):
        assert not out.exists() and not (tmp_path / "out.tmp").exists()  # nothing half-written


# ------------------------------------------------------------------------------ partition
def test_partition_two_ranks_two_workers_no_duplicate_or_missing(shards):
    ds = _dataset(shards)
    seen = {}
    for epoch in (0, 1):
        per_rank = [_epoch(ds, r, 2, 2, 4, epoch) for r in range(2)]
        assert [len(b) for b in per_rank] == [4, 4]  # K = 37 // (2 * 4) steps on every rank
        keys = [k for batches in per_rank for b in batches for k in b]
        assert all(len(b) == 4 for batches in per_rank for b in batches)
        assert len(keys) == len(set(keys)) == 32  # no duplicate; the tail is 37 - 32 = 5
        seen[epoch] = keys
        # the same (seed, epoch) gives the same batches, whatever ran before
        assert _epoch(ds, 1, 2, 2, 4, epoch) == per_rank[1]
    assert seen[0] != seen[1] and set(seen[0]) != set(seen[1])  # a different tail each epoch
    # 6 shards (30 samples) fill every batch of 2 ranks x 3: every sample is seen exactly once
    ds30 = _dataset(shards.replace("000007", "000005"))
    keys = [k for r in range(2) for b in _epoch(ds30, r, 2, 2, 3, 0) for k in b]
    assert len(keys) == 30 and set(keys) == {f"train-{i // 5:06d}.tar/{i:09d}" for i in range(30)}


def test_partition_resume_at_every_batch_gives_the_rest(shards):
    """Starting an epoch at batch s (any worker rotation) yields the uninterrupted batches s..K."""
    ds = _dataset(shards, shuffle_buffer=3)
    for workers in (0, 2, 3):
        full = _epoch(ds, 0, 1, workers, 2)
        assert len(full) == 18
        for s in (1, 5, 8, 17):
            assert _epoch(ds, 0, 1, workers, 2, start=s) == full[s:], (workers, s)


def test_multi_caption_draw_is_seeded_per_sample(tmp_path, lp):
    import webdataset as wds

    from lavis_plugins.datasets.shard_plan import expand_shard_spec, load_shard_set

    path = tmp_path / "multi-000000.tar"
    png = _png_bytes()
    with wds.TarWriter(str(path)) as sink:
        for i in range(8):
            sink.write({"__key__": f"k{i}", "png": png,
                        "captions.json": json.dumps([f"first {i}", f"second {i}"]).encode()})
    ds = _dataset(str(path))

    def captions(epoch, workers):  # {sample: caption drawn} of one epoch
        keys = sum(_epoch(ds, 0, 1, workers, 4, epoch), [])
        texts = sum(_epoch(ds, 0, 1, workers, 4, epoch, field="text_input"), [])
        return dict(zip(keys, texts))

    draws = {e: captions(e, 0) for e in range(12)}
    assert draws[3] == captions(3, 2)  # the draw is the sample's, whichever worker reads it
    firsts = [sum(t.startswith("first") for t in d.values()) for d in draws.values()]
    assert 0 < sum(firsts) < 8 * 12  # both captions are drawn
    assert len({tuple(sorted(d.items())) for d in draws.values()}) > 1  # and vary by epoch
    assert load_shard_set(expand_shard_spec(str(path), "t"), "t").sizes == [8]  # counted


def _png_bytes(value=128):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ bad data
def test_bad_samples_are_counted_skipped_and_named(tmp_path, lp, caplog):
    import webdataset as wds

    from lavis_plugins.common.errors import UserError
    from lavis_plugins.runners.shard_loader import ShardTrainLoader

    path = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(12):
            sample = {"__key__": f"k{i}", "png": _png_bytes(), "txt": f"caption {i}"}
            if i == 4:
                sample["png"] = b"not an image"
            if i == 7:
                del sample["txt"]
            sink.write(sample)
    ds = _dataset(str(path), max_bad_fraction=0.2)
    loader = ShardTrainLoader(ds, seed=0, batch_size=4)
    with caplog.at_level(logging.WARNING):
        batches = list(loader.epoch_batches(0))
    assert sum(len(b["text_input"]) for b in batches) == 10
    assert loader.epoch_summary()["data_bad"] == "2"
    log = caplog.text
    assert "bad-000000.tar key k4: corrupt image" in log and "key k7: no caption" in log
    ds.max_bad_fraction = 0.1  # 2 bad of 12 is more than 10%: a clear error
    with pytest.raises(UserError, match="max_bad_fraction=0.1"):
        list(ShardTrainLoader(ds, seed=0, batch_size=4).epoch_batches(0))


def test_missing_and_truncated_shards_are_counted_and_skipped(caption_folder, shards, tmp_path,
                                                              caplog):
    import shutil

    from lavis_plugins.common.errors import UserError
    from lavis_plugins.datasets.shard_plan import expand_shard_spec, load_shard_set

    folder = tmp_path / "broken"
    shutil.copytree(caption_folder / "shards", folder)
    (folder / "train-000003.tar").unlink()
    data = (folder / "train-000005.tar").read_bytes()
    (folder / "train-000005.tar").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        s = load_shard_set(expand_shard_spec(f"{folder}/train-{{000000..000007}}.tar", "x"), "x")
    assert len(s.paths) == 7 and s.total < N_IMAGES - 5
    assert s.bad == N_IMAGES - s.total  # every lost sample is counted
    assert "train-000003.tar is missing (5 samples lost)" in caplog.text
    assert "train-000005.tar is truncated" in caplog.text
    from lavis_plugins.runners.shard_loader import ShardTrainLoader

    ds = _dataset(f"{folder}/train-{{000000..000007}}.tar", max_bad_fraction=0.2)
    loader = ShardTrainLoader(ds, seed=0, batch_size=2, workers={"num_workers": 2})
    keys = [k for b in loader.epoch_batches(0) for k in b["sample_key"]]
    # the cut shard's last readable sample may have lost its image: counted bad when read
    bad = loader.budget.bad
    assert len(keys) == len(set(keys)) == (s.total // 2) * 2 - bad and bad <= 1
    # img2dataset's layout (<shard>_stats.json, no byte size): a cut-off shard has no tar end
    # marker and is counted by reading it; the samples its stats promised and it lost are bad
    img2ds = tmp_path / "img2dataset"
    img2ds.mkdir()
    data = (caption_folder / "shards" / "train-000000.tar").read_bytes()
    (img2ds / "00000.tar").write_bytes(data[:3000])
    (img2ds / "00000_stats.json").write_text(json.dumps({"successes": 5}))
    shutil.copy(caption_folder / "shards" / "train-000001.tar", img2ds / "00001.tar")
    (img2ds / "00001_stats.json").write_text(json.dumps({"successes": 6}))  # overcounts by 1
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        s = load_shard_set([str(img2ds / "00000.tar"), str(img2ds / "00001.tar")], "x")
    assert "00000.tar is truncated: 3000 bytes, no end-of-archive blocks" in caplog.text
    assert s.sizes[1] == 6 and s.bad == 5 - s.sizes[0]
    # a shard that delivers fewer samples than planned: the missing positions are bad when read
    ds = _dataset(str(img2ds / "00001.tar"), max_bad_fraction=0.5)
    loader = ShardTrainLoader(ds, seed=0, batch_size=2)
    with caplog.at_level(logging.WARNING):
        got = sum(len(b["text_input"]) for b in loader.epoch_batches(0))
    assert got == 5 and loader.budget.bad == 1 and "ended early" in caplog.text
    with pytest.raises(UserError, match="unbalanced braces"):
        expand_shard_spec("/data/{000..009.tar", "datasets.x.build_info.shards")
    with pytest.raises(UserError, match="none of the 2 shard"):
        load_shard_set([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], "x")


# ------------------------------------------------------------------------------ through the runner
SHARD_YAML = """# lavis-plugins train --cfg-path shards.yaml
model:
  arch: lp_blip2_qformer
  model_type: tiny
  bert_path: {bert}
  image_size: 32
datasets:
  lp_webdataset_caption:
    build_info:
      shards: {shards}
      shuffle_buffer: 6
    vis_processor:
      train:
        name: blip2_image_train
        image_size: 32
run:
  task: lp_image_text_pretrain
  runner: lp_runner
  init_lr: 1e-3
  min_lr: 1e-5
  warmup_steps: 2
  max_epoch: 2
  batch_size_train: 4
  num_workers: 2
  log_freq: 1
  ckpt_freq: 5
  seed: 42
  device: cpu
  output_dir: {out}
  train_splits: [train]
"""


def _losses(job):
    return [json.loads(l)["loss"] for l in (job / "train_log.jsonl").read_text().splitlines()]


def test_cli_shard_training_resumes_exactly_mid_epoch(shards, tmp_path, tiny_bert_dir):
    """One process, 2 workers: resumed from a checkpoint in the middle of epoch 0 (batch 5 of
    9), the run's per-step losses equal the uninterrupted run's."""
    from lavis_plugins.cli import main

    cfg = tmp_path / "shards.yaml"
    cfg.write_text(SHARD_YAML.format(bert=tiny_bert_dir, shards=shards, out=tmp_path / "out"))
    assert main(["train", "--cfg-path", str(cfg), "--job-id", "full"]) == 0
    full = tmp_path / "out" / "full"
    ref = _losses(full)
    assert len(ref) == 2 * (N_IMAGES // 4)
    ckpt = torch.load(full / "checkpoint_step5.pth", weights_only=False)
    assert (ckpt["next_epoch"], ckpt["next_iter"]) == (0, 5) and ckpt["data"]["kind"] == "shards"
    torch.manual_seed(999)  # another process state: the checkpoint restores what matters
    assert main(["train", "--cfg-path", str(cfg), "--job-id", "resumed", "--options",
                 f"run.resume_ckpt_path={full / 'checkpoint_step5.pth'}"]) == 0
    got = _losses(tmp_path / "out" / "resumed")
    assert got == pytest.approx(ref[5:], rel=1e-6, abs=1e-7)
    stats = (full / "log.txt").read_text()
    assert '"train_data_bad": "0"' in stats and '"train_data_samples": "36"' in stats


class ToyImageText(nn.Module):
    """A loss of image and caption with dropout: the runner, the data order and the RNG matter."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2)
        self.drop = nn.Dropout(0.3)

    def forward(self, samples):
        feats = samples["image"].mean(dim=(2, 3))
        target = torch.tensor([[len(t) / 10.0, float(t.split()[-1]) / 40.0]
                               for t in samples["text_input"]])
        return {"loss": ((self.drop(self.proj(feats)) - target) ** 2).mean()}


class _Cfg:
    """The part of LAVIS's ``Config`` the runner reads."""

    def __init__(self, run, datasets=None):
        from omegaconf import OmegaConf

        self.config = OmegaConf.create({"run": run, "model": {}, "datasets": datasets or {}})
        self.run_cfg, self.datasets_cfg = self.config.run, self.config.datasets

    def to_dict(self):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(self.config)


def _toy_run(rank, init_file, pattern, out_dir, job, resume):
    import torch.distributed as dist
    from lavis.tasks.base_task import BaseTask
    from omegaconf import OmegaConf

    from lavis.common.registry import registry
    from lavis_plugins.runners.runner import PluginRunner

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(5)
    builder = registry.get_builder_class("lp_webdataset_caption")(OmegaConf.create({
        "build_info": {"shards": pattern, "shuffle_buffer": 4},
        "vis_processor": {"train": {"name": "blip2_image_train", "image_size": 8}}}))
    run = dict(max_epoch=2, init_lr=1e-2, min_lr=1e-4, warmup_steps=1, batch_size_train=4,
               num_workers=2, seed=11, output_dir=str(out_dir), device="cpu", distributed=True,
               train_splits=["train"], log_freq=1, ckpt_freq=3, lr_sched="lp_linear_warmup_cosine")
    if resume:
        run["resume_ckpt_path"] = resume

    runner = PluginRunner(cfg=_Cfg(run), task=BaseTask(), model=ToyImageText(),
                          datasets={"toy": builder.build_datasets()}, job_id=job)
    runner.train()


def _spawn_pair(tmp_path, tag, pattern, job, resume=None):
    init = str(tmp_path / f"init-{tag}")
    run_forked(_toy_run, [(r, init, pattern, tmp_path, job, resume) for r in range(2)])


def test_two_gloo_processes_two_workers_resume_exactly_mid_epoch(lp, shards, tmp_path):
    """2 ranks x 2 workers, 4 steps per epoch: resumed from the checkpoint after step 3 (epoch 0,
    batch 3: an odd batch, so the workers' runs rotate), the losses equal the full run's."""
    _spawn_pair(tmp_path, "full", shards, "full")
    ref = _losses(tmp_path / "full")
    assert len(ref) == 2 * (N_IMAGES // 8)
    _spawn_pair(tmp_path, "resumed", shards, "resumed",
                resume=str(tmp_path / "full" / "checkpoint_step3.pth"))
    got = _losses(tmp_path / "resumed")
    assert got == pytest.approx(ref[3:], rel=1e-6, abs=1e-7)


# ------------------------------------------------------------------------------ mixing
def test_mixture_choices_follow_the_ratios_and_depend_on_seed_and_epoch_only(lp):
    from lavis_plugins.runners.mixture import mixture_choices

    probs = [0.6, 0.3, 0.1]  # sample_ratio 6 : 3 : 1
    c = mixture_choices(probs, seed=1, epoch=0, steps=20000)
    share = np.bincount(c, minlength=3) / len(c)
    assert np.abs(share - probs).max() < 0.015  # binomial std ~0.0035 at 20k draws
    assert (mixture_choices(probs, 1, 0, 20000) == c).all()
    assert (mixture_choices(probs, 1, 1, 20000) != c).any()


@pytest.mark.parametrize("ratios, run_ratios, expect", [
    ({"a": 0, "b": 1}, None, "datasets.a.sample_ratio must be a positive number"),
    ({"a": -2, "b": 1}, None, "got -2"),
    ({"a": "many", "b": 1}, None, "got 'many'"),
    ({"a": 1, "b": 1}, {"a": 2}, "not both"),
    ({}, {"c": 2}, "names ['c']"),
])
def test_bad_sample_ratio_is_one_clear_error(lp, ratios, run_ratios, expect):
    from omegaconf import OmegaConf

    from lavis_plugins.common.errors import UserError
    from lavis_plugins.runners.mixture import mixture_ratios

    cfg = OmegaConf.create({n: {"sample_ratio": r} for n, r in ratios.items()})
    run = OmegaConf.create({"train_dataset_ratios": run_ratios} if run_ratios else {})
    with pytest.raises(UserError, match=expect.replace("[", r"\[").replace("]", r"\]")):
        mixture_ratios(["a", "b"], cfg, run)


class ToyMapCaptions(torch.utils.data.Dataset):
    """A map-style (JSON-like) caption dataset with random augmentation noise."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        image = torch.full((3, 8, 8), i / 40.0) + 0.1 * torch.randn(3, 8, 8)
        return {"image": image, "text_input": f"map caption {i}"}

    def collater(self, samples):
        return {"image": torch.stack([s["image"] for s in samples]),
                "text_input": [s["text_input"] for s in samples]}


def test_mixed_json_and_shard_datasets_train_and_resume_exactly(lp, shards, tmp_path):
    """A map-style dataset (ratio 3) and a shard dataset (ratio 1) in one run; resumed in the
    middle of epoch 1, the losses equal the uninterrupted run's."""
    from lavis.tasks.base_task import BaseTask

    from lavis_plugins.runners.runner import PluginRunner

    def run(job, **extra):
        import torchvision.transforms as T

        torch.manual_seed(0)
        shard_ds = _dataset(shards, processor=T.Compose([T.Resize(8), T.ToTensor()]))
        run_cfg = dict(max_epoch=2, init_lr=1e-2, min_lr=1e-4, warmup_steps=1, batch_size_train=4,
                       num_workers=0, seed=5, output_dir=str(tmp_path), device="cpu",
                       train_splits=["train"], log_freq=1, ckpt_freq=4, iters_per_epoch=12,
                       lr_sched="lp_linear_warmup_cosine", **extra)

        cfg = _Cfg(run_cfg, {"maps": {"sample_ratio": 3}, "webshards": {"sample_ratio": 1}})
        runner = PluginRunner(cfg=cfg, task=BaseTask(), model=ToyImageText(), job_id=job,
                              datasets={"maps": {"train": ToyMapCaptions()},
                                        "webshards": {"train": shard_ds}})
        runner.train()
        return tmp_path / job

    full = run("mix_full")
    ref = _losses(full)
    assert len(ref) == 24
    stats = [json.loads(l) for l in (full / "log.txt").read_text().splitlines()
             if l.startswith("{\"train_")]
    taken = [(int(s["train_data_batches_maps"]), int(s["train_data_batches_webshards"]))
             for s in stats]
    assert all(m + w == 12 and m > 0 and w > 0 for m, w in taken)
    assert sum(m for m, _ in taken) > sum(w for _, w in taken)  # 3 : 1
    got = _losses(run("mix_resumed", resume_ckpt_path=str(full / "checkpoint_step16.pth")))
    assert got == pytest.approx(ref[16:], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("option, expect", [
    ("datasets.lp_webdataset_caption.build_info.shards=null", "build_info.shards is not set"),
    ("datasets.lp_webdataset_caption.build_info.shards=/nowhere/{0..3}.tar",
     "none of the 4 shard(s) exists"),
    ("datasets.lp_webdataset_caption.build_info.max_bad_fraction=2", "must be a number in [0, 1]"),
    ("datasets.lp_webdataset_caption.build_info.shuffle_buffer=0", "positive integer, got 0"),
    ("datasets.lp_webdataset_caption.build_info.reduced_decode=sometimes",
     "reduced_decode must be true or false, got 'sometimes'"),
    ("datasets.lp_webdataset_caption.feature_cache=/tmp/cache", "feature_cache serves map-style"),
    ("run.batch_size_train=64", "cannot fill one batch of 64"),
])
def test_cli_bad_shard_config_is_one_clear_error(shards, tmp_path, tiny_bert_dir, capsys, option,
                                                 expect):
    from lavis_plugins.cli import main

    cfg = tmp_path / "shards.yaml"
    cfg.write_text(SHARD_YAML.format(bert=tiny_bert_dir, shards=shards, out=tmp_path / "out"))
    code = main(["train", "--cfg-path", str(cfg), "--options", option])
    err = [l for l in capsys.readouterr().err.splitlines() if "lavis-plugins: error" in l]
    assert code == 2 and len(err) == 1 and expect in err[0], err


def test_shipped_laion_stage1_yaml_trains_on_shards(shards, tmp_path, tiny_bert_dir, monkeypatch):
    """projects/blip2/train/pretrain_stage1_laion.yaml as shipped, with the shards, the model and
    the device swapped for tiny test ones by --options (as a user points it at their data)."""
    from lavis_plugins.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["train", "--cfg-path", "projects/blip2/train/pretrain_stage1_laion.yaml",
                 "--job-id", "laion", "--options",
                 f"datasets.lp_laion_shards.build_info.shards={shards}",
                 "datasets.lp_laion_shards.vis_processor.train.image_size=32",
                 "model.model_type=tiny", "model.vit_model=tiny", "model.vit_precision=fp32",
                 "model.num_query_token=4", "model.embed_dim=16", "model.max_txt_len=16",
                 f"model.bert_path={tiny_bert_dir}", "model.image_size=32",
                 "run.device=cpu", "run.amp=False", "run.max_epoch=1", "run.iters_per_epoch=2",
                 "run.batch_size_train=4", "run.num_workers=0", "run.warmup_steps=1",
                 "run.log_freq=1"])
    assert code == 0
    log = _losses(tmp_path / "output" / "BLIP2" / "pretrain_stage1_laion" / "laion")
    assert len(log) == 2


def test_shipped_stage2_mixture_yaml_names_blip2s_corpora_with_ratios(lp):
    import argparse

    from lavis.common.config import Config

    from conftest import REPO

    path = REPO / "projects/blip2/train/pretrain_stage2_mixture_opt2.7b.yaml"
    cfg = Config(argparse.Namespace(cfg_path=str(path), options=[]))
    ratios = {n: d.sample_ratio for n, d in cfg.datasets_cfg.items()}
    assert set(ratios) == {"coco_caption", "vg_caption", "lp_cc3m_shards", "lp_cc12m_shards",
                           "lp_sbu_shards", "lp_laion_shards"}  # and no phantom default entry
    assert all(r > 0 for r in ratios.values()) and max(ratios, key=ratios.get) == "lp_laion_shards"
