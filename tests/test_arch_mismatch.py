"""Loading refuses checkpoints of another architecture, naming the setting that differs, and the
processors that ``load_model_and_preprocess`` returns follow an ``image_size`` override."""
from __future__ import annotations

import pytest
import torch

from lavis_plugins.common.errors import UserError


def _stage1(lp, tiny_bert_dir, **over):
    return lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir), **over)


@pytest.fixture(scope="module")
def freq1_file(lp, tiny_bert_dir, tmp_path_factory):
    """A stage-1 checkpoint trained with cross-attention in every Q-Former layer."""
    path = tmp_path_factory.mktemp("freq1") / "stage1_freq1.pth"
    torch.save({"model": _stage1(lp, tiny_bert_dir, cross_attention_freq=1).state_dict()}, path)
    return path


def test_stage1_refuses_cross_attention_freq_mismatch(lp, tiny_bert_dir, freq1_file):
    # before: loaded with a warning, dropping the trained cross-attention of layer 1
    with pytest.raises(UserError, match=r"set model\.cross_attention_freq: 1"):
        _stage1(lp, tiny_bert_dir, checkpoint=str(freq1_file))
    # built with the file's setting, it loads
    _stage1(lp, tiny_bert_dir, cross_attention_freq=1, checkpoint=str(freq1_file))


def test_stage2_names_cross_attention_freq_not_vit_model(lp, tiny_bert_dir, freq1_file):
    with pytest.raises(UserError, match=r"cross_attention_freq 1\).*set model\.cross_attention_"
                                        r"freq: 1") as e:
        lp.load_model("lp_blip2_opt", "tiny", bert_path=str(tiny_bert_dir),
                      stage1_checkpoint=str(freq1_file))
    assert "vit_model" not in str(e.value) and "bert_path" not in str(e.value)


def test_vision_width_mismatch_names_tiny_vit(lp, tiny_bert_dir, tmp_path):
    wide = _stage1(lp, tiny_bert_dir, tiny_vit={"width": 48, "heads": 2})
    path = tmp_path / "wide_vit.pth"
    torch.save({"model": wide.state_dict()}, path)
    with pytest.raises(UserError, match=r"width \(tiny_vit\)"):
        _stage1(lp, tiny_bert_dir, checkpoint=str(path))


def test_num_query_token_mismatch_gives_the_value(lp, tiny_bert_dir, tmp_path):
    path = tmp_path / "q8.pth"
    torch.save({"model": _stage1(lp, tiny_bert_dir, num_query_token=8).state_dict()}, path)
    with pytest.raises(UserError, match=r"set model\.num_query_token: 8"):
        _stage1(lp, tiny_bert_dir, checkpoint=str(path))


def test_processors_follow_image_size_override(lp, tiny_bert_dir):
    from PIL import Image

    model, vis, _ = lp.load_model_and_preprocess("lp_blip2_qformer", "tiny", is_eval=True,
                                                 bert_path=str(tiny_bert_dir), image_size=48)
    raw = Image.new("RGB", (100, 80), (200, 30, 30))
    for split in ("train", "eval"):
        assert vis[split](raw).shape == (3, 48, 48), split
    # the first image goes through (before: an AssertionError inside LAVIS's patch embedding)
    feats = model.extract_features({"image": vis["eval"](raw)[None]}, mode="image")
    assert feats.image_embeds.shape == (1, 4, model.Qformer.config.hidden_size)
