"""Export: ``save_pretrained`` / ``lavis-plugins export`` write a transformers folder that
transformers' own classes load (logits within 1e-4, identical greedy tokens) and a LAVIS ``.pth``
that LAVIS's classes load strictly (outputs within 1e-5); round trips both ways for stage 1
(Blip2ForImageTextRetrieval), OPT and T5 (Blip2ForConditionalGeneration)."""
from __future__ import annotations

import pytest
import torch

import _hf_tiny as tiny
from lavis_plugins.common.errors import UserError

CAPTIONS = ["a photo of a cat on the tree", "two dogs"]
PROMPT = "Question: what is it? Answer:"


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    from lavis_plugins.common.tiny_llm import make_tiny_opt, make_tiny_t5

    root = tmp_path_factory.mktemp("llm")
    return {"opt": make_tiny_opt(root / "opt"), "t5": make_tiny_t5(root / "t5")}


def _randomised_tiny(lp, arch, bert_dir, llm_dir):
    """Our tiny model (LAVIS names, sizes of the tiny YAML) with non-trivial trained parts."""
    key = {"lp_blip2_opt": "opt_model", "lp_blip2_t5": "t5_model"}[arch]
    # transformers' vision config has one LayerNorm epsilon for the blocks and the last norm
    model = lp.load_model(arch, "tiny", is_eval=True, bert_path=str(bert_dir),
                          tiny_vit={"ln_vision_eps": 1e-6}, **{key: str(llm_dir)})
    torch.manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("Qformer.", "query_tokens", model.PROJ_NAME)) and p.ndim > 1:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("arch", ["lp_blip2_opt", "lp_blip2_t5"])
