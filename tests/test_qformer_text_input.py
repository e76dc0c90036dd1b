"""The question-aware Q-Former of stage 2 (``qformer_text_input``): BLIP-2's VQA fine-tuning
conditions the Q-Former on the question, InstructBLIP on the instruction.

Its query outputs equal LAVIS's Q-Former (``BertLMHeadModel.bert``) run over [queries; text] as
InstructBLIP calls it; the prompt text reaches the queries in training, generation and ranking
(never a caption that is the target); checkpoints without the text branch (LAVIS's stage-2 files)
load, stage-1 files supply it; a 1-frame video still equals the image model.
"""
from __future__ import annotations

import torch
import pytest

from lavis_plugins.common.errors import UserError

B = 3
QUESTIONS = ["what color is the car?", "how many dogs", "is the sky blue?"]
ANSWERS = ["red", "two", "yes"]
WORDS = "bert.embeddings.word_embeddings.weight"



def _model(lp, arch="lp_blip2_opt", **over):
    torch.manual_seed(0)
    return lp.load_model(arch, "tiny", qformer_text_input=True, **over)


def _record_qformer_texts(model, monkeypatch):
    """The list to which each batch's Q-Former texts are appended as the model tokenizes them."""
    seen = []
    real = model.qformer_tokens
    monkeypatch.setattr(model, "qformer_tokens",
                        lambda texts, *a: seen.append(list(texts)) or real(texts, *a))
    return seen


def _images(seed=1, b=B):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_query_outputs_equal_lavis_qformer_over_queries_and_text(lp, tiny_bert_dir,
                                                                  in_bert_parent):
    from lavis.models.blip2_models.blip2 import Blip2Base

    ours = _model(lp, bert_path=str(tiny_bert_dir)).eval()
    nq, width = ours.query_tokens.shape[1], ours.visual_encoder.num_features
    freq = ours.Qformer.config.cross_attention_freq
    ref, ref_queries = Blip2Base.init_Qformer(nq, width, freq)  # LAVIS's BertLMHeadModel
    ref.resize_token_embeddings(len(ours.tokenizer))  # [DEC], as LAVIS's models do
    state = {k[len("Qformer."):]: v for k, v in ours.state_dict().items()
             if k.startswith("Qformer.")}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("cls.") for k in missing), missing
    ref.eval()

    embeds = torch.randn(B, 17, width)
    ids, atts = ours.qformer_tokens(QUESTIONS, B, embeds.device)
    assert (atts == 0).any()  # the questions differ in length: padding is exercised
    with torch.no_grad():
        got = ours.query_text_output(embeds, ids, atts)
        want = ref.bert(  # InstructBLIP's call
            ids, attention_mask=torch.cat([torch.ones(B, nq, dtype=atts.dtype), atts], 1),
            query_embeds=ours.query_tokens.expand(B, -1, -1), encoder_hidden_states=embeds,
            encoder_attention_mask=torch.ones(B, 17, dtype=torch.long),
            return_dict=True).last_hidden_state[:, :nq]
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_the_text_conditions_the_visual_prompt_only_when_enabled(lp):
    aware = _model(lp).eval()
    plain = lp.load_model("lp_blip2_opt", "tiny").eval()
    assert aware.Qformer.bert.embeddings.word_embeddings is not None
    assert plain.Qformer.bert.embeddings.word_embeddings is None  # LAVIS's stage-2 layout
    img = _images()
    with torch.no_grad():
        a = aware.visual_prompt(img, QUESTIONS)[0]
        b = aware.visual_prompt(img, list(reversed(QUESTIONS)))[0]
        c = plain.visual_prompt(img, QUESTIONS)[0]
        d = plain.visual_prompt(img, list(reversed(QUESTIONS)))[0]
    assert not torch.allclose(a, b, atol=1e-4)
    assert torch.equal(c, d)
    with pytest.raises(UserError, match="qformer_text_input"):
        aware.visual_prompt(img)


