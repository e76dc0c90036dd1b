"""Question-aware frame selection (``model.frame_selection``) of lp_blip2_video_opt / _t5, and
the stage-1 frame scoring of lp_blip2_video_qformer, through ``load_model``.

The "picks the frames that match" test trains a tiny stage-1 model for a few seconds on two kinds
of frames (red squares, blue circles) with their captions, saves it as a checkpoint and lets it
choose frames of clips where only some frames show what the question asks about.
"""
from __future__ import annotations

import pytest
import torch

from lavis_plugins.common.errors import UserError

QUESTIONS = ["is there a red square", "is there a blue circle"]
ANSWERS = ["yes", "no", "red", "blue"]
SIZE = 32
TRAIN_STEPS = 120  # ITC separates the two kinds after ~20 steps, ITM after ~60-100


def _frame(color: str) -> torch.Tensor:
    """(3, SIZE, SIZE): a red square or a blue circle on grey, normalised roughly as CLIP."""
    img = torch.full((3, SIZE, SIZE), -0.5)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    if color == "red":
        mask = (yy - 16).abs().le(8) & (xx - 16).abs().le(8)
        rgb = (1.5, -1.5, -1.5)
    else:
        mask = ((yy - 16) ** 2 + (xx - 16) ** 2).le(80)
        rgb = (-1.5, -1.5, 1.5)
    for c in range(3):
        img[c][mask] = rgb[c]
    return img


def _clip(colors) -> torch.Tensor:
    """(3, T, SIZE, SIZE) video whose frame t is ``_frame(colors[t])``."""
    return torch.stack([_frame(c) for c in colors], dim=1)


@pytest.fixture(scope="module")
def demo_bert(tmp_path_factory):
    """The demo's tiny BERT (no dropout, wider init: a tiny Q-Former learns in seconds) at the
    "tiny" models' own Q-Former width (``make_tiny_bert``'s sizes, not the demo's 64): the
    answering models of these tests are built at that width and read the selector's weights."""
    from lavis_plugins.demo import make_demo_bert

    return str(make_demo_bert(tmp_path_factory.mktemp("bert") / "bert", hidden_size=32,
                              num_attention_heads=2, intermediate_size=64))


@pytest.fixture(scope="module")
def selector_ckpt(lp, tmp_path_factory, demo_bert):
    """A tiny stage-1 model trained (about 5 s) to tell red squares from blue circles."""
    torch.manual_seed(0)
    model = lp.load_model("lp_blip2_qformer", "tiny", freeze_vit=False, bert_path=demo_bert)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    captions = {"red": "a red square", "blue": "a blue circle"}
    for step in range(TRAIN_STEPS):
        colors = ["red", "blue"]  # two distinct captions: each one's ITM negative is the other
        images = torch.stack([_frame(c) + 0.2 * torch.randn(3, SIZE, SIZE) for c in colors])
        out = model({"image": images, "text_input": [captions[c] for c in colors],
                     "image_id": torch.tensor([0 if c == "red" else 1 for c in colors])})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    _BERT[:] = [demo_bert]
    path = tmp_path_factory.mktemp("selector") / "stage1.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def _video_model(lp, arch="lp_blip2_video_opt", **kw):
    """A tiny video model; with a selector it is built from the selector's BERT (the selector
    takes the answering model's Q-Former settings)."""
    torch.manual_seed(1)
    if kw.get("selector_checkpoint"):
        kw.setdefault("bert_path", _BERT[0])
    return lp.load_model(arch, "tiny", is_eval=True, **kw)


_BERT: list = []  # the demo BERT's folder, set by the selector_ckpt fixture


@pytest.mark.parametrize("method", ["itc", "itm"])
def test_selection_picks_the_frames_that_match_the_question(lp, selector_ckpt, method):
    colors = [["blue", "red", "blue", "blue", "red", "blue"],
              ["red", "red", "blue", "red", "red", "red"]]
    video = torch.stack([_clip(c) for c in colors])  # (2, 3, 6, H, W)
    texts = ["is there a red square", "is there a blue circle"]
    # the stage-1 model's own API
    stage1 = lp.load_model("lp_blip2_video_qformer", "tiny", is_eval=True,
                           checkpoint=str(selector_ckpt), bert_path=_BERT[0])
    chosen = stage1.select_frames(video, texts, k=2, method=method).tolist()
    assert chosen[0] == [1, 4] and 2 in chosen[1]  # the red frames; the only blue frame
    # the stage-2 model answering from the kept frames (its own encoder differs: not shared)
    model = _video_model(lp, frame_selection=method, selection_k=2,
                         selector_checkpoint=str(selector_ckpt))
    answers = model.predict_answers({"video": video, "text_input": texts}, max_len=2,
                                    num_beams=1)
    assert len(answers) == 2
    assert model.last_frame_selection.tolist() == chosen


