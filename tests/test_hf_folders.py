"""transformers BLIP-2 folders are self-sufficient checkpoints.

Every size comes from the folder's config.json (the tiny folders of ``_hf_tiny`` differ from our
tiny YAMLs in every size), the vision tower is the folder's (pixels in, no patching of image
features), no bert_path / vit_path / LLM folder and no network are needed, and the results equal
transformers' own classes: logits within 1e-4, identical greedy tokens, equal ITC/ITM outputs.
"""
from __future__ import annotations

import socket

import pytest
import torch

import _hf_tiny as tiny
from lavis_plugins.common.errors import UserError

CAPTIONS = ["a photo of a cat on the tree", "two dogs"]
PROMPT = "Question: what is it? Answer:"


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test (the README example once retried the hub ~50 s)."""
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    from lavis_plugins.common.tiny_llm import make_tiny_opt, make_tiny_t5

    root = tmp_path_factory.mktemp("llm")
    return {"opt": make_tiny_opt(root / "opt"), "t5": make_tiny_t5(root / "t5")}


@pytest.fixture(scope="module")
def folders(lp, tiny_bert_dir, llm_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_folders")
    return {
        "opt": (tiny.make_llm_folder("opt", root / "blip2-opt", tiny_bert_dir, llm_dirs["opt"]),
                root / "blip2-opt"),
        "t5": (tiny.make_llm_folder("t5", root / "blip2-t5", tiny_bert_dir, llm_dirs["t5"]),
               root / "blip2-t5"),
        "itr": (tiny.make_retrieval_folder(root / "blip2-itm", tiny_bert_dir), root / "blip2-itm"),
    }


def _load(name, model_type, folder, **kw):
    from lavis_plugins import load_model_and_preprocess

    return load_model_and_preprocess(name, model_type, is_eval=True, checkpoint=str(folder), **kw)


def test_opt_folder_alone_equals_transformers(folders, no_network):
    hf, folder = folders["opt"]
    # the shipped YAML's defaults: bert_path "bert-base-uncased", vit_path null, opt_model
    # "facebook/opt-2.7b", EVA ViT-g at 224 px, 32 queries; none of it is read
    model, vis, _ = _load("lp_blip2_opt", "pretrain_opt2.7b", folder)
    assert model.cfg.image_size == tiny.IMAGE_SIZE and model.query_tokens.shape[1] == tiny.NUM_QUERY
    assert vis["eval"].transform.transforms[0].size == (tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    pixels = tiny.images()
    tok = model.opt_tokenizer
    enc = tok([c + "\n" for c in CAPTIONS], return_tensors="pt", padding="longest",
              padding_side="right")
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=enc.input_ids,
                 attention_mask=enc.attention_mask).logits
        out = model({"image": pixels, "text_input": CAPTIONS}, return_logits=True)
    nq = tiny.NUM_QUERY
    assert torch.allclose(out.logits, ref[:, nq - 1:-1], atol=1e-4, rtol=0)
    ids = tok([PROMPT] * 2, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = hf.generate(pixel_values=pixels, input_ids=ids, max_new_tokens=6, num_beams=1,
                          do_sample=False, eos_token_id=model.eos_token_id,
                          pad_token_id=tok.pad_token_id)
    assert_same_greedy(model, gen[:, 1:], pixels, PROMPT)  # OPT's output starts with BOS


def assert_same_greedy(model, hf_tokens, pixels, prompt):
    """Our greedy generation decodes to transformers' tokens ``hf_tokens``."""
    tok = model.llm_tokenizer
    theirs = [t.strip() for t in tok.batch_decode(hf_tokens, skip_special_tokens=True)]
    mine = model.generate({"image": pixels, "prompt": prompt}, num_beams=1, max_length=6,
                          min_length=0)
    assert mine == theirs and any(mine)


