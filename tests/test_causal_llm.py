"""lp_blip2_causal: BLIP-2 with any decoder-only LLM (AutoModelForCausalLM).

For a tiny LLaMA (no pad token, BOS <s>, EOS </s>, positions from position_ids) and a tiny OPT,
the training loss and logits equal a reference computed with transformers' own class on the
same visual prompt and tokens, and greedy generation of left-padded prompt batches equals
transformers' generation of each prompt alone."""
from __future__ import annotations

import pytest
import torch

from lavis_plugins.common.errors import UserError

CAPTIONS = ["a photo of a cat on the tree", "two dogs", "a red car near a man"]
PROMPTS = ["a", "Question: what is it? Answer:", "a photo of two"]


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    from lavis_plugins.common.tiny_llm import make_tiny_llama, make_tiny_opt, make_tiny_t5

    root = tmp_path_factory.mktemp("llm")
    return {"llama": make_tiny_llama(root / "llama"), "opt": make_tiny_opt(root / "opt"),
            "t5": make_tiny_t5(root / "t5")}


@pytest.fixture(scope="module", params=["llama", "opt"])
def pair(request, lp, tiny_bert_dir, llm_dirs):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ours = lp.load_model("lp_blip2_causal", "tiny", is_eval=True, bert_path=str(tiny_bert_dir),
                         llm_model=str(llm_dirs[request.param]), prompt="a photo of")
    with torch.no_grad():
        ours.llm_proj.weight.normal_(0, 0.3)
    ref = AutoModelForCausalLM.from_pretrained(llm_dirs[request.param]).eval()
    return request.param, ours, ref


def _images(seed=1):
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_loss_and_logits_equal_transformers(pair):
    family, ours, ref = pair
    samples = {"image": _images(), "text_input": CAPTIONS}
    with torch.no_grad():
        out = ours(dict(samples), return_logits=True)
        vp, vp_mask = ours.visual_prompt(samples["image"])
        ids, mask, targets = ours._training_tokens(samples, vp.device)
        nq = vp.shape[1]
        labels = torch.cat([torch.full((3, nq), -100), targets], dim=1)
        res = ref(inputs_embeds=torch.cat([vp, ref.get_input_embeddings()(ids)], dim=1),
                  attention_mask=torch.cat([vp_mask, mask], dim=1), labels=labels)
    assert torch.allclose(out.loss, res.loss, atol=1e-5, rtol=0)
    keep = targets != -100
    assert torch.allclose(out.logits[keep], res.logits[:, nq - 1:-1][keep], atol=1e-5, rtol=0)
    tok = ours.llm_tokenizer
    # each target ends with the family's EOS token; the prompt (and BOS) carry no loss
    assert tok.eos_token_id in ids[0].tolist() and (targets[:, :ours.prompt_length] == -100).all()
    if family == "llama":
        assert ids[0, 0].item() == tok.bos_token_id == 1 and tok.pad_token == "<unk>"


def test_left_padded_greedy_generation_equals_transformers_alone(pair):
    family, ours, ref = pair
    image = _images(2)
    mine = ours.generate({"image": image, "prompt": PROMPTS}, num_beams=1, max_length=6,
                         min_length=0)
    tok = ours.llm_tokenizer
    theirs = []
    with torch.no_grad():
        vp, vp_mask = ours.visual_prompt(image)
        for i, p in enumerate(PROMPTS):  # one at a time: no padding
            ids = tok(p, return_tensors="pt").input_ids
            embeds = torch.cat([vp[i:i + 1], ref.get_input_embeddings()(ids)], dim=1)
            gen = ref.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2],
                               dtype=torch.long), max_new_tokens=6, do_sample=False,
                               num_beams=1, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
            theirs.append(tok.decode(gen[0], skip_special_tokens=True).strip())
    assert mine == theirs and any(mine)


def test_batched_answer_scores_equal_one_by_one(pair):
    """Left padding and positions also hold for ranking (prefix cache + continuations)."""
    _, ours, _ = pair
    image, cands = _images(3), ["cat", "two dogs", "red"]
    batched = ours.score_candidates({"image": image, "prompt": PROMPTS}, cands)
    single = torch.cat([ours.score_candidates({"image": image[i:i + 1], "prompt": PROMPTS[i]},
                                              cands) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-4, rtol=0)


def test_encoder_decoder_llm_is_refused(lp, tiny_bert_dir, llm_dirs):
    with pytest.raises(UserError, match="encoder-decoder.*lp_blip2_t5"):
        lp.load_model("lp_blip2_causal", "tiny", bert_path=str(tiny_bert_dir),
                      llm_model=str(llm_dirs["t5"]))


def test_answer_follows_the_question_as_each_family_tokenises_it(pair):
    """SentencePiece (LLaMA) marks the word start itself: the answer is tokenised on its own, as
    LAVIS's blip2_vicuna_instruct does; byte-level BPE (OPT) needs the space before it."""
    family, ours, _ = pair
    tok = ours.llm_tokenizer
    ids, mask, targets = ours._training_tokens(
        {"text_input": ["what is it?"], "text_output": ["two dogs"]}, torch.device("cpu"))
    answer = ("two dogs" if family == "llama" else " two dogs") + tok.eos_token
    expected = tok(answer, add_special_tokens=False).input_ids
    assert targets[0][targets[0] != -100].tolist() == expected
