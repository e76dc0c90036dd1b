"""Our beam search (lavis_plugins/models/_beam_search.py: transformers' beam bookkeeping as tensor
operations) equals transformers' ``generate`` bit for bit: sequences, sequence scores, every
step's scores and beam indices, on tiny OPT (decoder-only, from ids and from embeddings) and
FlanT5-style (encoder-decoder) models whose end token is made likely, so that hypotheses end at
different steps; options it does not implement run transformers' own code."""
from __future__ import annotations

import contextlib
import itertools
import random

import pytest
import torch

from lavis_plugins.models import _beam_search
from lavis_plugins.models._beam_search import _Finished, vectorised_beam_search

OPT_EOS, T5_EOS = 2, 1


def _boost_end_token(head: torch.nn.Linear, eos: int, factor: float) -> None:
    """Make the end token competitive: its output row a scaled mean of four others', so its
    logit follows the context (a random row almost never ends a caption)."""
    with torch.no_grad():
        head.weight[eos] = head.weight[5:9].mean(0) * factor


@pytest.fixture(scope="module")
def opt(device):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
        max_position_embeddings=128, pad_token_id=1, bos_token_id=OPT_EOS,
        eos_token_id=OPT_EOS)).eval()
    _boost_end_token(model.lm_head, OPT_EOS, 5.0)
    return model.to(device)


@pytest.fixture(scope="module")
def t5(device):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=T5_EOS)).eval()
    _boost_end_token(model.lm_head, T5_EOS, 5.0)
    return model.to(device)


def _inputs(kind: str, batch: int, seed: int = 3) -> dict:
    """OPT from embeddings (BLIP-2's way: left padding in row 0), OPT from ids, T5 from ids."""
    g = torch.Generator().manual_seed(seed)
    if kind == "opt_embeds":
        mask = torch.ones(batch, 7, dtype=torch.long)
        mask[0, :2] = 0
        return dict(inputs_embeds=torch.randn(batch, 7, 32, generator=g), attention_mask=mask)
    return dict(input_ids=torch.randint(3, 64, (batch, 6), generator=g))


def _generate(model, inputs: dict, ours: bool, **kw):
    """``generate`` with every output; ``--device cuda`` runs the tiny models on the GPU."""
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    with torch.no_grad(), (vectorised_beam_search(model) if ours
                           else contextlib.nullcontext()):
        return model.generate(**inputs, output_scores=True, output_logits=True,
                              return_dict_in_generate=True, **kw)


def assert_same(plain, ours) -> None:
    assert torch.equal(plain.sequences, ours.sequences)
    assert torch.equal(plain.sequences_scores, ours.sequences_scores)
    assert torch.equal(plain.beam_indices, ours.beam_indices)
    assert len(plain.scores) == len(ours.scores)
    for step, (a, b, la, lb) in enumerate(zip(plain.scores, ours.scores, plain.logits,
                                              ours.logits)):
        assert torch.equal(a, b) and torch.equal(la, lb), f"step {step} differs"


# (beams, length_penalty, min_new_tokens, num_return_sequences, early_stopping,
#  repetition_penalty): BLIP-2's settings (beam 5; VQA and InstructBLIP video: penalty -1),
# and around them
SETTINGS = [
    (5, 1.0, 1, 1, False, 1.0),
    (5, -1.0, 1, 1, False, 1.0),
    (5, -1.0, 4, 3, False, 1.0),
    (3, 1.0, 4, 2, False, 1.3),
    (3, 0.0, 1, 3, False, 1.0),
    (5, 2.0, 1, 1, False, 1.0),
    (5, 1.0, 1, 2, True, 1.0),
    (3, 1.0, 1, 1, "never", 1.0),
    (3, -1.0, 1, 1, "never", 1.3),
    (2, 1.0, 3, 1, False, 1.0),
]


@pytest.mark.parametrize("kind", ["opt_embeds", "opt_ids", "t5"])
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(map(str, s)))
def test_equals_transformers_beam_search(opt, t5, kind, setting):
    beams, penalty, min_new, returned, early, repetition = setting
    model = t5 if kind == "t5" else opt
    # batches of 4 and of 1 in turn (both for BLIP-2's VQA setting), to keep the suite short
    index = SETTINGS.index(setting)
    for batch in ((1, 4) if index == 1 else (4,) if index % 2 == 0 else (1,)):
        kw = dict(num_beams=beams, length_penalty=penalty, min_new_tokens=min_new,
                  max_new_tokens=9, num_return_sequences=returned, early_stopping=early,
                  repetition_penalty=repetition)
        inputs = _inputs(kind, batch)
        assert_same(_generate(model, inputs, False, **kw), _generate(model, inputs, True, **kw))


# (kind, length_penalty, early_stopping, beams): some images of a batch of 4 finish (all their
# hypotheses collected and none left that could beat them) while others go on
FINISH_EARLY = [("t5", 1.0, False, 3), ("t5", 1.0, True, 3), ("t5", -1.0, "never", 3),
                ("t5", 1.0, "never", 2), ("opt_ids", 0.0, False, 2), ("opt_embeds", 0.0, False, 2)]


