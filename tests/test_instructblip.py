"""InstructBLIP: lp_instructblip_t5 / lp_instructblip_causal load transformers
InstructBlip(Video)ForConditionalGeneration folders on their own (sizes from config.json, the
Q-Former's tokenizer from qformer_tokenizer/) and equal transformers' classes from pixels:
logits within 1e-4, identical greedy tokens; the Q-Former reads the instruction."""
from __future__ import annotations

import pytest
import torch

import _hf_tiny as tiny
from lavis_plugins.common.errors import UserError

QUESTIONS = ["what is it?", "how many dogs are there"]
ANSWERS = ["a cat", "two"]


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    from lavis_plugins.common.tiny_llm import make_tiny_llama, make_tiny_t5

    root = tmp_path_factory.mktemp("llm")
    return {"t5": make_tiny_t5(root / "t5"), "llama": make_tiny_llama(root / "llama")}


@pytest.fixture(scope="module", params=["t5", "llama"])
def pair(request, lp, tiny_bert_dir, llm_dirs, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"instructblip_{request.param}")
    hf = tiny.make_instructblip_folder(folder, tiny_bert_dir, llm_dirs[request.param])
    arch = "lp_instructblip_t5" if request.param == "t5" else "lp_instructblip_causal"
    # the tiny YAML's sizes and "tiny" paths differ from the folder's: nothing of them is used
    ours = lp.load_model(arch, "tiny", is_eval=True, checkpoint=str(folder))
    return request.param, hf, ours, folder


def _qformer_inputs(ours, texts):
    enc = ours.tokenizer(texts, padding="longest", truncation=True, max_length=ours.max_txt_len,
                         return_tensors="pt")
    return {"qformer_input_ids": enc.input_ids, "qformer_attention_mask": enc.attention_mask}


def test_logits_equal_transformers(pair):
    family, hf, ours, _ = pair
    pixels = tiny.images(seed=3)
    samples = {"image": pixels, "text_input": QUESTIONS, "text_output": ANSWERS}
    q = _qformer_inputs(ours, QUESTIONS)
    with torch.no_grad():
        out = ours(dict(samples), return_logits=True)
        if family == "t5":
            tok = ours.llm_tokenizer
            enc = tok(QUESTIONS, return_tensors="pt", padding="longest")
            dec = tok(ANSWERS, return_tensors="pt", padding="longest")
            ref = hf(pixel_values=pixels, input_ids=enc.input_ids,
                     attention_mask=enc.attention_mask, decoder_attention_mask=dec.attention_mask,
                     labels=dec.input_ids.masked_fill(dec.attention_mask == 0, -100), **q).logits
            assert torch.allclose(out.logits, ref, atol=1e-4, rtol=0)
        else:
            ids, mask, targets = ours._training_tokens(samples, pixels.device)
            ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, **q).logits
            keep = targets != -100
            nq = tiny.NUM_QUERY
            assert torch.allclose(out.logits[keep], ref[:, nq - 1:-1][keep], atol=1e-4, rtol=0)
    # the instruction matters: the Q-Former reads it
    other = {"image": pixels, "text_input": ["is it red?"] * 2, "text_output": ANSWERS}
    with torch.no_grad():
        assert not torch.allclose(ours.visual_prompt(pixels, QUESTIONS)[0],
                                  ours.visual_prompt(pixels, other["text_input"])[0])


def test_greedy_generation_equals_transformers(pair):
    family, hf, ours, _ = pair
    pixels = tiny.images(seed=4)
    tok = ours.llm_tokenizer
    prompt = "what is in the photo?"
    enc = tok([prompt] * 2, return_tensors="pt")
    with torch.no_grad():
        gen = hf.generate(pixel_values=pixels, input_ids=enc.input_ids,
                          attention_mask=enc.attention_mask, max_new_tokens=6, num_beams=1,
                          do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **_qformer_inputs(ours, [prompt] * 2))
    theirs = [t.strip() for t in tok.batch_decode(gen, skip_special_tokens=True)]
    mine = ours.generate({"image": pixels, "prompt": prompt}, num_beams=1, max_length=6,
                         min_length=0)
    assert mine == theirs and any(mine)


