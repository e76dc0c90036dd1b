"""Stage-2 parity, fp32, tiny random configs.

(a) training loss and logits of lp_blip2_opt / lp_blip2_t5 equal LAVIS's Blip2OPT / Blip2T5 (1e-5)
    for the same weights and inputs;
(b) the renaming of transformers' weights (whole-model parity with transformers' classes, pixels
    in: tests/test_hf_folders.py);
(c) greedy generation gives the same text as LAVIS and as transformers.
Plus checkpoint loading: a LAVIS .pth as it is, a stage-1 checkpoint, and the width-mismatch error.

LAVIS builds offline here: its BERT comes from the tiny ``bert-base-uncased`` folder (we chdir to
its parent), its ViT is replaced by a copy of ours, and its OPT/T5 load from the tiny folders.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from lavis_plugins.common.errors import UserError
from lavis_plugins.models.blip2_base import use_sdpa_attention

B = 3
CAPTIONS = ["a photo of a cat on the tree", "a photo of two dogs",
            "a photo of a red car near a man"]
QUESTIONS = ["what color is the car?", "how many dogs", "is the sky blue?"]
ANSWERS = ["red", "two", "yes"]


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    from lavis_plugins.common.tiny_llm import make_tiny_opt, make_tiny_t5

    root = tmp_path_factory.mktemp("llm")
    return {"opt": make_tiny_opt(root / "opt"), "t5": make_tiny_t5(root / "t5")}



def _ours(arch, tiny_bert_dir, llm_dir, **over):
    from lavis_plugins.api import load_model

    key = {"lp_blip2_opt": "opt_model", "lp_blip2_t5": "t5_model"}[arch]
    over = dict({"bert_path": str(tiny_bert_dir), key: str(llm_dir)}, **over)
    return load_model(arch, "tiny", **over)


def _lavis(cls_name, ours, llm_dir, tiny_bert_dir, **kw):
    """LAVIS's reference class with our ViT and exactly our weights."""
    from lavis.models.blip2_models import blip2
    from lavis.models.blip2_models.blip2_opt import Blip2OPT
    from lavis.models.blip2_models.blip2_t5 import Blip2T5

    vit = copy.deepcopy(ours.visual_encoder)
    assert use_sdpa_attention(vit, enabled=False)  # LAVIS's own EVA attention
    saved = blip2.Blip2Base.init_vision_encoder
    cwd = os.getcwd()
    blip2.Blip2Base.init_vision_encoder = classmethod(
        lambda cls, *a, **k: (vit, blip2.LayerNorm(vit.num_features)))
    os.chdir(tiny_bert_dir.parent)  # LAVIS loads the literal "bert-base-uncased"
    try:
        if cls_name == "opt":
            ref = Blip2OPT(num_query_token=ours.query_tokens.shape[1], opt_model=str(llm_dir),
                           max_txt_len=ours.max_txt_len, **kw)
        else:
            ref = Blip2T5(num_query_token=ours.query_tokens.shape[1], t5_model=str(llm_dir),
                          max_txt_len=ours.max_txt_len, **kw)
    finally:
        blip2.Blip2Base.init_vision_encoder = saved
        os.chdir(cwd)
    ref = ref.float().eval()  # LAVIS keeps OPT in fp16 and T5 in bf16, even on CPU
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return ref


def _capture_logits(module):
    out = {}
    module.register_forward_hook(lambda m, i, o: out.__setitem__("logits", o))
    return out


@pytest.fixture(scope="module")
def opt_pair(lp, tiny_bert_dir, llm_dirs, device):
    torch.manual_seed(0)
    ours = _ours("lp_blip2_opt", tiny_bert_dir, llm_dirs["opt"], prompt="a photo of").eval()
    ref = _lavis("opt", ours, llm_dirs["opt"], tiny_bert_dir, prompt="a photo of")
    return ours.to(device), ref.to(device)