@pytest.mark.parametrize("arch", ["lp_blip2_opt", "lp_blip2_t5"])
def test_training_reads_the_question_and_trains_the_text_branch(lp, arch, monkeypatch):
    model = _model(lp, arch).train()
    seen = _record_qformer_texts(model, monkeypatch)
    prompts = [f"Question: {q} Answer:" for q in QUESTIONS]
    model({"image": _images(), "text_input": prompts, "text_output": ANSWERS})["loss"].backward()
    assert seen[-1] == prompts
    grad = model.Qformer.bert.embeddings.word_embeddings.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    if arch == "lp_blip2_opt":  # a caption is the target: the Q-Former reads the prompt only
        captions = ["a red car", "two dogs", "blue sky"]
        model({"image": _images(), "text_input": captions})
        assert seen[-1] == [model.prompt] * B


@pytest.mark.parametrize("arch", ["lp_blip2_opt", "lp_blip2_t5"])
def test_generation_and_ranking_read_the_prompt(lp, arch, monkeypatch):
    model = _model(lp, arch).eval()
    seen = _record_qformer_texts(model, monkeypatch)
    samples = {"image": _images(), "text_input": QUESTIONS}
    answers = model.predict_answers(samples, num_beams=1, max_len=3, prompt="Q: {} A:")
    assert len(answers) == B and seen[-1] == [f"Q: {q} A:" for q in QUESTIONS]
    ranked = model.predict_answers(samples, inference_method="rank", answer_list=ANSWERS,
                                   prompt="Q: {} A:")
    assert set(ranked) <= set(ANSWERS) and seen[-1] == [f"Q: {q} A:" for q in QUESTIONS]
    model.generate({"image": _images(), "prompt": "a photo of"}, num_beams=1, max_length=3)
    assert seen[-1] == ["a photo of"] * B


def test_stage2_files_without_the_text_branch_load_and_stage1_files_supply_it(lp, tmp_path):
    plain = lp.load_model("lp_blip2_opt", "tiny")
    path = tmp_path / "stage2.pth"
    torch.save({"model": plain.state_dict()}, path)  # LAVIS's blip2_opt layout
    aware = _model(lp)
    words = aware.Qformer.bert.embeddings.word_embeddings.weight.detach().clone()
    aware.load_lavis(str(path))
    assert torch.equal(aware.query_tokens, plain.query_tokens)
    assert torch.equal(aware.Qformer.bert.embeddings.word_embeddings.weight, words)  # kept

    stage1 = lp.load_model("lp_blip2_qformer", "tiny")
    with torch.no_grad():
        stage1.Qformer.bert.embeddings.word_embeddings.weight.normal_()
    path1 = tmp_path / "stage1.pth"
    torch.save({"model": stage1.state_dict()}, path1)
    aware.load_stage1(str(path1))
    assert torch.equal(aware.Qformer.bert.embeddings.word_embeddings.weight,
                       stage1.Qformer.bert.embeddings.word_embeddings.weight)

    # its own checkpoints round-trip with the text branch
    path2 = tmp_path / "aware.pth"
    torch.save({"model": aware.state_dict()}, path2)
    again = _model(lp)
    again.load_lavis(str(path2))
    assert torch.equal(again.Qformer.bert.embeddings.word_embeddings.weight,
                       stage1.Qformer.bert.embeddings.word_embeddings.weight)


def test_one_frame_video_equals_the_image_model_with_the_question(lp):
    image = _model(lp).eval()
    video = _model(lp, "lp_blip2_video_opt").eval()
    video.load_state_dict(image.state_dict())
    clip = _images().unsqueeze(2)  # (B, C, 1, H, W)
    kw = dict(num_beams=1, max_len=3)
    with torch.no_grad():
        assert torch.equal(video.visual_prompt(clip, QUESTIONS)[0],
                           image.visual_prompt(clip[:, :, 0], QUESTIONS)[0])
    assert (video.predict_answers({"video": clip, "text_input": QUESTIONS}, **kw)
            == image.predict_answers({"image": clip[:, :, 0], "text_input": QUESTIONS}, **kw))
    # two frames: each frame reads its own video's question
    two = torch.cat([clip, clip.flip(0)], dim=2)
    with torch.no_grad():
        tokens = video.visual_prompt(two, QUESTIONS)[0]
        nq = image.query_tokens.shape[1]
        swapped = image.visual_prompt(clip.flip(0)[:, :, 0], QUESTIONS)[0]
    assert torch.allclose(tokens[:, nq:2 * nq], swapped, atol=1e-6)
