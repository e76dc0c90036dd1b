"""lp_blip2_qformer computes what LAVIS's Blip2Qformer computes, and their checkpoints swap.

Both are built offline from the same tiny BERT and the same tiny image encoder (swapped into
LAVIS's ``Blip2Base.init_vision_encoder``), given the same weights, and compared in fp32, in eval
mode and in train mode with dropout off. LAVIS's forward needs a process group only for
``dist.get_rank()`` / ``get_world_size()``: those are patched to a single process. Hard negatives
are drawn by ``torch.multinomial`` in both; it is replaced by argmax (the hardest negative) so
both pick the same ones.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

ATOL = 1e-5
IMG = 32
CAPTIONS = [
    "a dog",
    "a red car on the road near a tree",
    "two cats sitting",
    # longer than max_txt_len (16 tokens): both truncate
    "the sky is blue and there is one small white circle in the middle of it today",
]
SHORT_CAPTIONS = ["a dog", "a red car on the road", "two cats sitting", "the blue sky"]


def tiny_vit_config():
    from lavis_plugins.models.blip2_base import TinyVitConfig

    return TinyVitConfig(width=24, depth=1, heads=2, patch_size=8)


def build_lavis(mp: pytest.MonkeyPatch, bert_dir):
    """LAVIS's Blip2Qformer with the tiny BERT and our tiny image encoder swapped in."""
    from lavis.models.blip2_models.blip2 import Blip2Base
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    from lavis_plugins.models.blip2_base import LPBlip2Base

    def tiny_vit(cls, model_name, img_size, drop_path_rate, use_grad_checkpoint, precision):
        return LPBlip2Base.init_vision_encoder("tiny", img_size, drop_path_rate,
                                               use_grad_checkpoint, "fp32", tiny=tiny_vit_config(),
                                               sdpa=False)  # LAVIS's own attention

    mp.chdir(bert_dir.parent)  # LAVIS loads the literal name "bert-base-uncased"
    mp.setattr(Blip2Base, "init_vision_encoder", classmethod(tiny_vit))
    return Blip2Qformer(img_size=IMG, num_query_token=4, cross_attention_freq=2, embed_dim=16,
                        max_txt_len=16)


@pytest.fixture(scope="module")
def models(tiny_bert_dir, device):
    """(ours, LAVIS's) with identical, randomised weights, on ``--device`` (cpu by default)."""
    from lavis_plugins.models.blip2_qformer import Blip2QformerConfig, LPBlip2Qformer

    with pytest.MonkeyPatch.context() as mp:
        ref = build_lavis(mp, tiny_bert_dir)
    ours = LPBlip2Qformer(Blip2QformerConfig(
        bert_path=str(tiny_bert_dir), vit_model="tiny", tiny_vit=tiny_vit_config(),
        vit_precision="fp32", image_size=IMG, num_query_token=4, cross_attention_freq=2,
        embed_dim=16, max_txt_len=16))
    torch.manual_seed(1)
    with torch.no_grad():  # larger random weights, so that images and texts differ clearly
        for name, p in ref.named_parameters():
            if name != "temp":  # kept at 0.07, inside the range we clamp it to
                p.add_(torch.randn_like(p) * 0.2)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours.to(device), ref.to(device)


@pytest.fixture
def single_process(monkeypatch):
    """LAVIS's forward outside a process group; argmax instead of sampling negatives."""
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 1)
    monkeypatch.setattr(torch, "multinomial", lambda w, n, *a, **k: w.argmax(-1, keepdim=True))


def images(seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.randn(len(CAPTIONS), 3, IMG, IMG,
                       generator=torch.Generator().manual_seed(seed)).to(device)


def no_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_p"):
            m.dropout_p = 0.0


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=ATOL, rtol=1e-5)


def test_state_dicts_have_identical_keys_and_shapes(models):
    ours, ref = models
    a = {k: v.shape for k, v in ours.state_dict().items()}
    b = {k: v.shape for k, v in ref.state_dict().items()}
    assert a == b