@pytest.fixture(scope="module")
def t5_pair(lp, tiny_bert_dir, llm_dirs, device):
    torch.manual_seed(0)
    ours = _ours("lp_blip2_t5", tiny_bert_dir, llm_dirs["t5"],
                 t5_dense_act_fn="gelu").eval()  # LAVIS forces exact gelu too
    ref = _lavis("t5", ours, llm_dirs["t5"], tiny_bert_dir)
    return ours.to(device), ref.to(device)


def _images(seed=1, device="cpu"):
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(device)


# ------------------------------------------------------------------ (a) LAVIS: loss and logits
def test_opt_loss_and_logits_equal_lavis(opt_pair):
    ours, ref = opt_pair
    samples = {"image": _images(1, ours.device), "text_input": CAPTIONS}
    captured = _capture_logits(ref.opt_model.lm_head)
    with torch.no_grad():
        ref_loss = ref(dict(samples))["loss"]
        out = ours(dict(samples), return_logits=True)
    nq = ours.query_tokens.shape[1]
    ref_logits = captured["logits"][:, nq - 1:-1]  # the positions that predict text tokens
    assert out.logits.shape == ref_logits.shape
    assert torch.allclose(out.loss, ref_loss, atol=1e-5, rtol=0)
    # every position, padding included (masked keys give the same rows in both)
    assert torch.allclose(out.logits, ref_logits, atol=1e-5, rtol=0)
    # the prompt ("a photo of" + BOS) and padding carry no loss, as in LAVIS
    assert (out.targets[:, :ours.prompt_length] == -100).all()