def test_stage2_exports_load_in_transformers_and_lavis(lp, arch, tiny_bert_dir, llm_dirs,
                                                       tmp_path):
    from lavis.models.blip2_models.blip2_opt import Blip2OPT
    from lavis.models.blip2_models.blip2_t5 import Blip2T5
    from transformers import Blip2ForConditionalGeneration

    kind = arch.split("_")[-1]
    ours = _randomised_tiny(lp, arch, tiny_bert_dir, llm_dirs[kind])
    ours.save_pretrained(tmp_path / "hf")
    pth = ours.save_lavis(tmp_path / "lavis.pth")

    # transformers' own class, from pixels
    hf = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    tok = ours.llm_tokenizer
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    if kind == "opt":
        enc = tok([c + "\n" for c in CAPTIONS], return_tensors="pt", padding="longest",
                  padding_side="right")
        samples = {"image": pixels, "text_input": CAPTIONS}
        with torch.no_grad():
            ref = hf(pixel_values=pixels, input_ids=enc.input_ids,
                     attention_mask=enc.attention_mask).logits[:, ours.query_tokens.shape[1] - 1:-1]
            ids = tok([PROMPT] * 2, return_tensors="pt").input_ids
            gen = hf.generate(pixel_values=pixels, input_ids=ids, max_new_tokens=6,
                              eos_token_id=ours.eos_token_id, pad_token_id=tok.pad_token_id)[:, 1:]
        prompt = PROMPT
    else:
        questions, answers = ["what is it?", "how many dogs"], ["a cat", "two"]
        enc = tok(questions, return_tensors="pt", padding="longest")
        dec = tok(answers, return_tensors="pt", padding="longest")
        samples = {"image": pixels, "text_input": questions, "text_output": answers}
        with torch.no_grad():
            ref = hf(pixel_values=pixels, input_ids=enc.input_ids,
                     attention_mask=enc.attention_mask, decoder_attention_mask=dec.attention_mask,
                     labels=dec.input_ids.masked_fill(dec.attention_mask == 0, -100)).logits
            gen = hf.generate(pixel_values=pixels, input_ids=enc.input_ids,
                              attention_mask=enc.attention_mask, max_new_tokens=6)
        prompt = questions
    with torch.no_grad():
        out = ours(dict(samples), return_logits=True)
    assert torch.allclose(out.logits, ref, atol=1e-4, rtol=0)
    theirs = [t.strip() for t in tok.batch_decode(gen, skip_special_tokens=True)]
    mine = ours.generate({"image": pixels, "prompt": prompt}, num_beams=1, max_length=6,
                         min_length=0)
    assert mine == theirs and any(mine)

    # and back: the folder into ours gives the same weights
    again = lp.load_model(arch, "tiny", is_eval=True, checkpoint=str(tmp_path / "hf"))
    mine_sd, again_sd = ours.state_dict(), again.state_dict()
    assert mine_sd.keys() == again_sd.keys()
    assert all(torch.equal(mine_sd[k], again_sd[k]) for k in mine_sd if "ln_vision" not in k)

    # LAVIS's class loads the .pth strictly and computes the same loss
    cls, llm_key = (Blip2OPT, "opt_model") if kind == "opt" else (Blip2T5, "t5_model")
    ref_model = tiny.lavis_reference(cls, ours, tiny_bert_dir, num_query_token=4,
                                     max_txt_len=ours.max_txt_len,
                                     **{llm_key: str(llm_dirs[kind])})
    ref_model.load_state_dict(torch.load(pth, weights_only=True)["model"], strict=True)
    with torch.no_grad():
        assert torch.allclose(ref_model(dict(samples))["loss"], out.loss, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def itr(lp, tiny_bert_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("itr")
    return tiny.make_retrieval_folder(folder, tiny_bert_dir, seed=12), folder


def test_stage1_round_trip_through_cli(lp, itr, tiny_bert_dir, tmp_path):
    """transformers folder -> ours -> `lavis-plugins export` -> transformers (same weights and
    ITM/ITC outputs) and LAVIS's Blip2Qformer (strict load, same features)."""
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer
    from transformers import Blip2ForImageTextRetrieval

    from lavis_plugins.cli import main

    hf, folder = itr
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(folder), "--out", str(out)]) == 0
    back = Blip2ForImageTextRetrieval.from_pretrained(out).eval()
    a, b = hf.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    ours = lp.load_model("lp_blip2_qformer", "pretrain", is_eval=True, checkpoint=str(out))
    # transformers' processor reads the folder: images at the model's size
    from PIL import Image
    from transformers import Blip2Processor

    inputs = Blip2Processor.from_pretrained(out)(images=Image.new("RGB", (64, 50)), text="a dog",
                                                 return_tensors="pt")
    assert inputs.pixel_values.shape == (1, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)

    ref = tiny.lavis_reference(Blip2Qformer, ours, tiny_bert_dir, num_query_token=3,
                               cross_attention_freq=1, embed_dim=16, max_txt_len=32)
    ref.load_state_dict(torch.load(out / "lavis_checkpoint.pth", weights_only=True)["model"],
                        strict=True)
    samples = {"image": tiny.images(seed=4), "text_input": CAPTIONS}
    for mode, field in [("image", "image_embeds_proj"), ("text", "text_embeds_proj"),
                        ("multimodal", "multimodal_embeds")]:
        assert torch.allclose(ref.extract_features(samples, mode)[field],
                              ours.extract_features(samples, mode)[field], atol=1e-5), mode


def test_export_bad_input(lp, itr, tmp_path, capsys, tiny_bert_dir, llm_dirs):
    from lavis_plugins.cli import main

    _, folder = itr
    pth = tmp_path / "x.pth"
    torch.save({"model": {}}, pth)
    assert main(["export", "--checkpoint", str(pth), "--out", str(tmp_path / "o")]) == 2
    assert "give --model and --model-type" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "nowhere"), "--out", "o"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(folder), "--out", str(folder)]) == 2
    assert "--out is the --checkpoint folder" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(folder), "--out", str(tmp_path / "o"),
                 "--options", "vit_path"]) == 2
    assert "--options takes key=value pairs; got 'vit_path'" in capsys.readouterr().err
    # transformers' Blip2VisionModel has EVA's blocks: another encoder (CLIP ViT-L) is refused
    from lavis.models.clip_vit import VisionTransformer

    model = lp.load_model("lp_blip2_opt", "tiny", bert_path=str(tiny_bert_dir),
                          opt_model=str(llm_dirs["opt"]))
    model.visual_encoder = VisionTransformer(input_resolution=32, patch_size=8, width=32,
                                             layers=1, heads=2, use_grad_checkpointing=False)
    with pytest.raises(UserError, match="vit_model 'tiny' cannot be exported to transformers"):
        model.save_pretrained(tmp_path / "clip")
    assert not (tmp_path / "clip").exists()
