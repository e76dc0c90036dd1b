"""Frozen-encoder feature cache: build, serve, refuse mismatches, and train from it."""
from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="module")
def caption_train(lp, shapes_home):
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    from lavis_plugins.paths import config_path

    cfg = OmegaConf.load(config_path("datasets/lp_shapes/defaults_caption.yaml"))
    builder = registry.get_builder_class("lp_shapes_caption")(cfg.datasets.lp_shapes_caption)
    ds = builder.build_datasets()["train"]
    ds.annotation = ds.annotation[:24]  # a few images are enough
    return ds


@pytest.fixture(scope="module")
def tiny_model(lp, tiny_bert_dir):
    torch.manual_seed(0)
    return lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir), image_size=64)


def test_cache_serves_encoder_outputs(caption_train, tiny_model, tmp_path):
    from lavis_plugins.common.feature_cache import CachedFeatureDataset, build_feature_cache

    enc = tiny_model.visual_encoder
    cache = build_feature_cache(enc, caption_train, tmp_path / "cache", image_size=64,
                                batch_size=8, progress=False)
    ds = CachedFeatureDataset(caption_train, cache, enc, image_size=64)
    assert len(ds) == len(caption_train)
    s = ds[3]
    ann = caption_train.annotation[3]
    from PIL import Image

    img = caption_train.vis_processor(
        Image.open(os.path.join(caption_train.vis_root, ann["image"])).convert("RGB"))
    with torch.no_grad():
        ref = enc(img[None]).float()[0]
    # stored as float16
    torch.testing.assert_close(s["image_embeds"], ref, rtol=2e-3, atol=2e-3)
    assert s["text_input"] == caption_train.text_processor(ann["caption"])
    batch = ds.collater([ds[0], ds[1]])
    assert batch["image_embeds"].shape == (2,) + tuple(ref.shape)