def test_opt_training_loss_without_padding_equals_lavis_and_padded(opt_pair, monkeypatch):
    """The training forward (no logits asked for) runs OPT without its padding rows and its
    last layer on the loss rows only (models/_opt_packed.py): the loss equals LAVIS's, and loss
    and gradients equal those of transformers' whole decoder (the path ``return_logits``
    takes)."""
    from lavis_plugins.models import blip2_opt

    ours, ref = opt_pair
    captions = CAPTIONS[:2] + ["a photo of it"]  # lengths differ: the batch has padding rows
    samples = {"image": _images(2, ours.device), "text_input": captions}
    with torch.no_grad():
        ref_loss = ref(dict(samples))["loss"]
    layers = ours.opt_model.get_decoder().layers
    rows = {}  # rows through the first and the last layer's feed-forward
    hooks = [layers[i].fc1.register_forward_hook(
        lambda m, args, out, i=i: rows.__setitem__(i, args[0].flatten(0, -2).shape[0]))
        for i in (0, -1)]
    grads, seen = {}, {}
    try:
        for packed in (True, False):
            if not packed:
                monkeypatch.setattr(blip2_opt, "supports_packing", lambda decoder: False)
            ours.zero_grad(set_to_none=True)
            out = ours(dict(samples))
            out.loss.backward()
            grads[packed] = (out.loss.detach(), ours.opt_proj.weight.grad.clone(),
                             ours.query_tokens.grad.clone())
            seen[packed] = dict(rows)
    finally:
        for h in hooks:
            h.remove()
    ours.zero_grad(set_to_none=True)
    assert out.logits is None
    enc = ours.llm_tokenizer([c + "\n" for c in captions], padding="longest")
    nq, tokens = ours.query_tokens.shape[1], sum(map(sum, enc.attention_mask))
    targets = tokens - B * ours.prompt_length  # the prompt (with BOS) carries no loss
    assert seen[False] == {0: B * (nq + len(enc.input_ids[0])), -1: B * (nq + len(
        enc.input_ids[0]))}
    assert seen[True] == {0: B * nq + tokens, -1: targets}
    assert torch.allclose(grads[True][0], ref_loss, atol=1e-5, rtol=0)
    for a, b in zip(grads[True], grads[False]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_opt_gradients_reach_qformer_not_llm(opt_pair):
    ours, _ = opt_pair
    ours.train()
    try:
        out = ours({"image": _images(1, ours.device), "text_input": CAPTIONS})
        out.loss.backward()
    finally:
        ours.eval()
    assert ours.opt_proj.weight.grad is not None and ours.query_tokens.grad is not None
    assert all(p.grad is None for p in ours.opt_model.parameters())
    assert all(p.grad is None for p in ours.visual_encoder.parameters())
    ours.zero_grad(set_to_none=True)


def test_t5_loss_and_logits_equal_lavis(t5_pair):
    ours, ref = t5_pair
    samples = {"image": _images(1, ours.device), "text_input": QUESTIONS, "text_output": ANSWERS}
    captured = _capture_logits(ref.t5_model.lm_head)
    with torch.no_grad():
        ref_loss = ref(dict(samples))["loss"]
        out = ours(dict(samples), return_logits=True)
    assert torch.allclose(out.loss, ref_loss, atol=1e-5, rtol=0)
    assert torch.allclose(out.logits, captured["logits"], atol=1e-5, rtol=0)


# ------------------------------------------------------------------ (c) LAVIS: greedy generation
def test_opt_greedy_generation_equals_lavis(opt_pair):
    ours, ref = opt_pair
    samples = {"image": _images(2, ours.device)}
    # LAVIS's min_length counts prompt tokens (so 1 means none); ours counts new tokens
    theirs = ref.generate(dict(samples), num_beams=1, max_length=8, min_length=1)
    mine = ours.generate(dict(samples), num_beams=1, max_length=8, min_length=0)
    assert mine == theirs and any(mine)


def test_t5_greedy_generation_equals_lavis(t5_pair):
    ours, ref = t5_pair
    samples = {"image": _images(2, ours.device), "prompt": "Question: what is it? Short answer:"}
    theirs = ref.generate(dict(samples), num_beams=1, max_length=8, min_length=1)
    mine = ours.generate(dict(samples), num_beams=1, max_length=8, min_length=0)
    assert mine == theirs and any(mine)


def test_opt_batched_prompts_left_padded_equal_one_by_one(opt_pair):
    """Different prompt lengths in one batch (left padding) give each sample's own result."""
    ours, _ = opt_pair
    image = _images(3, ours.device)
    prompts = ["a", "a photo of a red car and", "Question: what is it? Answer:"]
    batched = ours.generate({"image": image, "prompt": prompts}, num_beams=2, max_length=6)
    single = [ours.generate({"image": image[i:i + 1], "prompt": prompts[i]}, num_beams=2,
                            max_length=6)[0] for i in range(B)]
    assert batched == single


# ------------------------------------------------------------------ (b) transformers
# whole-model parity (pixels in, sizes from config.json): tests/test_hf_folders.py
def test_hf_key_converter_inverts_transformers_conversion():
    """vision qkv bias split, attention renames, embeddings LayerNorm, projection, LLM."""
    from lavis_plugins.models.hf_format import hf_to_lavis_state_dict

    q, v = torch.randn(4), torch.randn(4)
    hf = {
        "vision_model.encoder.layers.0.self_attn.qkv.bias": torch.cat([q, torch.zeros(4), v]),
        "vision_model.encoder.layers.0.self_attn.projection.weight": torch.ones(1),
        "vision_model.post_layernorm.weight": torch.ones(1),
        "qformer.layernorm.bias": torch.ones(1),
        "qformer.encoder.layer.0.attention.attention.query.weight": torch.ones(1),
        "qformer.encoder.layer.0.crossattention.attention.key.bias": torch.ones(1),
        "qformer.encoder.layer.0.output_query.dense.weight": torch.ones(1),
        "query_tokens": torch.ones(1),
        "language_projection.weight": torch.ones(1),
        "language_model.lm_head.weight": torch.ones(1),
    }
    out = hf_to_lavis_state_dict(hf, "opt_proj", "opt_model")
    assert set(out) == {
        "visual_encoder.blocks.0.attn.q_bias", "visual_encoder.blocks.0.attn.v_bias",
        "visual_encoder.blocks.0.attn.proj.weight", "ln_vision.weight",
        "Qformer.bert.embeddings.LayerNorm.bias",
        "Qformer.bert.encoder.layer.0.attention.self.query.weight",
        "Qformer.bert.encoder.layer.0.crossattention.self.key.bias",
        "Qformer.bert.encoder.layer.0.output_query.dense.weight", "query_tokens",
        "opt_proj.weight", "opt_model.lm_head.weight"}
    assert torch.equal(out["visual_encoder.blocks.0.attn.q_bias"], q)
    assert torch.equal(out["visual_encoder.blocks.0.attn.v_bias"], v)
    with pytest.raises(UserError, match="unexpected weight"):
        hf_to_lavis_state_dict({"text_decoder.weight": torch.ones(1)}, "opt_proj", "opt_model")


# ------------------------------------------------------------------ checkpoints
def test_lavis_pth_loads_as_is(opt_pair, tiny_bert_dir, llm_dirs, tmp_path):
    ours, ref = opt_pair
    path = tmp_path / "blip2_opt.pth"
    # LAVIS-style file: the trained weights (the frozen LLM is not saved)
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("opt_model.")}
    torch.save({"model": state}, path)
    from lavis_plugins.api import load_model

    loaded = load_model("lp_blip2_opt", "tiny", checkpoint=str(path), bert_path=str(tiny_bert_dir),
                        opt_model=str(llm_dirs["opt"]), prompt="a photo of").eval()
    samples = {"image": _images(), "text_input": CAPTIONS}
    with torch.no_grad():
        assert torch.allclose(loaded(dict(samples)).loss, ours(dict(samples)).loss, atol=1e-6)