def test_video_folder_loads_and_one_frame_equals_the_image_model(lp, tiny_bert_dir, llm_dirs,
                                                                 tmp_path):
    hf = tiny.make_instructblip_folder(tmp_path, tiny_bert_dir, llm_dirs["t5"], video=True)
    ours = lp.load_model("lp_instructblip_t5", "tiny", is_eval=True, checkpoint=str(tmp_path))
    pixels = tiny.images(seed=5)
    tok = ours.llm_tokenizer
    enc, dec = tok(QUESTIONS, return_tensors="pt", padding="longest"), tok(
        ANSWERS, return_tensors="pt", padding="longest")
    with torch.no_grad():
        ref = hf(pixel_values=pixels[:, None], input_ids=enc.input_ids,  # (B, T=1, C, H, W)
                 attention_mask=enc.attention_mask, decoder_attention_mask=dec.attention_mask,
                 labels=dec.input_ids.masked_fill(dec.attention_mask == 0, -100),
                 **_qformer_inputs(ours, QUESTIONS)).logits
        out = ours({"image": pixels, "text_input": QUESTIONS, "text_output": ANSWERS},
                   return_logits=True)
    assert torch.allclose(out.logits, ref, atol=1e-4, rtol=0)


def test_bad_input(lp, pair, tmp_path):
    import shutil

    family, _, _, folder = pair
    arch = "lp_instructblip_t5" if family == "t5" else "lp_instructblip_causal"
    with pytest.raises(UserError, match="qformer_text_input of lp_instructblip"):
        lp.load_model(arch, "tiny", qformer_text_input=False)
    # a folder without its Q-Former tokenizer names the sub-folder and the setting
    shutil.copytree(folder, tmp_path / "f", ignore=shutil.ignore_patterns("qformer_tokenizer"))
    with pytest.raises(UserError, match=r"qformer_tokenizer holds no Q-Former tokenizer.*"
                                        r"model\.bert_path"):
        lp.load_model(arch, "tiny", checkpoint=str(tmp_path / "f"), bert_path="/nowhere")


def test_export_round_trips(lp, pair, tmp_path, tiny_bert_dir, llm_dirs):
    """folder -> ours -> save_pretrained: transformers' class reads the same weights (and the
    Q-Former tokenizer); ours -> save_lavis -> ours (LAVIS's instruct names) is exact."""
    import dataclasses

    from transformers import AutoTokenizer, InstructBlipForConditionalGeneration

    from lavis_plugins.cli import main

    family, hf, ours, folder = pair
    ours.save_pretrained(tmp_path / "hf")
    back = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "hf")
    a, b = hf.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    # the CLI names the model of an InstructBLIP folder itself
    assert main(["export", "--checkpoint", str(folder), "--out", str(tmp_path / "cli"),
                 "--format", "transformers"]) == 0
    c = InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "cli").state_dict()
    assert [k for k in a if not torch.equal(a[k], c[k])] == []
    assert len(AutoTokenizer.from_pretrained(tmp_path / "hf" / "qformer_tokenizer")) == len(
        ours.tokenizer)

    # the .pth names sizes nothing: the model is built from the settings it was trained with
    pth = ours.save_lavis(tmp_path / "lavis.pth")
    arch = "lp_instructblip_t5" if family == "t5" else "lp_instructblip_causal"
    settings = {k: v for k, v in dataclasses.asdict(ours.cfg).items()
                if k in ("vit_model", "tiny_vit", "image_size", "num_query_token",
                         "cross_attention_freq")}
    llm_key = "t5_model" if family == "t5" else "llm_model"
    again = lp.load_model(arch, "tiny", is_eval=True, checkpoint=str(pth),
                          bert_path=str(tiny_bert_dir), **{llm_key: str(llm_dirs[family])},
                          **settings)
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_tiny_instruction_tuning_recipe_trains(lp, shapes_home, tmp_path):
    """projects/instructblip/shapes_vqa_ft_tiny.yaml runs through `lavis-plugins train`: the
    loss is finite and the Q-Former's text branch (which reads the instruction) is trained."""
    import json

    from conftest import REPO
    from lavis_plugins.cli import main

    rc = main(["train", "--cfg-path", str(REPO / "projects/instructblip/shapes_vqa_ft_tiny.yaml"),
               "--options", f"run.output_dir={tmp_path}", "run.iters_per_epoch=3",
               "run.test_splits=[]"])
    assert rc == 0
    (job,) = list(tmp_path.iterdir())
    log = [json.loads(line) for line in (job / "train_log.jsonl").read_text().splitlines()]
    assert log and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    state = torch.load(job / "checkpoint_0.pth", weights_only=False)["model"]
    assert "Qformer.bert.embeddings.word_embeddings.weight" in state


