"""Video models: lp_blip2_video_opt / lp_blip2_video_t5 (fusion concat / mean / vote) and
lp_blip2_video_qformer (zero-shot text-video retrieval), on tiny random models.

The image model under comparison is always the stage-2 (or stage-1) model with the very same
weights, so "a 1-frame video equals its image" is checked with ``torch.equal``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lavis_plugins.common.errors import UserError

REPO = Path(__file__).resolve().parents[1]
FAMILIES = {"opt": ("lp_blip2_opt", "lp_blip2_video_opt"),
            "t5": ("lp_blip2_t5", "lp_blip2_video_t5")}
QUESTIONS = ["what color is it", "how many shapes are there"]
ANSWERS = ["red", "blue", "two", "a large circle", "yes"]


def _pair(lp, family: str, **video_overrides):
    """(image model, video model) with identical weights, in eval mode."""
    image_name, video_name = FAMILIES[family]
    image = lp.load_model(image_name, "tiny", is_eval=True)
    video = lp.load_model(video_name, "tiny", is_eval=True, **video_overrides)
    video.load_state_dict(image.state_dict())
    return image, video


@pytest.fixture(scope="module")
def models(lp):
    return {f: _pair(lp, f) for f in FAMILIES}


@pytest.fixture
def fusion(models):
    """Set the shared video models' fusion for one test (back to concat afterwards)."""

    def set_fusion(name: str) -> None:
        for _, video in models.values():
            video.cfg.fusion = name

    yield set_fusion
    set_fusion("concat")


def _video(b=2, t=3, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, t, size, size, generator=g)


# ------------------------------------------------------------------------------ configs


def _model_section(path: Path) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(path).model)
    for k in ("arch", "fusion", "frame_prompt"):
        cfg.pop(k, None)
    return cfg


@pytest.mark.parametrize("image_name,video_name", list(FAMILIES.values()) + [
    ("lp_blip2_qformer", "lp_blip2_video_qformer")])
def test_video_yamls_mirror_the_image_yamls(lp, image_name, video_name):
    """Same model types and settings as the image model; video processors in ``preprocess``."""
    from lavis.common.registry import registry

    image_cls, video_cls = (registry.get_model_class(n) for n in (image_name, video_name))
    assert set(video_cls.PRETRAINED_MODEL_CONFIG_DICT) == set(
        image_cls.PRETRAINED_MODEL_CONFIG_DICT) and "tiny" in video_cls.PRETRAINED_MODEL_CONFIG_DICT
    for mtype in image_cls.PRETRAINED_MODEL_CONFIG_DICT:
        vpath = Path(video_cls.default_config_path(mtype))
        assert _model_section(vpath) == _model_section(Path(image_cls.default_config_path(mtype)))
        full = OmegaConf.load(vpath)
        assert full.model.arch == video_name
        assert full.preprocess.vis_processor.train.name == "lp_video_train"
        assert full.preprocess.vis_processor.eval.name == "lp_video_eval"


@pytest.mark.parametrize("name", ["lp_blip2_video_opt", "lp_blip2_video_t5",
                                  "lp_blip2_video_qformer"])
def test_load_model_and_preprocess_gives_video_processors(lp, name, tmp_path):
    from lavis.common.registry import registry

    model, vis, txt = lp.load_model_and_preprocess(name, "tiny", is_eval=True)
    assert type(vis["eval"]) is registry.get_processor_class("lp_video_eval")
    assert type(vis["train"]) is registry.get_processor_class("lp_video_train")
    from test_video_qa_task import write_video

    clip = write_video(tmp_path / "clip.mp4", [(200, 20, 20)] * 8)
    video = vis["eval"](str(clip))
    assert video.dim() == 4 and video.shape[0] == 3 and video.shape[-1] == 32  # (C, T, H, W)
    if name != "lp_blip2_video_qformer":
        question = [txt["eval"]("what?")]
        answers = model.predict_answers({"video": video[None], "text_input": question},
                                        max_len=3, num_beams=1)
        assert len(answers) == 1 and isinstance(answers[0], str)


def test_bad_fusion_settings_are_user_errors(lp):
    with pytest.raises(UserError, match="fusion"):
        lp.load_model("lp_blip2_video_opt", "tiny", fusion="sum")
    with pytest.raises(UserError, match="frame_prompt"):
        lp.load_model("lp_blip2_video_t5", "tiny", fusion="mean", frame_prompt="Frame {i}:")
    with pytest.raises(UserError, match="frame_prompt"):
        lp.load_model("lp_blip2_video_opt", "tiny", frame_prompt="Frame {n}:")


@pytest.mark.parametrize("family", FAMILIES)
def test_no_new_parameters(models, family):
    image, video = models[family]
    shapes = lambda m: {k: (tuple(p.shape), p.requires_grad) for k, p in m.named_parameters()}
    assert shapes(video) == shapes(image)