def test_cache_refuses_other_encoder_and_changed_images(caption_train, tiny_model, tmp_path,
                                                       tiny_bert_dir, lp):
    from lavis_plugins.common.errors import UserError
    from lavis_plugins.common.feature_cache import CachedFeatureDataset, build_feature_cache

    cache = build_feature_cache(tiny_model.visual_encoder, caption_train, tmp_path / "c",
                                image_size=64, progress=False)
    torch.manual_seed(1)
    other = lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir), image_size=64)
    with pytest.raises(UserError, match="another image encoder"):
        CachedFeatureDataset(caption_train, cache, other.visual_encoder, image_size=64)
    with pytest.raises(UserError, match="no feature cache"):
        CachedFeatureDataset(caption_train, tmp_path / "nothing", None, image_size=64)
    # an image touched after caching
    path = os.path.join(caption_train.vis_root, caption_train.annotation[0]["image"])
    st = os.stat(path)
    try:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        with pytest.raises(UserError, match="changed since caching"):
            CachedFeatureDataset(caption_train, cache, tiny_model.visual_encoder, image_size=64)
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_training_step_from_cache_equals_inline_encoder(caption_train, tiny_model, tmp_path):
    """With cached features the model skips its encoder and computes the same losses (up to the
    float16 storage of the features)."""
    from lavis_plugins.common.feature_cache import CachedFeatureDataset, build_feature_cache

    enc = tiny_model.visual_encoder
    cache = build_feature_cache(enc, caption_train, tmp_path / "t", image_size=64, progress=False)
    cached = CachedFeatureDataset(caption_train, cache, enc, image_size=64)
    idx = [0, 1, 2, 3]
    batch_c = cached.collater([cached[i] for i in idx])
    batch_i = caption_train.collater([caption_train[i] for i in idx])
    batch_i["text_input"] = batch_c["text_input"]  # the train text processor is deterministic
    tiny_model.eval()
    torch.manual_seed(0)
    out_c = tiny_model(batch_c)
    torch.manual_seed(0)
    out_i = tiny_model(batch_i)
    torch.testing.assert_close(out_c.loss_itc, out_i.loss_itc, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(out_c.loss_itg, out_i.loss_itg, rtol=1e-2, atol=1e-3)


def test_cli_caches_then_trains_from_the_cache(lp, tmp_path, tiny_bert_dir, shapes_home, capsys):
    """`lavis-plugins cache-features` then `train` on the same YAML: the run reads the cache."""
    from lavis_plugins.cli import main

    cache = tmp_path / "cache"
    cfg = tmp_path / "cached.yaml"
    cfg.write_text(f"""# lavis-plugins cache-features --cfg-path cached.yaml
model: {{arch: lp_blip2_qformer, model_type: tiny, bert_path: {tiny_bert_dir}, image_size: 64}}
datasets:
  lp_shapes_caption: {{feature_cache: {cache}}}
run: {{task: lp_image_text_pretrain, runner: lp_runner, init_lr: 1e-3, max_epoch: 1,
      iters_per_epoch: 2, batch_size_train: 4, batch_size_eval: 64, device: cpu, seed: 1,
      output_dir: {tmp_path / 'out'}, train_splits: [train]}}
""")
    # training before the cache exists names the fix
    assert main(["train", "--cfg-path", str(cfg)]) == 2
    assert "cache-features" in capsys.readouterr().err
    assert main(["cache-features", "--cfg-path", str(cfg)]) == 0
    assert (cache / "features.npy").is_file()
    assert main(["train", "--cfg-path", str(cfg)]) == 0
    # a model with another encoder is refused
    assert main(["train", "--cfg-path", str(cfg), "--options", "model.tiny_vit.depth=2"]) == 2
    assert "another image encoder" in capsys.readouterr().err


# --- augmented views (feature_cache_views: K)

VIEWS = 3


@pytest.fixture(scope="module")
def augmented_train(caption_train):
    """The caption split with blip2_image_train's augmentation (random resized crop + flip)."""
    import copy

    from lavis.processors.blip_processors import Blip2ImageTrainProcessor

    ds = copy.copy(caption_train)
    ds.annotation = caption_train.annotation[:8]
    ds.vis_processor = Blip2ImageTrainProcessor(image_size=64)
    return ds


@pytest.fixture(scope="module")
def views_cache(augmented_train, tiny_model, tmp_path_factory):
    from lavis_plugins.common.feature_cache import build_feature_cache

    return build_feature_cache(tiny_model.visual_encoder, augmented_train,
                               tmp_path_factory.mktemp("views") / "cache", image_size=64,
                               batch_size=5, progress=False, views=VIEWS, seed=11)


def test_each_cached_view_is_the_encoder_on_that_augmented_image(augmented_train, tiny_model,
                                                                 views_cache):
    """Row r * K + k holds the encoder's output on the image that blip2_image_train makes with
    the global RNGs seeded by view_seed(seed, r, k); the K views of an image differ."""
    import json

    import numpy as np
    from PIL import Image

    from lavis_plugins.common.feature_cache import FEATS, META, view_seed
    from lavis_plugins.common.seeding import seeded_global_rngs

    feats = np.load(views_cache / FEATS)
    keys = json.loads((views_cache / META).read_text())["keys"]  # one per distinct image
    assert len(keys) >= 3 and feats.shape[0] == len(keys) * VIEWS
    enc = tiny_model.visual_encoder.eval()
    for row in (0, 2):  # rows of the first and the second build batch (5 // 3 = 1 image each)
        image = Image.open(keys[row]).convert("RGB")
        for k in range(VIEWS):
            with seeded_global_rngs(view_seed(11, row, k)):
                pixels = augmented_train.vis_processor(image)
            with torch.no_grad():
                ref = enc(pixels[None]).float()[0]
            got = torch.from_numpy(feats[row * VIEWS + k].astype("float32"))
            torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)
        views = torch.from_numpy(feats[row * VIEWS:(row + 1) * VIEWS].astype("float32"))
        assert all((views[a] - views[b]).abs().max() > 1e-2
                   for a in range(VIEWS) for b in range(a))