def _count_passes(model):
    """Records the input shape of every image-encoder pass (``calls``) and the number of images
    the answering model's Q-Former reads per pass (``qformer``)."""
    calls, qformer = [], []
    # the patch embedding: every pass starts there, at any side (the encoder's own forward
    # runs only at its built side)
    model.visual_encoder.patch_embed.proj.register_forward_hook(
        lambda m, i, o: calls.append(tuple(i[0].shape)))
    own = model.prompt_from_features

    def counted(embeds, *a, **k):
        qformer.append(embeds.shape[0])
        return own(embeds, *a, **k)

    model.prompt_from_features = counted
    return calls, qformer


# selection_grid -> the encoder passes of one video of 4 candidates keeping 2 (the tiny model:
# 32 px, 8 px patches, a 4 x 4 grid). Full resolution (0, or the default 8: not below the
# model's own grid) encodes each frame once; 2 scores all 4 at 16 px, then encodes the 2 kept
FULL_GRID = 0
SHARED_PASSES = {FULL_GRID: [(4, 3, SIZE, SIZE)], 8: [(4, 3, SIZE, SIZE)],
                 2: [(4, 3, SIZE // 2, SIZE // 2), (2, 3, SIZE, SIZE)]}


@pytest.mark.parametrize("grid", sorted(SHARED_PASSES))
def test_a_selector_with_the_same_encoder_shares_it_and_encodes_frames_once(lp, selector_ckpt,
                                                                            grid):
    """When the selector's image encoder equals the answering model's (BLIP-2's frozen ViT), no
    frame goes through the encoder twice at one resolution, and the answering model's Q-Former
    reads only the kept frames (itc/itm score with the selector's own Q-Former)."""
    model = _video_model(lp, frame_selection="itm", selection_k=2, selection_grid=grid,
                         selector_checkpoint=str(selector_ckpt))
    state = torch.load(selector_ckpt, weights_only=False)["model"]
    model.visual_encoder.load_state_dict({k[len("visual_encoder."):]: v for k, v in state.items()
                                          if k.startswith("visual_encoder.")})
    calls, qformer = _count_passes(model)
    video = torch.stack([_clip(["blue", "red", "blue", "red"])])
    model.predict_answers({"video": video, "text_input": ["is there a red square"]},
                          max_len=2, num_beams=1)
    assert model.frame_selector().visual_encoder is model.visual_encoder
    assert calls == SHARED_PASSES[grid]
    assert qformer == [2]  # the 2 kept frames, not the 4 candidates
    assert model.last_frame_selection.tolist() == [[1, 3]]


def test_the_selector_checkpoint_is_read_once(lp, selector_ckpt, monkeypatch):
    reads = []
    load = torch.load

    def counting_load(f, *a, **k):
        reads.append(str(f))
        return load(f, *a, **k)

    monkeypatch.setattr(torch, "load", counting_load)
    model = _video_model(lp, frame_selection="itc", selection_k=1,
                         selector_checkpoint=str(selector_ckpt))
    model.frame_selector()
    assert reads.count(str(selector_ckpt)) == 1


# selection_grid -> encoder passes of 2 videos of 5 candidates keeping 2 with the LLM scorer
LLM_PASSES = {FULL_GRID: [(10, 3, SIZE, SIZE)],  # once: scoring and answering share the tokens
              2: [(10, 3, SIZE // 2, SIZE // 2), (4, 3, SIZE, SIZE)]}


@pytest.mark.parametrize("grid", sorted(LLM_PASSES))
@pytest.mark.parametrize("arch", ["lp_blip2_video_opt", "lp_blip2_video_t5"])
def test_llm_scorer_encodes_each_frame_once_and_is_batch_independent(lp, arch, grid):
    model = _video_model(lp, arch, frame_selection="llm", selection_k=2, selection_grid=grid)
    calls, _ = _count_passes(model)
    g = torch.Generator().manual_seed(0)
    video = torch.randn(2, 3, 5, SIZE, SIZE, generator=g)
    scores = model.score_candidates({"video": video, "text_input": QUESTIONS}, ANSWERS)
    assert calls == LLM_PASSES[grid]
    both = model.last_frame_selection.tolist()
    assert all(len(row) == 2 and row == sorted(row) for row in both)
    for i in range(2):  # each video alone selects and scores the same
        alone = model.score_candidates({"video": video[i:i + 1], "text_input": QUESTIONS[i:i + 1]},
                                       ANSWERS)
        assert model.last_frame_selection.tolist() == [both[i]]
        torch.testing.assert_close(alone, scores[i:i + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fusion", ["concat", "mean", "vote"])
@pytest.mark.parametrize("method", ["llm", "itm"])
def test_keeping_all_frames_equals_no_selection(lp, selector_ckpt, fusion, method):
    plain = _video_model(lp, fusion=fusion)
    chosen = _video_model(lp, fusion=fusion, frame_selection=method, selection_k=4,
                          selector_checkpoint=str(selector_ckpt))
    chosen.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(2)
    samples = {"video": torch.randn(2, 3, 4, SIZE, SIZE, generator=g), "text_input": QUESTIONS}
    kw = dict(max_len=3, num_beams=2)
    assert chosen.predict_answers(samples, **kw) == plain.predict_answers(samples, **kw)
    assert chosen.last_frame_selection.tolist() == [[0, 1, 2, 3]] * 2
    assert "_frame_selector" not in chosen.__dict__  # nothing was scored
    if fusion != "vote":
        assert torch.equal(chosen.score_candidates(samples, ANSWERS),
                           plain.score_candidates(samples, ANSWERS))


def test_selection_settings_are_checked(lp, tmp_path, selector_ckpt):  # sets _BERT
    with pytest.raises(UserError, match="frame_selection"):
        lp.load_model("lp_blip2_video_opt", "tiny", frame_selection="clip")
    with pytest.raises(UserError, match="selection_k"):
        lp.load_model("lp_blip2_video_opt", "tiny", frame_selection="llm", selection_k=0)
    with pytest.raises(UserError, match="selector_checkpoint"):
        lp.load_model("lp_blip2_video_t5", "tiny", frame_selection="itm")
    for grid in (-1, 2.5, "8", True):
        with pytest.raises(UserError, match="selection_grid"):
            lp.load_model("lp_blip2_video_opt", "tiny", frame_selection="llm",
                          selection_grid=grid)
    for pool in (-1, 1.5, "2", True):
        with pytest.raises(UserError, match="selection_itm_pool"):
            lp.load_model("lp_blip2_video_opt", "tiny", frame_selection="llm",
                          selection_itm_pool=pool)
    with pytest.raises(UserError, match="selection_prompt"):
        lp.load_model("lp_blip2_video_opt", "tiny", frame_selection="llm",
                      selection_prompt="Is {q} answered?")
    with pytest.raises(UserError, match="selection_aggregate.*spread"):
        lp.load_model("lp_blip2_video_opt", "tiny", frame_selection="llm",
                      selection_aggregate="mean")
    video = {"video": torch.zeros(1, 3, 2, SIZE, SIZE), "text_input": ["what"]}
    missing = _video_model(lp, frame_selection="itc", selection_k=1,
                           selector_checkpoint=str(tmp_path / "no.pth"))
    with pytest.raises(UserError, match="not a file"):
        missing.predict_answers(video, max_len=2, num_beams=1)
    stage2 = tmp_path / "stage2.pth"
    torch.save({"model": missing.state_dict()}, stage2)
    wrong = _video_model(lp, frame_selection="itc", selection_k=1,
                         selector_checkpoint=str(stage2))
    with pytest.raises(UserError, match="not a stage-1 checkpoint"):
        wrong.predict_answers(video, max_len=2, num_beams=1)
    llm = _video_model(lp, frame_selection="llm", selection_k=1)
    with pytest.raises(UserError, match="question text"):
        llm.predict_answers({"video": video["video"], "text_input": [""]}, max_len=2,
                            num_beams=1)
    spread = _video_model(lp, frame_selection="llm", selection_k=1, selection_aggregate="spread")
    with pytest.raises(UserError, match="'spread' compares .* only one"):
        spread.predict_answers(video, max_len=2, num_beams=1)  # one question, no options


def test_spread_is_each_frame_s_best_minus_mean_score_over_its_texts(lp, selector_ckpt):
    """``selection_aggregate: spread``: per frame, the maximum minus the mean of its scores for
    its video's texts, each text scored alone; ``best``: the maximum."""
    stage1 = lp.load_model("lp_blip2_video_qformer", "tiny", is_eval=True,
                           checkpoint=str(selector_ckpt), bert_path=_BERT[0])
    video = torch.stack([_clip(["red", "blue", "red"]), _clip(["blue", "blue", "red"])])
    embeds = stage1.encode_image(video.transpose(1, 2).flatten(0, 1))
    embeds = embeds.reshape(2, 3, *embeds.shape[1:])  # (B, T, N, Dv)
    texts = [["a red square", "a blue circle"], ["a red square", "a blue circle", "a circle"]]
    for method in ("itc", "itm"):
        alone = [torch.stack([stage1.frame_text_scores(embeds[v:v + 1], [[t]], method)[0]
                              for t in ts]) for v, ts in enumerate(texts)]  # (texts, T) each
        spread = stage1.frame_text_scores(embeds, texts, method, aggregate="spread")
        best = stage1.frame_text_scores(embeds, texts, method)
        for v in range(2):
            torch.testing.assert_close(best[v], alone[v].max(0).values)
            torch.testing.assert_close(spread[v], alone[v].max(0).values - alone[v].mean(0))


def test_candidate_frames_and_pick_frames_equal_the_plain_tensor_ops():
    """The copy-saving helpers give exactly what resizing every flattened frame and gathering
    the kept frames gave."""
    import torch.nn.functional as F

    from lavis_plugins.models._frame_selection import candidate_frames, gather_frames, pick_frames
    from lavis_plugins.models._video_frames import flatten_frames

    video = torch.randn(2, 3, 5, 28, 28, generator=torch.Generator().manual_seed(0))
    plain = F.interpolate(flatten_frames(video), size=(14, 14), mode="bilinear", antialias=True,
                          align_corners=False)
    assert torch.equal(candidate_frames(video, 14), plain)
    assert torch.equal(candidate_frames(video, 28), flatten_frames(video))
    index = torch.tensor([[0, 3], [2, 4]])
    assert torch.equal(pick_frames(video, index),
                       gather_frames(video.transpose(1, 2), index).transpose(1, 2))


def _stage1_frames(lp, selector_ckpt, colors):
    """The stage-1 selector model and its image features (B, T, N, Dv) of clips ``colors``."""
    stage1 = lp.load_model("lp_blip2_video_qformer", "tiny", is_eval=True,
                           checkpoint=str(selector_ckpt), bert_path=_BERT[0])
    video = torch.stack([_clip(c) for c in colors])
    embeds = stage1.encode_image(video.transpose(1, 2).flatten(0, 1))
    return stage1, embeds.reshape(len(colors), len(colors[0]), *embeds.shape[1:])


def test_the_selector_query_pass_computes_the_first_self_attention_once(lp, selector_ckpt):
    """``frame_query_output`` (the queries' first self-attention once for all frames) equals
    ``query_output`` (it once per frame), and runs that attention once."""
    stage1, embeds = _stage1_frames(lp, selector_ckpt, [["red", "blue", "red", "blue"]] * 2)
    embeds = embeds.flatten(0, 1) + 0.1 * torch.randn(embeds.flatten(0, 1).shape,
                                                      generator=torch.Generator().manual_seed(0))
    rows = []
    attention = stage1.Qformer.bert.encoder.layer[0].attention.self
    hook = attention.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    with torch.no_grad():
        once = stage1.frame_query_output(embeds)
        assert rows == [1]
        torch.testing.assert_close(once, stage1.query_output(embeds), rtol=1e-6, atol=1e-6)
    hook.remove()


def test_itm_re_ranking_itc_s_best_frames_equals_full_itm_on_those_frames(lp, selector_ckpt):
    """``itm_pool`` m: ITC proposes each video's m best frames, ITM scores exactly those (as
    scoring every frame gives them); the others score -inf; m = T equals ITM on every frame."""
    colors = [["blue", "red", "blue", "blue", "red", "blue"],
              ["red", "red", "blue", "red", "red", "red"]]
    stage1, embeds = _stage1_frames(lp, selector_ckpt, colors)
    texts = [["is there a red square"], ["is there a blue circle", "is there a red square"]]
    full = stage1.frame_text_scores(embeds, texts, "itm")
    torch.testing.assert_close(stage1.frame_text_scores(embeds, texts, "itm", itm_pool=6), full)
    itc = stage1.frame_text_scores(embeds, texts, "itc")
    pooled = stage1.frame_text_scores(embeds, texts, "itm", itm_pool=3)
    for v in range(2):
        # identical frames score alike: ties go to the earlier frame
        proposed = set(torch.sort(itc[v], descending=True, stable=True).indices[:3].tolist())
        scored = {t for t in range(6) if torch.isfinite(pooled[v, t])}
        assert scored == proposed
        torch.testing.assert_close(pooled[v, sorted(scored)], full[v, sorted(scored)])
