"""LAVIS client code ports to the plugin by renaming the model (issue 17), and weights that are
not local fail in seconds with one line (no hub retries, no URL fetches)."""
from __future__ import annotations

import os
import time

import pytest
import torch
from PIL import Image

from lavis_plugins.common.errors import UserError


def test_lavis_client_script_ports_unchanged(lp, tmp_path):
    """A LAVIS BLIP-2 client script (LAVIS's own loader; the examples of LAVIS's README and
    notebooks), unchanged apart from the model names and types."""
    from lavis.models import load_model, load_model_and_preprocess

    from lavis_plugins.video.synthetic import write_video

    device = "cpu"
    raw_image = Image.new("RGB", (64, 48), (200, 30, 30))
    caption = "a red square"

    # feature extraction (LAVIS: "blip2_feature_extractor", "pretrain")
    model, vis_processors, txt_processors = load_model_and_preprocess(
        name="lp_blip2_feature_extractor", model_type="tiny", is_eval=True, device=device)
    image = vis_processors["eval"](raw_image).unsqueeze(0).to(device)
    text_input = txt_processors["eval"](caption)
    sample = {"image": image, "text_input": [text_input]}
    features_multimodal = model.extract_features(sample)
    features_image = model.extract_features(sample, mode="image")
    features_text = model.extract_features(sample, mode="text")
    nq, e = model.query_tokens.shape[1], model.cfg.embed_dim
    assert features_multimodal.multimodal_embeds.shape[:2] == (1, nq)
    assert features_image.image_embeds_proj.shape == (1, nq, e)
    assert (features_text.text_embeds_proj.shape[0] == 1
            and features_text.text_embeds_proj.shape[2] == e)
    similarity = (features_image.image_embeds_proj
                  @ features_text.text_embeds_proj[:, 0, :].t()).max()
    assert similarity.dim() == 0 and -1.0 <= float(similarity) <= 1.0

    # image-text matching (LAVIS: "blip2_image_text_matching", "pretrain"); text_input a string
    model, vis_processors, text_processors = load_model_and_preprocess(
        "lp_blip2_image_text_matching", "tiny", device=device, is_eval=True)
    img = vis_processors["eval"](raw_image).unsqueeze(0).to(device)
    txt = text_processors["eval"](caption)
    itm_output = model({"image": img, "text_input": txt}, match_head="itm")
    itm_scores = torch.nn.functional.softmax(itm_output, dim=1)
    assert itm_output.shape == (1, 2) and torch.allclose(itm_scores.sum(1), torch.ones(1))
    itc_score = model({"image": img, "text_input": txt}, match_head="itc")
    assert itc_score.shape == (1, 1) and -1.0 <= float(itc_score) <= 1.0

    # the stage-1 model answers the same call, and trains with LAVIS's output names
    stage1 = load_model("lp_blip2_qformer", "tiny", is_eval=True, device=device)
    stage1.load_state_dict(model.state_dict())
    assert torch.equal(stage1({"image": img, "text_input": txt}, match_head="itm"), itm_output)
    with pytest.raises(UserError, match="match_head"):
        stage1({"image": img, "text_input": txt}, match_head="itx")
    stage1.train()
    with stage1.maybe_autocast():
        out = stage1({"image": img.repeat(2, 1, 1, 1), "text_input": [caption, "a blue circle"]})
    assert out.loss_lm is out.loss_itg and out.loss.dim() == 0

    # captioning (LAVIS: "blip2_opt", "caption_coco_opt2.7b")
    model, vis_processors, _ = load_model_and_preprocess(
        name="lp_blip2_opt", model_type="tiny", is_eval=True, device=device)
    image = vis_processors["eval"](raw_image).unsqueeze(0).to(device)
    captions = model.generate({"image": image})
    assert isinstance(captions, list) and len(captions) == 1 and isinstance(captions[0], str)
    with model.maybe_autocast():
        assert model.generate({"image": image}, num_beams=1, max_length=3) is not None

    # VQA (LAVIS: "blip2_t5", "pretrain_flant5xl"); the question as a plain string
    model, vis_processors, txt_processors = load_model_and_preprocess(
        name="lp_blip2_t5", model_type="tiny", is_eval=True, device=device)
    image = vis_processors["eval"](raw_image).unsqueeze(0).to(device)
    question = txt_processors["eval"]("what colour is the square?")
    answers = model.predict_answers(samples={"image": image, "text_input": question},
                                    inference_method="generate")
    assert isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str)
    # LAVIS's Blip2T5.predict_answers default prompt is "" (the bare question)
    assert answers == model.predict_answers(samples={"image": image, "text_input": question},
                                            prompt="")

    # video QA: frames sampled by the video processor (LAVIS's load_video -> lp_video_eval)
    video_path = write_video(tmp_path / "clip.mp4", num_frames=12)
    model, vis_processors, txt_processors = load_model_and_preprocess(
        name="lp_blip2_video_opt", model_type="tiny", is_eval=True, device=device)
    video = vis_processors["eval"](str(video_path)).unsqueeze(0).to(device)
    assert video.dim() == 5 and video.shape[:3] == (1, 3, 4)
    answers = model.predict_answers({"video": video, "text_input": question})
    assert isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str)