# ------------------------------------------------------------------------------ 1-frame equality


@pytest.mark.parametrize("mode", ["concat", "mean", "vote"])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_frame_video_equals_the_image_model(models, fusion, family, mode):
    image, video = models[family]
    fusion(mode)
    clip = _video(t=1)
    vs = {"video": clip, "text_input": QUESTIONS}
    ims = {"image": clip[:, :, 0], "text_input": QUESTIONS}
    kw = dict(num_beams=2, max_len=4)
    assert video.predict_answers(vs, **kw) == image.predict_answers(ims, **kw)
    assert video.predict_answers(vs, inference_method="rank", answer_list=ANSWERS) == \
        image.predict_answers(ims, inference_method="rank", answer_list=ANSWERS)
    assert video.generate({"video": clip}, max_length=5, num_beams=2) == \
        image.generate({"image": clip[:, :, 0]}, max_length=5, num_beams=2)
    if mode == "vote":  # a frame-wise vote has no single prompt, hence no logits
        with pytest.raises(UserError, match="vote"):
            video({"video": clip, "text_input": QUESTIONS})
        return
    train = dict(text_output=["red", "two"])
    v_out = video(dict(vs, **train), return_logits=True)
    i_out = image(dict(ims, **train), return_logits=True)
    assert torch.equal(v_out.logits, i_out.logits) and torch.equal(v_out.loss, i_out.loss)
    assert torch.equal(video.score_candidates(vs, ANSWERS), image.score_candidates(ims, ANSWERS))
    v_tok, v_att = video.visual_prompt(clip)
    i_tok, i_att = image.visual_prompt(clip[:, :, 0])
    assert torch.equal(v_tok, i_tok) and torch.equal(v_att, i_att)


# ------------------------------------------------------------------------------ fusion behaviour