@pytest.mark.parametrize("captions", ["truncated", "short"])
@pytest.mark.parametrize("mode", ["eval", "train_no_dropout"])
def test_losses_and_gradients_equal_lavis(models, single_process, mode, captions):
    """LAVIS pads every caption to max_txt_len, we to the batch's longest: same results."""
    ours, ref = models
    for m in (ours, ref):
        if mode == "eval":
            m.eval()
        else:
            m.train()
            no_dropout(m)
        m.zero_grad(set_to_none=True)
    samples = {"image": images(0, ours.device),
               "text_input": CAPTIONS if captions == "truncated" else SHORT_CAPTIONS}
    if captions == "short":
        assert ours.tokenize(SHORT_CAPTIONS).input_ids.shape[1] < ours.max_txt_len
    else:
        assert len(ours.tokenizer(CAPTIONS[-1]).input_ids) > ours.max_txt_len
    out = ours(samples)
    exp = ref(samples)
    assert close(out.loss_itc, exp.loss_itc)
    assert close(out.loss_itm, exp.loss_itm)
    assert close(out.loss_itg, exp.loss_lm)
    assert close(out.loss, exp.loss)
    # the losses are not degenerate: the images differ enough to be told apart
    assert abs(out.loss_itc.item() - torch.log(torch.tensor(4.0)).item()) > 1e-2

    out.loss.backward()
    exp.loss.backward()
    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, p in ours.named_parameters():
        if not p.requires_grad:
            continue
        q = ref_params[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name
            checked += 1
    assert checked > 50


def test_extract_features_equal_lavis(models):
    ours, ref = models
    ours.eval(), ref.eval()
    samples = {"image": images(1, ours.device), "text_input": SHORT_CAPTIONS}
    for mode, fields in [("image", ["image_embeds", "image_embeds_proj"]),
                         ("text", ["text_embeds", "text_embeds_proj"]),
                         ("multimodal", ["multimodal_embeds"])]:
        a = ours.extract_features(samples, mode=mode)
        b = ref.extract_features(samples, mode=mode)
        for f in fields:
            assert close(a[f], b[f]), (mode, f)


def test_itm_logits_and_scores_equal_lavis(models):
    ours, ref = models
    ours.eval(), ref.eval()
    image_embeds = ours.encode_image(images(2, ours.device))
    # fixed pairs: every image with the caption two places on
    text = ours.tokenize([SHORT_CAPTIONS[(i + 2) % 4] for i in range(4)])
    with torch.no_grad():
        ref_embeds = ref.ln_vision(ref.visual_encoder(images(2, ours.device)))
        assert close(image_embeds, ref_embeds)
        ref_score = ref.compute_itm(ref_embeds, text.input_ids, text.attention_mask)
        ref_logits = ref.itm_head(ref.extract_features(
            {"image": images(2, ours.device),
             "text_input": [SHORT_CAPTIONS[(i + 2) % 4] for i in range(4)]}
        ).multimodal_embeds).mean(1)
        assert close(ours.compute_itm(image_embeds, text.input_ids, text.attention_mask),
                     ref_score)
        assert close(ours.itm_logits(image_embeds, text.input_ids, text.attention_mask),
                     ref_logits)


def test_lavis_checkpoint_loads_into_ours(models, tmp_path, tiny_bert_dir):
    from lavis_plugins.models.blip2_qformer import LPBlip2Qformer

    ours, ref = models
    path = tmp_path / "lavis_blip2.pth"
    # as LAVIS's runner saves: only trainable weights, under "model"
    torch.save({"model": {k: v for k, v in ref.state_dict().items()
                          if not k.startswith("visual_encoder.")}, "epoch": 0}, path)
    fresh = LPBlip2Qformer(ours.cfg)
    fresh.visual_encoder.load_state_dict(ours.visual_encoder.state_dict())
    msg = fresh.load_checkpoint(str(path))
    assert all(k.startswith("visual_encoder.") for k in msg.missing_keys)
    assert not msg.unexpected_keys
    fresh.eval(), ref.eval()
    samples = {"image": images(3), "text_input": SHORT_CAPTIONS}
    assert close(fresh.extract_features(samples, "image").image_embeds_proj,
                 ref.extract_features(samples, "image").image_embeds_proj)


def test_our_checkpoint_loads_into_lavis(models, tmp_path, tiny_bert_dir, monkeypatch):
    ours, _ = models
    path = tmp_path / "ours.pth"
    torch.save({"model": ours.state_dict()}, path)
    lavis_model = build_lavis(monkeypatch, tiny_bert_dir)
    lavis_model.load_state_dict(torch.load(path)["model"], strict=True)
    lavis_model.eval(), ours.eval()
    samples = {"image": images(4), "text_input": SHORT_CAPTIONS}
    for mode, f in [("image", "image_embeds_proj"), ("text", "text_embeds_proj"),
                    ("multimodal", "multimodal_embeds")]:
        assert close(lavis_model.extract_features(samples, mode)[f],
                     ours.extract_features(samples, mode)[f]), mode


@pytest.mark.parametrize("mode,field", [("text", "text_embeds_proj"),
                                         ("multimodal", "multimodal_embeds")])
def test_extract_features_of_long_text_equal_lavis(models, mode, field):
    """LAVIS's extract_features does not truncate to max_txt_len: neither do we (same shapes)."""
    ours, ref = models
    ours.eval(), ref.eval()
    # the last caption is > max_txt_len tokens
    samples = {"image": images(5, ours.device), "text_input": CAPTIONS}
    theirs, mine = ref.extract_features(samples, mode)[field], ours.extract_features(samples,
                                                                                      mode)[field]
    if mode == "text":
        assert mine.shape[1] > ours.max_txt_len
    assert close(mine, theirs)