def test_t5_folder_alone_equals_transformers(folders, no_network):
    hf, folder = folders["t5"]
    model, _, _ = _load("lp_blip2_t5", "pretrain_flant5xl", folder)
    tok = model.t5_tokenizer
    pixels = tiny.images(seed=1)
    questions, answers = ["what is it?", "how many dogs"], ["a cat", "two"]
    enc = tok(questions, return_tensors="pt", padding="longest")
    dec = tok(answers, return_tensors="pt", padding="longest")
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                 labels=dec.input_ids.masked_fill(dec.attention_mask == 0, -100),
                 decoder_attention_mask=dec.attention_mask)
        out = model({"image": pixels, "text_input": questions, "text_output": answers},
                    return_logits=True)
        gen = hf.generate(pixel_values=pixels, input_ids=enc.input_ids,
                          attention_mask=enc.attention_mask, max_new_tokens=6, num_beams=1)
    assert torch.allclose(out.logits, ref.logits, atol=1e-4, rtol=0)
    assert_same_greedy(model, gen, pixels, questions)


def test_retrieval_folder_into_stage1_equals_transformers(folders, no_network):
    hf, folder = folders["itr"]
    model, _, _ = _load("lp_blip2_qformer", "pretrain", folder)
    assert model.cfg.embed_dim == 16 and model.cfg.cross_attention_freq == 1
    pixels = tiny.images(seed=2)
    enc = model.tokenizer(CAPTIONS, return_tensors="pt", padding="longest")
    with torch.no_grad():
        itm = hf(pixel_values=pixels, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                 use_image_text_matching_head=True).logits_per_image
        itc = hf(pixel_values=pixels, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                 use_image_text_matching_head=False)
        image_embeds = model.encode_image(pixels)
        mine_itm = model.itm_logits(image_embeds, enc.input_ids, enc.attention_mask)
        samples = {"image": pixels, "text_input": CAPTIONS}
        img = model.extract_features(samples, "image").image_embeds_proj
        txt = model.extract_features(samples, "text").text_embeds_proj[:, 0]
    assert torch.allclose(mine_itm, itm, atol=1e-4, rtol=0)
    assert torch.allclose(img, itc.image_embeds, atol=1e-4, rtol=0)
    assert torch.allclose(txt, itc.text_embeds, atol=1e-4, rtol=0)
    sim = (img @ txt.t()).max(dim=1).values  # (B, B): max over the queries, as transformers
    assert torch.allclose(sim, itc.logits_per_image, atol=1e-4, rtol=0)


def test_blip2_model_folder_into_stage1_reports_missing_heads(lp, tiny_bert_dir, tmp_path,
                                                              caplog):
    """A Blip2Model folder has no ITC/ITM heads nor text branch: loaded, and said so."""
    from transformers import Blip2Model

    hf = tiny.randomise(Blip2Model(tiny.blip2_config(tiny_bert_dir, None)), 7)
    hf.save_pretrained(tmp_path)
    tiny.bert_tokenizer_with_dec(tiny_bert_dir).save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        model, _, _ = _load("lp_blip2_qformer", "pretrain", tmp_path)
    assert "ITC/ITM heads" in caplog.text and "text branch" in caplog.text
    pixels = tiny.images(seed=3)
    with torch.no_grad():
        ref = hf.get_qformer_features(pixel_values=pixels).last_hidden_state
        mine = model.forward_image(pixels)[0]
    assert torch.allclose(mine, ref, atol=1e-4, rtol=0)


# ------------------------------------------------------------------ what a folder lacks
def test_folder_without_tokenizer_names_the_file_and_the_setting(lp, tiny_bert_dir, tmp_path):
    tiny.make_retrieval_folder(tmp_path, tiny_bert_dir, tokenizer=False)
    with pytest.raises(UserError, match=r"holds no BERT tokenizer.*\(vocab.txt\).*model.bert_path"):
        _load("lp_blip2_qformer", "pretrain", tmp_path)
    # a local bert_path supplies it
    _load("lp_blip2_qformer", "pretrain", tmp_path, bert_path=str(tiny_bert_dir))