def test_projection_width_mismatch_names_both_widths(opt_pair, tiny_bert_dir, llm_dirs, tmp_path):
    _, ref = opt_pair
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("opt_model.")}
    state["opt_proj.weight"] = torch.zeros(64, state["opt_proj.weight"].shape[1])
    state["opt_proj.bias"] = torch.zeros(64)
    path = tmp_path / "wide.pth"
    torch.save({"model": state}, path)
    from lavis_plugins.api import load_model

    with pytest.raises(UserError, match=r"width 64.*hidden size 32"):
        load_model("lp_blip2_opt", "tiny", checkpoint=str(path), bert_path=str(tiny_bert_dir),
                   opt_model=str(llm_dirs["opt"]))


@pytest.mark.parametrize("momentum_distill", [False, True])
def test_stage1_checkpoint_initialises_qformer(lp, tiny_bert_dir, llm_dirs, tmp_path,
                                               momentum_distill):
    """... also from a run with momentum distillation, whose EMA weights stage 2 drops."""
    from lavis_plugins.models.blip2_qformer import Blip2QformerConfig, LPBlip2Qformer

    torch.manual_seed(3)
    stage1 = LPBlip2Qformer(Blip2QformerConfig(bert_path=str(tiny_bert_dir), vit_model="tiny",
                                               vit_precision="fp32", image_size=32,
                                               num_query_token=4,
                                               momentum_distill=momentum_distill))
    assert any(k.startswith("momentum_model.") for k in stage1.state_dict()) == momentum_distill
    path = tmp_path / "stage1.pth"
    torch.save({"model": stage1.state_dict()}, path)
    ours = _ours("lp_blip2_opt", tiny_bert_dir, llm_dirs["opt"], stage1_checkpoint=str(path))
    s1, s2 = stage1.state_dict(), ours.state_dict()
    shared = [k for k in s2 if k.startswith(("Qformer.", "query_tokens", "ln_vision.",
                                             "visual_encoder."))]
    assert len(shared) > 20 and all(torch.equal(s1[k], s2[k]) for k in shared)


def test_llm_folder_must_exist(lp, tiny_bert_dir, tmp_path):
    with pytest.raises(UserError, match="neither a local folder nor in the local hub cache"):
        _ours("lp_blip2_opt", tiny_bert_dir, tmp_path / "nowhere")


def test_unknown_config_key_lists_accepted_keys(lp, tiny_bert_dir, llm_dirs):
    with pytest.raises(UserError, match=r"unknown key\(s\) \['opt_modle'\].*accepted keys"):
        _ours("lp_blip2_opt", tiny_bert_dir, llm_dirs["opt"], opt_modle="x")
