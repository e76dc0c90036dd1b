"""lp_blip2_qformer on its own: builds from its YAML, trains every trainable weight, decodes, and
refuses bad configs, inputs and checkpoints with a UserError."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lavis_plugins.common.errors import UserError

CAPTIONS = ["a red circle", "a blue square on the left", "two green triangles", "a small cat"]


@pytest.fixture(scope="module")
def model(lp, tiny_bert_dir):
    torch.manual_seed(0)
    m = lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir))
    with torch.no_grad():  # away from init, so queries and images differ clearly
        for name, p in m.named_parameters():
            if name != "temp":
                p.add_(torch.randn_like(p) * 0.1)
    return m


def samples(n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "text_input": CAPTIONS[:n]}


def no_dropout(m: nn.Module) -> None:
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
        if hasattr(mod, "dropout_p"):
            mod.dropout_p = 0.0


def test_tiny_yaml_builds_with_the_documented_sizes(model):
    assert model.query_tokens.shape == (1, 4, 32)
    assert model.visual_encoder.num_features == 32
    assert len(model.tokenizer) == model.Qformer.config.vocab_size  # [DEC] added
    assert model.Qformer.cls.predictions.decoder.weight is \
        model.Qformer.bert.embeddings.word_embeddings.weight  # tied, as in LAVIS
    assert not any(p.requires_grad for p in model.visual_encoder.parameters())
    model.train()
    assert not model.visual_encoder.training  # frozen encoder stays in eval mode


def test_every_trainable_weight_gets_a_finite_gradient(model):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = model(samples())
    for key in ("loss", "loss_itc", "loss_itm", "loss_itg", "acc_itc", "acc_itm"):
        assert torch.isfinite(out[key]), key
    assert torch.allclose(out.loss, out.loss_itc + out.loss_itm + out.loss_itg)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    bad = [n for n, p in model.named_parameters()
           if p.requires_grad and not torch.isfinite(p.grad).all()]
    assert not bad


def test_qformer_gradient_checkpointing_changes_nothing(model):
    m = copy.deepcopy(model)
    m.train()
    no_dropout(m)
    results = []
    for flag in (False, True):
        m.Qformer.bert.gradient_checkpointing = flag
        m.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # same ITM negatives
        out = m(samples())
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                                             if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-6)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6), n


def test_vit_gradient_checkpointing_changes_nothing(lp, tiny_bert_dir):
    outs = []
    for flag in (False, True):
        torch.manual_seed(0)
        m = lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir),
                          freeze_vit=False, use_grad_checkpoint=flag)
        m.train()
        no_dropout(m)
        torch.manual_seed(1)
        out = m(samples())
        out.loss.backward()
        outs.append((out.loss.detach(), m.visual_encoder.patch_embed.proj.weight.grad.clone()))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-6)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-6)
    assert outs[0][1].abs().sum() > 0  # the unfrozen encoder does learn


def test_generate_beam_and_nucleus_return_one_caption_per_image(model):
    model.eval()
    images = samples()["image"]
    beam = model.generate({"image": images}, num_beams=3, max_length=10, min_length=3)
    assert len(beam) == 4 and all(isinstance(c, str) and c for c in beam)
    assert beam == model.generate({"image": images}, num_beams=3, max_length=10, min_length=3)
    torch.manual_seed(0)
    nucleus = model.generate({"image": images}, use_nucleus_sampling=True, max_length=10,
                             min_length=3, top_p=0.9)
    assert len(nucleus) == 4 and all(isinstance(c, str) for c in nucleus)


def test_cached_decoding_matches_a_full_pass(model):
    """Greedy decoding with cached keys/values picks, at every step, the argmax of the logits a
    single teacher-forced ITG pass gives for the same prefix."""
    from transformers.generation.logits_process import LogitsProcessorList

    from lavis_plugins.models.qformer import causal_text_mask

    model.eval()
    with torch.no_grad():
        image_embeds = model.encode_image(samples()["image"])
        _, query_kv = model.query_kv_pass(image_embeds)
        ids = model._sample(query_kv, LogitsProcessorList(), max_length=8, top_p=1.0,
                            sample=False)
        assert 2 <= ids.shape[1] <= 8 and (ids[:, 0] == model.tokenizer.bos_token_id).all()
        mask = torch.ones_like(ids)
        hidden, _ = model.Qformer.bert(input_ids=ids, past_key_values=query_kv,
                                       attention_mask=causal_text_mask(mask, model.num_query))
        greedy = model.Qformer.cls(hidden).argmax(-1)  # (B, L): prediction after each prefix
    eos = model.tokenizer.sep_token_id
    for row, pred in zip(ids, greedy):
        for t in range(1, ids.shape[1]):
            assert row[t] == pred[t - 1]
            if row[t] == eos:
                break


def test_extract_features_shapes(model):
    model.eval()
    s = samples()
    img = model.extract_features(s, mode="image")
    assert img.image_embeds.shape == (4, 4, 32) and img.image_embeds_proj.shape == (4, 4, 16)
    assert torch.allclose(img.image_embeds_proj.norm(dim=-1), torch.ones(4, 4))
    txt = model.extract_features(s, mode="text")
    assert txt.text_embeds.shape[:1] == (4,) and txt.text_embeds_proj.shape[-1] == 16
    mm = model.extract_features(s, mode="multimodal")
    assert mm.multimodal_embeds.shape == (4, 4, 32) and mm.image_embeds is None
    with pytest.raises(UserError, match="mode"):
        model.extract_features(s, mode="video")


def test_long_captions_are_truncated_to_max_txt_len(model):
    text = model.tokenize(["a " * 100, "a dog"])
    assert text.input_ids.shape == (2, model.max_txt_len)
    assert text.input_ids[0, -1] == model.tokenizer.sep_token_id


def test_empty_caption_names_the_sample(model):
    bad = dict(samples(), text_input=["a dog", "  ", "a cat", "x"], image_id=[10, 11, 12, 13])
    with pytest.raises(UserError, match=r"sample 1 .*image_id=11"):
        model(bad)


def test_one_pair_cannot_draw_itm_negatives(model):
    with pytest.raises(UserError, match="at least 2"):
        model(samples(1))


def test_unknown_config_key_is_named(lp, tiny_bert_dir):
    with pytest.raises(UserError, match=r"num_query_tokens.*Accepted.*num_query_token"):
        lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir),
                      num_query_tokens=8)
    with pytest.raises(UserError, match="tiny_vit key"):
        lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir),
                      tiny_vit={"widht": 8})


def test_missing_weights_are_user_errors(lp, tiny_bert_dir, tmp_path):
    with pytest.raises(UserError, match="vit_path is not set"):
        lp.load_model("lp_blip2_qformer", "pretrain", bert_path=str(tiny_bert_dir))
    with pytest.raises(UserError, match="not a file"):
        lp.load_model("lp_blip2_qformer", "pretrain", bert_path=str(tiny_bert_dir),
                      vit_path=str(tmp_path / "nope.pth"))
    with pytest.raises(UserError, match="bert_path"):
        lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tmp_path / "no-bert"))
    with pytest.raises(UserError, match="pretrained is empty"):
        lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir),
                      load_pretrained=True)


def test_half_precision_encoder_on_cpu_is_a_user_error(tiny_bert_dir):
    from lavis_plugins.models.blip2_qformer import Blip2QformerConfig, LPBlip2Qformer

    m = LPBlip2Qformer(Blip2QformerConfig(bert_path=str(tiny_bert_dir), vit_model="tiny",
                                          image_size=32, vit_precision="fp16"))
    assert m.visual_encoder.patch_embed.proj.weight.dtype == torch.float16
    assert m.visual_encoder.cls_token.dtype == torch.float32  # LAVIS casts Conv/Linear only
    with pytest.raises(UserError, match="vit_precision: fp32"):
        m.encode_image(samples()["image"])


def test_bad_checkpoints_are_refused(model, lp, tiny_bert_dir, tmp_path):
    with pytest.raises(UserError, match="URL"):
        model.load_checkpoint("https://example.com/blip2.pth")
    with pytest.raises(UserError, match="not a file"):
        model.load_checkpoint(str(tmp_path / "missing.pth"))
    # another model's weights: no Q-Former
    other = tmp_path / "other.pth"
    torch.save({"model": {"llm_proj.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(UserError, match="trained weights missing"):
        model.load_checkpoint(str(other))
    # same names, other sizes (embed_dim 8 instead of 16)
    small = lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir), embed_dim=8)
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": small.state_dict()}, wrong)
    with pytest.raises(UserError, match=r"embed_dim: vision_proj.weight is \(8, 32\) in the file"):
        model.load_checkpoint(str(wrong))


def test_checkpoint_round_trip_through_the_config(model, lp, tiny_bert_dir, tmp_path):
    path = tmp_path / "stage1.pth"
    torch.save({"model": model.state_dict()}, path)
    loaded = lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir),
                           load_finetuned=True, finetuned=str(path))
    model.eval(), loaded.eval()
    s = samples(seed=3)
    assert torch.allclose(loaded.extract_features(s, "image").image_embeds,
                          model.extract_features(s, "image").image_embeds)


def test_tiny_bert_path_is_made_once(lp, tmp_path, monkeypatch):
    from lavis_plugins.models.blip2_base import resolve_bert_path

    monkeypatch.setenv("LAVIS_PLUGINS_CACHE", str(tmp_path))
    path = resolve_bert_path("tiny")
    assert (tmp_path / "tiny-bert" / "config.json").is_file()
    assert resolve_bert_path("tiny") == path
    m = lp.load_model("lp_blip2_qformer", "tiny")
    assert m.Qformer.config.hidden_size == 32


@pytest.mark.parametrize("vit_model", ["eva_clip_g", "clip_L"])
def test_lavis_encoders_load_local_files_only(vit_model, tmp_path, monkeypatch):
    """LAVIS's create_eva_vit_g / create_clip_vit_L, shrunk to a few small layers, read a local
    file (no download): its weights arrive; a file of another model is refused."""
    from lavis.models import clip_vit, eva_vit

    from lavis_plugins.models.blip2_base import LPBlip2Base

    module = eva_vit if vit_model == "eva_clip_g" else clip_vit
    full = module.VisionTransformer

    class Small(full):  # LAVIS's class at a fraction of the size
        def __init__(self, *args, **kwargs):
            if vit_model == "eva_clip_g":
                kwargs.update(embed_dim=32, depth=2, num_heads=2)
            else:
                kwargs.update(width=32, layers=2, heads=2)
            super().__init__(*args, **kwargs)

    def fail(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(module, "VisionTransformer", Small)
    monkeypatch.setattr(module, "download_cached_file", fail)
    build = lambda path: LPBlip2Base.init_vision_encoder(  # noqa: E731
        vit_model, 28, 0.0, False, "fp32", vit_path=path)

    ref, _ = build("random")
    path = tmp_path / "vit.pth"
    torch.save(ref.state_dict(), path)
    enc, ln = build(str(path))
    assert ln.normalized_shape == (32,)
    for (k, a), b in zip(ref.state_dict().items(), enc.state_dict().values()):
        assert torch.equal(a, b), k
    torch.save({"something.else": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="is not a"):
        build(str(path))
    assert module.download_cached_file is fail  # restored after use


def test_model_pickles_and_copies_with_its_frozen_encoder(model):
    import pickle

    clone = pickle.loads(pickle.dumps(model))
    clone.train()
    assert clone.training and not clone.visual_encoder.training
    assert torch.equal(clone.query_tokens, model.query_tokens)


def test_cached_encoder_outputs_replace_the_encoder_only_when_frozen(model, lp, tiny_bert_dir):
    model.eval()
    s = samples()
    with torch.no_grad():
        raw = model.visual_encoder(s["image"])  # what a feature cache stores
        torch.manual_seed(0)
        inline = model(s)
        torch.manual_seed(0)
        cached = model({"image_embeds": raw, "text_input": s["text_input"]})
    assert torch.allclose(inline.loss, cached.loss, atol=1e-6)
    unfrozen = lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir),
                             freeze_vit=False)
    with pytest.raises(UserError, match="freeze_vit"):
        unfrozen({"image_embeds": raw, "text_input": s["text_input"]})