@pytest.mark.parametrize("family", FAMILIES)
def test_concat_keeps_every_frame_in_time_order(models, family):
    image, video = models[family]
    clip = _video(b=2, t=3)
    tokens, atts = video.visual_prompt(clip)
    nq = image.query_tokens.shape[1]
    assert tokens.shape == (2, 3 * nq, image.llm.config.hidden_size) and atts.shape == (2, 3 * nq)
    for t in range(3):
        frame_tokens, _ = image.visual_prompt(clip[:, :, t])
        torch.testing.assert_close(tokens[:, t * nq:(t + 1) * nq], frame_tokens, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_frame_prompt_puts_each_cue_before_its_frame(lp, models, family):
    image, _ = models[family]
    video = lp.load_model(FAMILIES[family][1], "tiny", is_eval=True, frame_prompt="Frame {i}:")
    video.load_state_dict(image.state_dict())
    clip = _video(b=2, t=2)
    tokens, atts = video.visual_prompt(clip)
    tok = getattr(video, video.TOKENIZER_NAME)
    emb = video.llm.get_input_embeddings()
    nq = image.query_tokens.shape[1]
    pos = 0
    for t in range(2):
        ids = tok(f"Frame {t + 1}:", add_special_tokens=False).input_ids
        cue = emb(torch.tensor(ids))
        assert torch.equal(tokens[0, pos:pos + len(ids)], cue)
        assert torch.equal(tokens[1, pos:pos + len(ids)], cue)
        pos += len(ids)
        frame_tokens, _ = image.visual_prompt(clip[:, :, t])
        torch.testing.assert_close(tokens[:, pos:pos + nq], frame_tokens, rtol=0, atol=1e-6)
        pos += nq
    assert pos == tokens.shape[1] == atts.shape[1] and bool(atts.all())
    answers = video.predict_answers({"video": clip, "text_input": QUESTIONS}, max_len=3,
                                    num_beams=1)
    assert len(answers) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_mean_averages_the_frames(models, fusion, family):
    image, video = models[family]
    fusion("mean")
    clip = _video(b=2, t=4)
    tokens, atts = video.visual_prompt(clip)
    frames = torch.stack([image.visual_prompt(clip[:, :, t])[0] for t in range(4)], 1)
    torch.testing.assert_close(tokens, frames.mean(1), rtol=0, atol=1e-6)
    assert atts.shape == tokens.shape[:2]


def test_majority_vote_rules(lp):
    from lavis_plugins.models.blip2_video import majority_vote

    assert majority_vote(["red", "blue", "blue"]) == "blue"
    assert majority_vote(["red", "blue"]) == "red"  # tie: earliest frame
    assert majority_vote(["blue", "red", "red", "blue"]) == "blue"  # tie: earliest first vote
    assert majority_vote(["two", "red", "2"]) == "two"  # counted after VQA normalisation
    assert majority_vote(["The dog.", "cat", "dog"]) == "The dog."  # earliest text of the winner


@pytest.mark.parametrize("family", FAMILIES)
def test_vote_is_the_majority_of_per_frame_answers(models, fusion, family):
    from lavis_plugins.models.blip2_video import majority_vote

    image, video = models[family]
    fusion("vote")
    clip = _video(b=2, t=3, seed=3)
    kw = dict(num_beams=1, max_len=4)
    got = video.predict_answers({"video": clip, "text_input": QUESTIONS}, **kw)
    per_frame = [image.predict_answers({"image": clip[:, :, t], "text_input": QUESTIONS}, **kw)
                 for t in range(3)]
    assert got == [majority_vote([per_frame[t][b] for t in range(3)]) for b in range(2)]
    ranked = video.rank_answers({"video": clip, "text_input": QUESTIONS}, ANSWERS)
    per_frame = [image.rank_answers({"image": clip[:, :, t], "text_input": QUESTIONS}, ANSWERS)
                 for t in range(3)]
    assert ranked == [majority_vote([per_frame[t][b] for t in range(3)]) for b in range(2)]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_of_videos_equals_one_video_at_a_time(models, family):
    _, video = models[family]
    clip = _video(b=3, t=2, seed=5)
    questions = QUESTIONS + ["is there a red square"]
    batched = video.score_candidates({"video": clip, "text_input": questions}, ANSWERS)
    assert batched.shape == (3, len(ANSWERS))
    for b in range(3):
        alone = video.score_candidates({"video": clip[b:b + 1], "text_input": questions[b:b + 1]},
                                       ANSWERS)
        torch.testing.assert_close(batched[b:b + 1], alone, rtol=1e-5, atol=1e-5)
    answers = video.predict_answers({"video": clip, "text_input": questions}, num_beams=1,
                                    max_len=3)
    assert len(answers) == 3


def test_video_must_be_five_dimensional(models):
    _, video = models["opt"]
    with pytest.raises(UserError, match=r"\(B, C, T, H, W\)"):
        video.predict_answers({"video": torch.zeros(3, 2, 32, 32), "text_input": ["q"]})


# ------------------------------------------------------------------------------ retrieval


@pytest.fixture(scope="module")
def qformers(lp):
    image = lp.load_model("lp_blip2_qformer", "tiny", is_eval=True)
    video = lp.load_model("lp_blip2_video_qformer", "tiny", is_eval=True)
    video.load_state_dict(image.state_dict())
    return image, video


def test_retrieval_one_frame_equals_the_image_model(qformers):
    image, video = qformers
    clip = _video(b=2, t=1, seed=7)
    texts = ["a red circle", "two blue squares", "a green triangle"]
    feats, memory = video.video_features(clip)
    _, _, text_feats = video.text_features(texts)
    sims = video.video_text_similarity(feats, text_feats)  # (2, 3)
    # the image model's ITC similarity: max over queries of the normalised embeddings
    img = image.extract_features({"image": clip[:, :, 0]}, mode="image").image_embeds_proj
    txt = image.extract_features({"text_input": texts}, mode="text").text_embeds_proj[:, 0]
    torch.testing.assert_close(sims, (img @ txt.t()).max(1).values, rtol=0, atol=1e-6)
    tokens = video.tokenize(texts)
    for v in range(2):
        itm = video.itm_scores(memory[v:v + 1], torch.zeros(3, dtype=torch.long),
                               tokens.input_ids, tokens.attention_mask)
        ref = image.compute_itm(image.encode_image(clip[v:v + 1, :, 0]).expand(3, -1, -1),
                                tokens.input_ids, tokens.attention_mask)
        torch.testing.assert_close(itm, ref, rtol=0, atol=1e-5)


def test_video_similarity_is_the_mean_over_frames(qformers):
    _, video = qformers
    clip = _video(b=2, t=3, seed=8)
    feats, memory = video.video_features(clip)
    n_patches = memory.shape[1] // 3
    assert feats.shape[:3] == (2, 3, video.num_query) and memory.shape[0] == 2
    _, _, text_feats = video.text_features(["a red circle", "a blue square"])
    per_frame = [video.video_text_similarity(feats[:, t:t + 1], text_feats) for t in range(3)]
    torch.testing.assert_close(video.video_text_similarity(feats, text_feats),
                               torch.stack(per_frame).mean(0), rtol=0, atol=1e-6)
    # the ITM memory is the frames' image features in time order
    frame1 = video.encode_image(clip[:, :, 1])
    torch.testing.assert_close(memory[:, n_patches:2 * n_patches], frame1, rtol=0, atol=1e-6)


def _retrieval_set(lp, tmp_path, policy="fail"):
    from lavis.common.registry import registry

    from lavis_plugins.datasets.video_datasets import VideoRetrievalEvalDataset
    from test_video_qa_task import write_video

    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
              "white": (240, 240, 240)}
    anns = []
    for name, c in colors.items():
        write_video(tmp_path / "v" / f"{name}.mp4", [c] * 6)
        anns.append({"video": f"{name}.mp4", "caption": [f"a {name} screen", f"all {name}"]})
    anns.insert(2, {"video": "missing.mp4", "caption": ["nothing"]})
    (tmp_path / "ann.json").write_text(json.dumps(anns))
    proc = registry.get_processor_class("lp_video_eval").from_config(
        OmegaConf.create({"n_frms": 2, "image_size": 32}))
    return VideoRetrievalEvalDataset(proc, lambda s: s, str(tmp_path / "v"),
                                     [str(tmp_path / "ann.json")], on_bad_video=policy)