def test_video_model_equals_transformers_video_class(lp, tiny_bert_dir, llm_dirs, tmp_path):
    """lp_instructblip_video_t5 (fusion concat) from an InstructBlipVideo folder: 2-frame
    logits and greedy answers equal transformers' InstructBlipVideoForConditionalGeneration;
    the other fusions run on the same video."""
    hf = tiny.make_instructblip_folder(tmp_path, tiny_bert_dir, llm_dirs["t5"], video=True)
    ours = lp.load_model("lp_instructblip_video_t5", "tiny", is_eval=True,
                         checkpoint=str(tmp_path))
    frames = torch.stack([tiny.images(seed=6), tiny.images(seed=7)], dim=1)  # (B, T, C, H, W)
    video = frames.permute(0, 2, 1, 3, 4)  # ours: (B, C, T, H, W), as lp_video_eval gives
    tok = ours.llm_tokenizer
    enc, dec = tok(QUESTIONS, return_tensors="pt", padding="longest"), tok(
        ANSWERS, return_tensors="pt", padding="longest")
    q = _qformer_inputs(ours, QUESTIONS)
    with torch.no_grad():
        ref = hf(pixel_values=frames, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                 decoder_attention_mask=dec.attention_mask,
                 labels=dec.input_ids.masked_fill(dec.attention_mask == 0, -100), **q).logits
        out = ours({"video": video, "text_input": QUESTIONS, "text_output": ANSWERS},
                   return_logits=True)
        gen = hf.generate(pixel_values=frames, input_ids=enc.input_ids,
                          attention_mask=enc.attention_mask, max_new_tokens=6, **q)
    assert torch.allclose(out.logits, ref, atol=1e-4, rtol=0)
    theirs = [t.strip() for t in tok.batch_decode(gen, skip_special_tokens=True)]
    mine = ours.generate({"video": video, "prompt": QUESTIONS}, num_beams=1, max_length=6,
                         min_length=0)
    assert mine == theirs and any(mine)
    for fusion in ("mean", "vote"):
        ours.cfg.fusion = fusion
        answers = ours.predict_answers({"video": video, "text_input": QUESTIONS}, prompt="{}",
                                       num_beams=1, max_len=4)
        assert len(answers) == 2


def test_vqa_task_draws_one_instruction_template_per_question():
    from omegaconf import OmegaConf

    from lavis_plugins.tasks.vqa import LPVQATask, VQATaskConfig

    templates = ["Question: {} Short answer:", "Q: {} A:"]
    cfg = VQATaskConfig.from_run_cfg(OmegaConf.create({"prompt": "{}", "train_prompts": templates}))
    seen = {}

    class Capture(torch.nn.Module):
        def forward(self, samples):
            seen.update(samples)
            return {"loss": torch.zeros(())}

    questions = [f"what is {i}?" for i in range(40)]
    torch.manual_seed(0)
    LPVQATask(cfg).train_step(Capture(), {"text_input": questions, "text_output": ["x"] * 40})
    used = {t for t in templates for text, q in zip(seen["text_input"], questions)
            if text == t.format(q)}
    assert used == set(templates) and len(seen["text_input"]) == 40
    with pytest.raises(UserError, match="train_prompts"):
        VQATaskConfig.from_run_cfg(OmegaConf.create({"train_prompts": ["no slot"]}))