def test_view_draw_depends_on_seed_epoch_and_sample_only(augmented_train, views_cache):
    """Through lp_runner's per-sample seeding, sample i of epoch e reads the same view whatever
    the order of reads; other epochs or seeds draw other views; every view is used."""
    import numpy as np

    from lavis_plugins.common.feature_cache import FEATS, CachedFeatureDataset
    from lavis_plugins.runners.sampling import SeededSamples

    feats = np.load(views_cache / FEATS)
    cached = CachedFeatureDataset(augmented_train, views_cache, None, 64, views=VIEWS)

    def views(seed, epoch, order):
        ds = SeededSamples(cached, seed)
        ds.epoch = epoch
        out = {}
        for i in order:
            emb = ds[i]["image_embeds"].numpy().astype(np.float16)
            row = cached.row[os.path.join(augmented_train.vis_root,
                                          augmented_train.annotation[i]["image"])]
            hits = [k for k in range(VIEWS) if np.array_equal(feats[row * VIEWS + k], emb)]
            assert len(hits) == 1  # the sample is exactly one cached view of its own image
            out[i] = hits[0]
        return [out[i] for i in range(len(cached))]

    n = len(cached)
    first = views(7, 0, range(n))
    assert views(7, 0, reversed(range(n))) == first  # order (resume, workers) does not matter
    epochs = [views(7, e, range(n)) for e in range(1, 6)]
    assert any(e != first for e in epochs)
    assert views(8, 0, range(n)) != first or views(9, 0, range(n)) != first
    assert set(sum(epochs, first)) == set(range(VIEWS))


class _EmbedRegressor(torch.nn.Module):
    """Reads only image_embeds (the cached path) and fails at a chosen call (a killed run)."""

    def __init__(self, width, fail_at_call=None):
        super().__init__()
        self.head = torch.nn.Linear(width, 1)
        self.calls, self.fail_at_call = 0, fail_at_call

    @property
    def device(self):
        return self.head.weight.device

    def forward(self, samples):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise KeyboardInterrupt("simulated kill")
        pooled = samples["image_embeds"].mean(1)  # (B, D)
        return {"loss": (self.head(pooled) - 1.0).pow(2).mean()}

    def before_evaluation(self, **kwargs):
        pass