@pytest.mark.parametrize("case", FINISH_EARLY, ids=lambda c: "-".join(map(str, c)))
def test_images_that_finish_early(opt, t5, case, monkeypatch):
    """A finished image's beams go on as padding taken from row 0, as transformers' do; a whole
    batch finished stops the loop before the maximum length."""
    from transformers.generation.beam_search import BeamSearchScorer

    kind, penalty, early, beams = case
    model = t5 if kind == "t5" else opt
    partly_done = []
    process = BeamSearchScorer.process

    def spy(self, *a, **k):  # records whether some, not all, images were done after a step
        out = process(self, *a, **k)
        partly_done.append(bool(self._done.any() and not self._done.all()))
        return out

    monkeypatch.setattr(BeamSearchScorer, "process", spy)
    kw = dict(num_beams=beams, length_penalty=penalty, early_stopping=early, max_new_tokens=20)
    inputs = _inputs(kind, 4)
    plain = _generate(model, inputs, False, **kw)
    assert any(partly_done)
    assert_same(plain, _generate(model, inputs, True, **kw))
    if kind == "opt_ids":  # one image, finished at step 5 of 30
        kw["max_new_tokens"] = 30
        plain = _generate(model, _inputs(kind, 1), False, **kw)
        assert len(plain.scores) < 30
        assert_same(plain, _generate(model, _inputs(kind, 1), True, **kw))