def test_lavis_load_model_runs_our_checkpoint_checks(lp, tmp_path):
    """``lavis.models.load_model(..., checkpoint=X)`` loads through our checks: a stage-1 file is
    refused by the stage-2 model instead of loading silently (LAVIS's strict=False load)."""
    from lavis.models import load_model

    stage1 = tmp_path / "stage1.pth"
    torch.save({"model": load_model("lp_blip2_qformer", "tiny").state_dict()}, stage1)
    with pytest.raises(UserError, match="opt_proj"):
        load_model("lp_blip2_opt", "tiny", checkpoint=str(stage1))
    stage2 = tmp_path / "stage2.pth"
    torch.save({"model": load_model("lp_blip2_opt", "tiny").state_dict()}, stage2)
    with pytest.raises(UserError, match="trained weights missing"):
        load_model("lp_blip2_feature_extractor", "tiny", checkpoint=str(stage2))
    assert load_model("lp_blip2_opt", "tiny", checkpoint=str(stage2)) is not None


def test_url_pretrained_fails_fast_unless_allowed(lp, monkeypatch):
    """The default ``pretrained`` of the released model types is a URL: refused in seconds,
    before the encoders are built, naming the key and the fix; opting in hands it to LAVIS."""
    monkeypatch.delenv("LAVIS_PLUGINS_ALLOW_DOWNLOAD", raising=False)
    for name, mtype in (("lp_blip2_opt", "pretrain_opt2.7b"), ("lp_blip2_t5", "pretrain_flant5xl"),
                        ("lp_blip2_qformer", "tiny")):
        extra = {"pretrained": "https://example.com/x.pth", "load_pretrained": True} \
            if name == "lp_blip2_qformer" else {}
        start = time.perf_counter()
        with pytest.raises(UserError, match=r"model\.pretrained is a URL.*LAVIS_PLUGINS_ALLOW_"):
            lp.load_model(name, mtype, **extra)
        assert time.perf_counter() - start < 5
    for name in ("lp_blip2_opt", "lp_blip2_qformer"):  # a missing local file: also before building
        with pytest.raises(UserError,
                           match=r"model\.pretrained '/nonexistent\.pth' does not exist"):
            lp.load_model(name, "tiny", pretrained="/nonexistent.pth", load_pretrained=True)
    from lavis_plugins.common import local_files

    calls = []
    monkeypatch.setenv("LAVIS_PLUGINS_ALLOW_DOWNLOAD", "1")
    monkeypatch.setattr("lavis.common.dist_utils.download_cached_file",
                        lambda url, **kw: calls.append(url) or "/nonexistent/x.pth")
    assert local_files.local_checkpoint("https://example.com/x.pth", "pretrained") == \
        "/nonexistent/x.pth" and calls == ["https://example.com/x.pth"]


def test_hub_names_fail_fast_without_calling_transformers(lp, monkeypatch, tmp_path):
    """A ``bert_path`` or LLM folder that is a hub name not in the local cache is refused before
    transformers sees it (transformers would retry the hub for minutes)."""
    import transformers

    from lavis_plugins.models.qformer import QFormer

    def local_only(owner, name):
        original = getattr(owner, name)

        def checked(path, *a, **k):
            assert os.path.isdir(path), f"transformers was asked for the non-local {path!r}"
            return original(path, *a, **k)

        monkeypatch.setattr(owner, name, checked)

    local_only(transformers.BertTokenizer, "from_pretrained")
    local_only(QFormer, "from_bert")
    local_only(transformers.OPTForCausalLM, "from_pretrained")
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"model\.bert_path is 'no-org/no-bert'.*local folder"):
        lp.load_model("lp_blip2_qformer", "tiny", bert_path="no-org/no-bert")
    with pytest.raises(UserError, match=r"model\.opt_model of lp_blip2_opt is 'no-org/no-opt'"):
        lp.load_model("lp_blip2_opt", "tiny", opt_model="no-org/no-opt", bert_path="tiny")
    assert time.perf_counter() - start < 10