def test_killed_and_resumed_run_reads_the_same_views(lp, augmented_train, views_cache, tmp_path):
    """A run on the K-view cache killed after a mid-epoch checkpoint and resumed gives the
    uninterrupted run's per-step losses (the views drawn after the resume are the same)."""
    import json

    import numpy as np
    from lavis.tasks.base_task import BaseTask
    from omegaconf import OmegaConf

    from lavis_plugins.common.feature_cache import FEATS, CachedFeatureDataset
    from lavis_plugins.runners.runner import PluginRunner

    class Cfg:
        def __init__(self, **run):
            self.config = OmegaConf.create({"run": run, "model": {}, "datasets": {}})
            self.run_cfg = self.config.run

        def to_dict(self):
            return OmegaConf.to_container(self.config)

    def runner(job, model, **extra):
        run = dict(max_epoch=3, init_lr=1e-2, min_lr=1e-4, warmup_steps=1, weight_decay=0.0,
                   batch_size_train=2, batch_size_eval=2, num_workers=0, seed=5,
                   output_dir=str(tmp_path), device="cpu", train_splits=["train"],
                   log_freq=1, ckpt_freq=3, lr_sched="lp_linear_warmup_cosine", **extra)
        ds = CachedFeatureDataset(augmented_train, views_cache, None, 64, views=VIEWS)
        return PluginRunner(cfg=Cfg(**run), task=BaseTask(), model=model,
                            datasets={"shapes": {"train": ds}}, job_id=job)

    def losses(r):
        return [json.loads(x)["loss"] for x in
                (r.output_dir / "train_log.jsonl").read_text().splitlines()]

    width = np.load(views_cache / FEATS, mmap_mode="r").shape[-1]
    torch.manual_seed(0)
    full = runner("full", _EmbedRegressor(width))
    full.train()
    ref = losses(full)
    assert len(ref) == 12  # 3 epochs x 4 steps

    torch.manual_seed(0)
    killed = runner("killed", _EmbedRegressor(width, fail_at_call=8))
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    ckpt = killed.output_dir / "checkpoint_step6.pth"
    assert ckpt.is_file()
    torch.manual_seed(99)  # another process state: the checkpoint restores what matters
    resumed = runner("resumed", _EmbedRegressor(width), resume_ckpt_path=str(ckpt))
    resumed.train()
    assert losses(resumed) == pytest.approx(ref[6:], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("value, message", [
    (0, "=0: must be a whole number >= 1"), (-2, "=-2: must be"), ("3", "='3': must be"),
    (2.5, "=2.5: must be"), (True, "=True: must be")])
def test_views_key_refuses_bad_values(value, message):
    from lavis_plugins.common.errors import UserError
    from lavis_plugins.common.feature_cache import cache_views

    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        cache_views({"feature_cache": "/x", "feature_cache_views": value}, "d")
    with pytest.raises(UserError, match="feature_cache is not"):
        cache_views({"feature_cache_views": 2}, "d")
    assert cache_views({"feature_cache": "/x"}, "d") == 1


def test_cache_refuses_other_views_or_processor(augmented_train, caption_train, views_cache):
    import copy

    from lavis_plugins.common.errors import UserError
    from lavis_plugins.common.feature_cache import CachedFeatureDataset

    with pytest.raises(UserError, match="holds 3 view\\(s\\) per image but the config asks for "
                                        "feature_cache_views=2"):
        CachedFeatureDataset(augmented_train, views_cache, None, 64, views=2)
    plain = copy.copy(caption_train)
    plain.annotation = augmented_train.annotation
    with pytest.raises(UserError, match="made with another image processor"):
        CachedFeatureDataset(plain, views_cache, None, 64, views=VIEWS)


def test_cli_caches_augmented_views_then_trains(lp, tmp_path, tiny_bert_dir, shapes_home,
                                                capsys):
    """The YAML path: blip2_image_train + feature_cache_views: 3 -> cache-features writes 3
    views per image, train reads them; asking for 2 views of that cache is refused."""
    import json

    from lavis_plugins.cli import main

    cache = tmp_path / "cache"
    cfg = tmp_path / "views.yaml"
    cfg.write_text(f"""# lavis-plugins cache-features --cfg-path views.yaml
model: {{arch: lp_blip2_qformer, model_type: tiny, bert_path: {tiny_bert_dir}, image_size: 64}}
datasets:
  lp_shapes_caption:
    feature_cache: {cache}
    feature_cache_views: 3
    vis_processor: {{train: {{name: blip2_image_train, image_size: 64}}}}
run: {{task: lp_image_text_pretrain, runner: lp_runner, init_lr: 1e-3, max_epoch: 1,
      iters_per_epoch: 2, batch_size_train: 4, batch_size_eval: 64, device: cpu, seed: 1,
      output_dir: {tmp_path / 'out'}, train_splits: [train]}}
""")
    assert main(["cache-features", "--cfg-path", str(cfg)]) == 0
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["views"] == 3 and meta["shape"][0] == 3 * len(meta["keys"])
    assert "RandomResizedCrop" in meta["processor"]
    assert main(["train", "--cfg-path", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["train", "--cfg-path", str(cfg), "--options",
                 "datasets.lp_shapes_caption.feature_cache_views=2"]) == 2
    assert "feature_cache_views=2" in capsys.readouterr().err
