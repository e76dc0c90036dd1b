"""lp_blip2_opt's generation runs the prompt's prefill once per image (not once per beam or
sample) and grows the key/value cache in place (lavis_plugins/models/_shared_prefill.py): the
sequences and every score equal transformers' plain ``generate`` bit for bit."""
from __future__ import annotations

import contextlib

import pytest
import torch

from lavis_plugins.models._shared_prefill import shared_prefill

PROMPTS = ["a photo of", "Question: what is in the picture? Answer:", "a", "x y z"]
# generate settings as BLIP-2 uses them: greedy captions, VQA's beam 5 with length penalty -1 and
# min/max length, several beams returned, and CapFilt's nucleus sampling with several captions
SETTINGS = {
    "greedy": dict(num_beams=1, max_new_tokens=8, min_new_tokens=1),
    "beam5_vqa": dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0),
    "beam5_min_length": dict(num_beams=5, max_new_tokens=12, min_new_tokens=8,
                             length_penalty=1.0, num_return_sequences=3),
    "nucleus": dict(do_sample=True, top_p=0.9, num_return_sequences=4, max_new_tokens=8),
}


@pytest.fixture(scope="module")
def opt(lp, tiny_bert_dir, tmp_path_factory):
    from lavis_plugins.api import load_model
    from lavis_plugins.common.tiny_llm import make_tiny_opt

    torch.manual_seed(0)
    llm_dir = make_tiny_opt(tmp_path_factory.mktemp("llm") / "opt")
    return load_model("lp_blip2_opt", "tiny", bert_path=str(tiny_bert_dir),
                      opt_model=str(llm_dir)).eval()


@pytest.fixture(scope="module")
def inputs(opt):
    """[visual prompt][left-padded prompt] embeddings and mask of 4 images."""
    image = torch.randn(len(PROMPTS), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embeds, atts = opt.visual_prompt(image, PROMPTS)
        return opt._llm_inputs(embeds, atts, PROMPTS, 12)


def _generate(opt, inputs, shared: bool, new_tokens: int = 12, **kw):
    copies = kw.get("num_return_sequences", 1) if kw.get("do_sample") else kw["num_beams"]
    embeds, mask = inputs
    torch.manual_seed(5)  # the same draws for sampling
    with torch.no_grad(), (shared_prefill(opt.llm, len(PROMPTS), copies, new_tokens) if shared
                           else contextlib.nullcontext()):
        return opt.llm.generate(inputs_embeds=embeds, attention_mask=mask, output_scores=True,
                                return_dict_in_generate=True, **opt._generation_kwargs(), **kw)


def _assert_same(plain, shared):
    assert torch.equal(plain.sequences, shared.sequences)
    assert len(plain.scores) == len(shared.scores)
    for step, (a, b) in enumerate(zip(plain.scores, shared.scores)):
        assert torch.equal(a, b), f"step {step}: scores differ"
    if hasattr(plain, "sequences_scores") and plain.sequences_scores is not None:
        assert torch.equal(plain.sequences_scores, shared.sequences_scores)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_sequences_and_scores_equal_plain_generate(opt, inputs, setting):
    kw = SETTINGS[setting]
    _assert_same(_generate(opt, inputs, False, **kw), _generate(opt, inputs, True, **kw))


def test_cache_buffers_grow_past_their_size(opt, inputs):
    """Sized for no new tokens, the buffers grow while generating; results are unchanged."""
    kw = SETTINGS["beam5_min_length"]
    _assert_same(_generate(opt, inputs, False, **kw),
                 _generate(opt, inputs, True, new_tokens=0, **kw))


def test_prefill_runs_once_per_image_and_no_cache_is_concatenated(opt, inputs, monkeypatch):
    rows, cats = [], []
    hook = opt.llm.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(kwargs["inputs_embeds"].shape[0])
        if kwargs.get("inputs_embeds") is not None else None, with_kwargs=True)
    real_cat = torch.cat

    def counting_cat(tensors, *a, **k):
        if len(tensors) == 2 and tensors[0].dim() == 4:  # a layer's (past, new) keys or values
            cats.append(tensors[0].shape)
        return real_cat(tensors, *a, **k)

    monkeypatch.setattr(torch, "cat", counting_cat)
    try:
        _generate(opt, inputs, True, **SETTINGS["beam5_vqa"])
        assert rows == [len(PROMPTS)] and not cats  # not 5 x 4 rows; cache written in place
        rows.clear()
        _generate(opt, inputs, False, **SETTINGS["beam5_vqa"])
        assert rows == [5 * len(PROMPTS)] and cats  # what the plain call does
    finally:
        hook.remove()


def test_model_is_restored_after_the_call_even_on_error(opt, inputs):
    llm = opt.llm
    with pytest.raises(RuntimeError, match="boom"):
        with shared_prefill(llm, 4, 5, 4):
            assert "forward" in vars(llm)
            raise RuntimeError("boom")
    attns = [layer.self_attn for layer in llm.get_decoder().layers]
    assert "forward" not in vars(llm) and "_reorder_cache" not in vars(llm)
    assert not any("forward" in vars(a) for a in attns)


def test_other_llms_run_as_they_are():
    from torch import nn

    other = nn.Linear(2, 2)
    with shared_prefill(other, 4, 5):
        assert "forward" not in vars(other)


def test_a_transformers_without_opt_sdpa_attention_runs_as_it_is(opt, monkeypatch):
    """transformers 5 drops ``OPTSdpaAttention`` (one attention class, cache objects): generation
    there must run transformers' own path, not fail on the import."""
    from transformers.models.opt import modeling_opt

    monkeypatch.delattr(modeling_opt, "OPTSdpaAttention")
    with shared_prefill(opt.llm, 4, 5):
        assert "forward" not in vars(opt.llm)


def test_public_generate_and_vqa_equal_without_sharing(opt, monkeypatch):
    """Through the model's own generate and predict_answers (beam 5, BLIP-2's VQA settings)."""
    image = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    questions = ["what is it?", "how many dogs are there on the left?", "why"]

    def run():
        captions = opt.generate({"image": image, "prompt": "a photo of"}, num_beams=5,
                                max_length=8, min_length=2, num_captions=2)
        answers = opt.predict_answers({"image": image, "text_input": questions}, num_beams=5,
                                      max_len=10, min_len=1, length_penalty=-1.0)
        return captions, answers

    shared = run()
    monkeypatch.setattr(type(opt), "_generation_context",
                        lambda self, rows, copies, new_tokens: contextlib.nullcontext())
    assert run() == shared


def test_a_batch_of_another_size_is_not_shared(opt, inputs):
    """Told 3 inputs x 5 beams, a generate call of 4 x 5 rows runs as it is (picking every 5th
    row of it would mix images)."""
    rows = []
    hook = opt.llm.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(kwargs["inputs_embeds"].shape[0])
        if kwargs.get("inputs_embeds") is not None else None, with_kwargs=True)
    embeds, mask = inputs
    kw = SETTINGS["beam5_vqa"]
    try:
        with torch.no_grad():
            plain = opt.llm.generate(inputs_embeds=embeds, attention_mask=mask,
                                     **opt._generation_kwargs(), **kw)
            with shared_prefill(opt.llm, len(PROMPTS) - 1, 5, 12):
                other = opt.llm.generate(inputs_embeds=embeds, attention_mask=mask,
                                         **opt._generation_kwargs(), **kw)
    finally:
        hook.remove()
    assert rows == [5 * len(PROMPTS)] * 2 and torch.equal(plain, other)