def test_equals_transformers_with_a_dynamic_cache(device):
    """A decoder whose cache is a ``DynamicCache`` object (LLaMA, as InstructBLIP-Vicuna and
    lp_blip2_causal use), reordered by transformers' own ``reorder_cache``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=OPT_EOS)).eval()
    _boost_end_token(model.lm_head, OPT_EOS, 5.0)
    model.to(device)
    for kw in (dict(num_beams=5, length_penalty=-1.0), dict(num_beams=3, min_new_tokens=3,
                                                          num_return_sequences=2)):
        inputs = _inputs("opt_ids", 4)
        assert_same(_generate(model, inputs, False, max_new_tokens=9, **kw),
                    _generate(model, inputs, True, max_new_tokens=9, **kw))


@pytest.mark.parametrize("kind", ["opt_embeds", "t5"])
def test_hypotheses_end_at_different_steps(opt, t5, kind):
    """The equality above covers end tokens at several steps, and beams that never end."""
    model, eos = (t5, T5_EOS) if kind == "t5" else (opt, OPT_EOS)
    inputs = _inputs(kind, 8, seed=4)
    plain = _generate(model, inputs, False, num_beams=5, length_penalty=-1.0, max_new_tokens=9,
                      num_return_sequences=5)
    assert_same(plain, _generate(model, inputs, True, num_beams=5, length_penalty=-1.0,
                                 max_new_tokens=9, num_return_sequences=5))
    generated = plain.sequences.cpu()[:, 1:] if kind == "t5" else plain.sequences.cpu()
    ends = {row.index(eos) if eos in row else None for row in generated.tolist()}
    assert None in ends and len(ends - {None}) >= 3, ends


def test_ours_runs_and_the_plain_method_does_not(opt, monkeypatch):
    calls = []
    real = _beam_search.beam_search
    monkeypatch.setattr(_beam_search, "beam_search",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(type(opt), "_beam_search", _fails_when_called(type(opt)._beam_search))
    _generate(opt, _inputs("opt_embeds", 2), True, num_beams=3, max_new_tokens=4)
    assert calls == [1]


def _fails_when_called(method):
    import functools

    @functools.wraps(method)  # keeps the signature the context manager reads
    def fail(*a, **k):
        raise AssertionError("transformers' _beam_search ran")
    return fail


@pytest.mark.parametrize("option", [
    dict(do_sample=True),  # beam sampling
    dict(low_memory=True),
    dict(output_attentions=True),
    dict(output_hidden_states=True),
])
def test_options_it_does_not_implement_run_transformers_own(opt, monkeypatch, option):
    monkeypatch.setattr(_beam_search, "beam_search", _fails_when_called(_beam_search.beam_search))
    inputs = _inputs("opt_ids", 2)
    kw = dict(num_beams=3, max_new_tokens=5, **option)
    torch.manual_seed(1)
    plain = _generate(opt, inputs, False, **kw)
    torch.manual_seed(1)
    assert torch.equal(plain.sequences, _generate(opt, inputs, True, **kw).sequences)


def test_greedy_and_beam_groups_do_not_reach_it(opt, monkeypatch):
    """num_beams 1 (greedy) and diverse beam search use other transformers methods."""
    monkeypatch.setattr(_beam_search, "beam_search", _fails_when_called(_beam_search.beam_search))
    inputs = _inputs("opt_ids", 2)
    for kw in (dict(num_beams=1), dict(num_beams=4, num_beam_groups=2, diversity_penalty=0.5)):
        assert torch.equal(_generate(opt, inputs, False, max_new_tokens=5, **kw).sequences,
                           _generate(opt, inputs, True, max_new_tokens=5, **kw).sequences)


def test_a_transformers_without_beam_scorer_runs_as_it_is(opt, monkeypatch):
    """transformers >= 4.50 (and 5.x on the GPU machine) has its own vectorised beam search, with
    no ``beam_scorer`` argument: the model must run it untouched."""
    def new_style(self, input_ids, logits_processor, stopping_criteria, generation_config,
                  synced_gpus, **model_kwargs):
        raise AssertionError("not called here")

    monkeypatch.setattr(type(opt), "_beam_search", new_style)
    with vectorised_beam_search(opt):
        assert "_beam_search" not in vars(opt)


def test_model_is_restored_after_the_call_even_on_error(opt):
    with pytest.raises(RuntimeError, match="boom"):
        with vectorised_beam_search(opt):
            assert "_beam_search" in vars(opt)
            raise RuntimeError("boom")
    assert "_beam_search" not in vars(opt)


def test_hypothesis_store_breaks_ties_as_transformers_does():
    """Scores with many ties: the kept hypotheses, and the order ``finalize`` returns them in,
    equal ``BeamHypotheses.add`` called one by one (candidates of a step arrive best first)."""
    from transformers.generation.beam_search import BeamHypotheses

    rng = random.Random(0)
    for trial in range(100):
        k, batch = rng.choice([2, 3, 5]), 3
        ref = [BeamHypotheses(k, 1.0, False) for _ in range(batch)]
        ours = _Finished(batch, k, width=1, steps=1, pad=0, device=torch.device("cpu"))
        ident = itertools.count()
        for _ in range(rng.randint(1, 6)):
            scores = torch.tensor([sorted((float(rng.randint(-4, 0)) for _ in range(k)),
                                          reverse=True) for _ in range(batch)],
                                  dtype=torch.float64)
            offered = torch.tensor([[rng.random() < 0.6 for _ in range(k)]
                                    for _ in range(batch)])
            ids = torch.tensor([[next(ident) for _ in range(k)] for _ in range(batch)])
            for b, j in itertools.product(range(batch), range(k)):
                if offered[b, j]:
                    ref[b].add(ids[b, j:j + 1], float(scores[b, j]), generated_len=1)
            ours.add(scores, offered, ids[:, :, None], torch.ones_like(ids),
                     torch.zeros(batch, k, 1, dtype=torch.long))
        for b in range(batch):
            expected = [int(h[1]) for h in sorted(ref[b].beams, key=lambda x: x[0])[::-1]]
            best = ours.best(k)[b]
            got = [int(ours.tokens[b, i, 0]) for i in best if ours.valid[b, i]]
            assert got == expected, (trial, b)
            if len(ref[b]) == k:
                assert float(ours.worst()[b]) == ref[b].worst_score


# ---------------------------------------------------------------- through the public API
@pytest.fixture(scope="module")
def blip2(lp, tiny_bert_dir, tmp_path_factory):
    """lp_blip2_opt and lp_blip2_t5, tiny, their end tokens made likely."""
    from lavis_plugins.api import load_model
    from lavis_plugins.common.tiny_llm import make_tiny_opt, make_tiny_t5

    root = tmp_path_factory.mktemp("llm")
    torch.manual_seed(0)
    models = {
        "opt": load_model("lp_blip2_opt", "tiny", bert_path=str(tiny_bert_dir),
                          opt_model=str(make_tiny_opt(root / "opt"))).eval(),
        "t5": load_model("lp_blip2_t5", "tiny", bert_path=str(tiny_bert_dir),
                         t5_model=str(make_tiny_t5(root / "t5"))).eval()}
    for m in models.values():
        _boost_end_token(m.llm.get_output_embeddings(), m._generation_kwargs().get(
            "eos_token_id", m.llm.config.eos_token_id), 3.0)
    return models


@pytest.mark.parametrize("arch", ["opt", "t5"])
def test_public_generate_and_vqa_equal_transformers(blip2, arch, monkeypatch):
    """``generate`` (beam 5, 2 captions, min length) and ``predict_answers`` (BLIP-2's VQA: beam
    5, length penalty -1) give what transformers' beam search gives, and ours ran."""
    from lavis_plugins.models import _blip2_llm_generate

    model = blip2[arch]
    image = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    questions = ["what is it?", "how many dogs are there on the left?", "why"]
    calls = []
    real = _beam_search.beam_search
    monkeypatch.setattr(_beam_search, "beam_search",
                        lambda *a, **k: calls.append(1) or real(*a, **k))

    def run():
        captions = model.generate({"image": image, "prompt": "a photo of"}, num_beams=5,
                                  max_length=8, min_length=2, num_captions=2)
        answers = model.predict_answers({"image": image, "text_input": questions},
                                        num_beams=5, max_len=10, min_len=1,
                                        length_penalty=-1.0)
        return captions, answers

    ours = run()
    assert len(calls) == 2
    monkeypatch.setattr(_blip2_llm_generate, "vectorised_beam_search",
                        lambda llm: contextlib.nullcontext())
    assert run() == ours
    assert len(calls) == 2
    lengths = {len(c) for c in ours[0] + ours[1]}
    assert len(lengths) >= 2, ours  # outputs ended at different steps
