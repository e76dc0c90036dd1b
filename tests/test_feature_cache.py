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