def test_llm_folder_without_tokenizer_names_opt_model(lp, folders, tmp_path):
    import shutil

    src = folders["opt"][1]
    for f in ("config.json", "model.safetensors"):
        shutil.copy(src / f, tmp_path / f)
    with pytest.raises(UserError, match=r"holds no OPT tokenizer.*model\.opt_model"):
        _load("lp_blip2_opt", "pretrain_opt2.7b", tmp_path)


def test_folder_missing_vision_weights_is_refused(lp, folders, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = folders["opt"][1]
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, tmp_path / f.name)
    state = load_file(str(src / "model.safetensors"))
    save_file({k: v for k, v in state.items() if ".layers.1." not in k or "vision" not in k},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"lacks .*visual_encoder\.blocks\.1\."):
        _load("lp_blip2_opt", "pretrain_opt2.7b", tmp_path)


def test_folder_without_weights_is_refused(lp, folders, tmp_path):
    import shutil

    shutil.copy(folders["opt"][1] / "config.json", tmp_path / "config.json")
    with pytest.raises(UserError, match="no weights"):
        _load("lp_blip2_opt", "pretrain_opt2.7b", tmp_path)


# ------------------------------------------------------------------ the README, as written
def _readme_section(title: str) -> str:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index(f"## {title}\n")
    return text[start:text.index("\n## ", start + 1)]


def _blocks(section: str, lang: str):
    import re

    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def test_readme_checkpoint_examples_run(folders, tmp_path, llm_dirs, tiny_bert_dir, lp,
                                        no_network):
    """Every example of the README's Checkpoints section, on the tiny folders: the Python block
    runs as written (the /weights paths point at tiny folders, "cuda" becomes "cpu"); the first
    shell line runs as written, the second (a LAVIS .pth of the real-size model type, which
    needs EVA ViT-g weights) with the tiny model type and folders."""
    import shlex

    from PIL import Image

    from lavis_plugins.cli import main

    section = _readme_section("Checkpoints")
    paths = {"/weights/blip2-opt-2.7b": folders["opt"][1], "/weights/blip2-flan-t5-xl":
             folders["t5"][1], "/weights/blip2-itm-vit-g": folders["itr"][1],
             "/weights/exported": tmp_path / "exported", "/weights/opt-2.7b": llm_dirs["opt"]}

    def local(code: str) -> str:
        for k, v in paths.items():
            code = code.replace(k, str(v))
        return code.replace('"cuda"', '"cpu"')

    (python,) = _blocks(section, "python")
    namespace = {"raw_image": Image.new("RGB", (64, 48), (10, 200, 30))}
    exec(compile(local(python), "README.md", "exec"), namespace)
    assert namespace["features"].multimodal_embeds.shape[1] == tiny.NUM_QUERY
    assert (tmp_path / "exported" / "model.safetensors").is_file()
    assert (tmp_path / "exported" / "lavis_checkpoint.pth").is_file()

    (shell,) = _blocks(section, "bash")
    first, second = [line for line in shell.splitlines() if line.startswith("lavis-plugins")]
    paths["/weights/exported"] = tmp_path / "cli"
    assert main(shlex.split(local(first))[1:]) == 0
    assert (tmp_path / "cli" / "config.json").is_file()

    pth = tmp_path / "checkpoint_best.pth"
    lp.load_model("lp_blip2_opt", "tiny", bert_path=str(tiny_bert_dir),
                  opt_model=str(llm_dirs["opt"])).save_lavis(pth)
    paths.update({"output/run/checkpoint_best.pth": pth, "/weights/exported": tmp_path / "cli2",
                  "pretrain_opt2.7b": "tiny", "vit_path=/weights/eva_vit_g.pth":
                  f"bert_path={tiny_bert_dir}"})
    assert main(shlex.split(local(second))[1:]) == 0
    assert (tmp_path / "cli2" / "lavis_checkpoint.pth").is_file()