def test_compute_sim_matrix_reranks_top_k_and_skips_bad_videos(lp, qformers, tmp_path):
    from torch.utils.data import DataLoader

    _, video = qformers
    ds = _retrieval_set(lp, tmp_path, policy="skip")
    loader = DataLoader(ds, batch_size=2, collate_fn=ds.collater)
    k = 3
    i2t, t2i, skipped = video.compute_sim_matrix(loader, {"k_test": k}, return_skipped=True)
    assert i2t.shape == (5, 9) and t2i.shape == (9, 5)
    assert [s["key"] for s in skipped] == [2]
    assert np.isinf(i2t[2]).all() and np.isinf(t2i[:, 2]).all()
    good = [0, 1, 3, 4]
    assert ((i2t[good] > -100).sum(1) == k).all()  # k re-ranked texts per video
    assert ((t2i > -100).sum(1) == k).all()  # k re-ranked videos per text
    # a re-ranked score is ITM + ITC of that pair
    clip = ds.collater([ds[3]])["video"]
    feats, memory = video.video_features(clip)
    ids, atts, text_feats = video.text_features(ds.text)
    sims = video.video_text_similarity(feats, text_feats)[0]
    t = int(i2t[3].argmax())
    itm = video.itm_scores(memory, torch.zeros(1, dtype=torch.long), ids[t:t + 1], atts[t:t + 1])
    assert abs(i2t[3, t] - float(itm[0] + sims[t])) < 1e-4
    two_only = video.compute_sim_matrix(loader, {"k_test": k})
    assert len(two_only) == 2  # LAVIS's signature when skips are not asked for


def test_video_retrieval_task_leaves_skipped_videos_out(lp, qformers, tmp_path, monkeypatch):
    from lavis.common.registry import registry
    from torch.utils.data import DataLoader

    from lavis_plugins.tasks.video_retrieval import VideoRetrievalTask, drop_videos

    monkeypatch.setitem(registry.mapping["paths"], "output_dir", str(tmp_path))
    _, video = qformers
    ds = _retrieval_set(lp, tmp_path, policy="skip")
    task = VideoRetrievalTask(cfg=OmegaConf.create({"k_test": 4, "topk_save": 3}))
    m = task.evaluation(video, DataLoader(ds, batch_size=3, collate_fn=ds.collater))
    assert m["num_videos"] == 4 and m["num_texts"] == 8
    assert m["num_skipped_videos"] == 1 and m["num_skipped_texts"] == 1
    assert m["skipped_by_kind"] == {"missing": 1} and m["t2v_r1"] == m["img_r1"]
    assert 0 <= m["t2v_r1"] <= m["t2v_r5"] <= 100
    # per-query top-k over the readable videos, named by their files (issue 17)
    monkeypatch.setitem(registry.mapping["paths"], "result_dir", str(tmp_path))
    task.after_evaluation(m, split_name="test", epoch=None)
    topk = json.loads((tmp_path / "test_retrieval_topk.json").read_text())
    assert len(topk["video_to_text"]) == 4 and len(topk["text_to_video"]) == 8
    readable = [v for v in ds.image if v != "missing.mp4"]  # the dataset's one missing video
    assert [r["query"] for r in topk["video_to_text"]] == readable
    assert all(len(r["top_k"]) == 3 and {"text", "score", "correct"} <= set(r["top_k"][0])
               for r in topk["video_to_text"])
    i2t, t2i, t2v, v2t = drop_videos(*(torch.arange(20.).reshape(4, 5).numpy(),
                                       torch.arange(20.).reshape(5, 4).numpy()),
                                     {0: 0, 1: 1, 2: 1, 3: 2, 4: 3},
                                     {0: [0], 1: [1, 2], 2: [3], 3: [4]}, [1])
    assert i2t.tolist() == [[0, 3, 4], [10, 13, 14], [15, 18, 19]]
    assert t2i.tolist() == [[0, 2, 3], [12, 14, 15], [16, 18, 19]]
    assert t2v == {0: 0, 1: 1, 2: 2} and v2t == {0: [0], 1: [1], 2: [2]}
