"""The benchmark scripts' own parts that need no timing: caption lengths, side selection, option
checks and the list `make bench` runs (the figures themselves live in docs/benchmarks.md)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


def test_caption_kinds_have_their_lengths():
    import _bench_common as common

    hist = common.caption_lengths()
    lengths = [len(c.split()) for c in common.captions(4000, "coco")]
    assert set(lengths) <= set(hist)
    assert 10.0 < sum(lengths) / len(lengths) < 11.0  # the histogram's mean, about 10.5 words
    assert max(lengths) >= 20  # its long tail is drawn
    uniform = [len(c.split()) for c in common.captions(500)]
    assert min(uniform) == 5 and max(uniform) == 15
    assert {len(c.split()) for c in common.captions(3, "full", 32)} == {32}
    assert common.captions(5, "coco") == common.captions(5, "coco")  # fixed seed
    with pytest.raises(ValueError, match="choose one of"):
        common.captions(1, "long")


def test_caption_length_counter_reads_both_formats(tmp_path):
    lavis = tmp_path / "lavis.json"
    lavis.write_text(json.dumps([{"caption": "a b c"}, {"caption": ["a b c", "a b c d e"]}]))
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"annotations": [{"caption": "a b"}, {"caption": "a b"}]}))
    for path, want in ((lavis, {"3": 667, "5": 333}), (coco, {"2": 1000})):
        out = subprocess.run([sys.executable, str(BENCH / "caption_lengths.py"), str(path)],
                             capture_output=True, text=True, check=True)
        assert json.loads(out.stdout)["per_mille"] == want
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    out = subprocess.run([sys.executable, str(BENCH / "caption_lengths.py"), str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().startswith(f"{bad}: not a caption annotation file")


def test_sides_are_checked_and_a_missing_lavis_env_names_the_fix(tmp_path):
    from _bench_common import sides_of

    def args(sides):
        return argparse.Namespace(sides=sides, lavis_python=str(tmp_path / "no" / "python"))

    with pytest.raises(SystemExit, match="run `make bench-env`"):
        sides_of(args("ours,lavis"))
    with pytest.raises(SystemExit, match="--sides lavis_kv needs LAVIS's own environment"):
        sides_of(args("lavis_kv"))
    with pytest.raises(SystemExit, match=r"choose from \['ours', 'lavis', 'lavis_kv', "):
        sides_of(args("ours,lavis2"))
    assert sides_of(args("ours, lavis446")) == ["ours", "lavis446"]


@pytest.mark.parametrize("beams", ["0", "1,x", ""])
def test_stage2_beams_option_refuses_bad_values(beams, capsys):
    import bench_stage2

    with pytest.raises(SystemExit):
        bench_stage2.parse_args(["--beams", beams])
    assert "--beams" in capsys.readouterr().err
    assert bench_stage2.parse_args(["--beams", "1,5"]).beam_list == [1, 5]


def test_run_all_knows_every_script():
    import run_all

    for name, (script, *_) in run_all.BENCHMARKS.items():
        assert (BENCH / script).is_file(), name
    out = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--list"],
                         capture_output=True, text=True, check=True).stdout
    assert "stage1_coco: .venv/bin/python benchmarks/bench_stage1.py --captions coco" in out
    assert run_all.last_table("round 0\n\ntable\nrow\n") == "table\nrow"


def test_stage1_profile_names_every_part_of_a_step(tmp_path):
    """profile_stage1 attributes the step's work to the four Q-Former passes in their order, the
    image keys/values, backward and AdamW, and counts FLOPs only where its counter is given."""
    import profile_stage1 as prof

    args = prof.bench.parse_args(["--impl", "ours", "--hidden", "32", "--layers", "2",
                                  "--vit-width", "32", "--vit-depth", "1", "--batch", "2",
                                  "--steps", "1", "--warmup", "0", "--bert-dir",
                                  str(tmp_path / "bert-base-uncased")])
    prof.bench.make_bert(args, tmp_path)
    out = prof.run_impl(args)
    assert set(out["gflop"]) == set(prof.PARTS)  # no fifth pass, nothing unnamed
    assert out["gflop"]["ITM"] > out["gflop"]["ITC text"] > 0
    assert out["gflop"]["backward"] > out["gflop"]["ITM"]
    assert out["gflop"]["AdamW"] == 0  # the counter sees no matrix products in the update
    (times,) = out["times"]
    assert set(times) == set(prof.PARTS) and all(t >= 0 for t in times.values())


def counted_flops(fn, *args) -> float:
    """FLOPs of ``fn(*args)`` by torch's counter (attention as the math kernel, which it counts)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        fn(*args)
    return counter.get_total_flops()


def test_video_selection_flop_estimate_counts_what_the_model_runs(lp):
    """flops_video_selection's arithmetic (the real-size projection of frame selection) equals
    torch's FLOP counter on the tiny stage-1 model: the ViT at its own and a smaller grid, the
    selector's query pass (first self-attention once), the stage-2-style query pass and the ITM
    pass of a question."""
    import torch

    import flops_video_selection as fv

    model = lp.load_model("lp_blip2_video_qformer", "tiny", is_eval=True).requires_grad_(False)
    vit, bert = model.visual_encoder, model.Qformer.bert
    cfg = bert.config
    sizes = fv.Sizes(
        vit_width=vit.embed_dim, vit_depth=len(vit.blocks), patch=vit.patch_embed.patch_size[0],
        vit_mlp=vit.blocks[0].mlp.fc1.out_features, full_grid=vit.patch_embed.patch_shape[0],
        q_layers=cfg.num_hidden_layers, q_width=cfg.hidden_size, q_ffn=cfg.intermediate_size,
        q_heads=cfg.num_attention_heads, queries=model.query_tokens.shape[1],
        cross_every=cfg.cross_attention_freq)
    frames = 3

    side = sizes.full_grid * sizes.patch
    for grid in (sizes.full_grid, sizes.full_grid // 2):
        image = torch.randn(frames, 3, grid * sizes.patch, grid * sizes.patch)
        assert counted_flops(model.vit_features, image) == 2 * frames * fv.vit_macs(sizes, grid)
    feats = model.encode_image(torch.randn(frames, 3, side, side)).detach()
    n = feats.shape[1]
    assert counted_flops(model.query_output, feats) == 2 * frames * fv.qformer_macs(sizes, n)
    once = 4 * sizes.queries * sizes.q_width ** 2 + 2 * sizes.queries ** 2 * sizes.q_width
    assert counted_flops(model.frame_query_output, feats) == 2 * (
        frames * fv.qformer_macs(sizes, n, first_self_once=True) + once)
    text = model.tokenize(["what is moving in the video"])
    ids, atts = text.input_ids.expand(frames, -1), text.attention_mask.expand(frames, -1)
    rows = torch.arange(frames)
    itm = counted_flops(model.itm_scores, feats, rows, ids, atts)
    head = frames * sizes.queries * sizes.q_width * 2  # the ITM head on each query output
    assert itm == 2 * (frames * fv.qformer_macs(sizes, n, text=ids.shape[1]) + head)


@pytest.mark.parametrize("grids", [(8, 4), (6, 0)])
def test_proportional_model_has_the_real_size_cost_ratios(grids):
    """bench_video_qa --proportions real: every part's FLOP ratio (ViT at the scoring grid,
    selector / stage-2 / ITM query passes, LLM scorer and answer, per ViT frame) and every video's
    total (select / uniform 4) is within the tolerance of the real size's, by the counts the
    previous test checks against torch; the ViT at a scoring grid and the query pass are not
    below the real ratio by more than 3% (the scaled model must not look cheaper there)."""
    import flops_video_selection as fv

    rows = fv.proportion_rows(32, 4, ["itc", "itm", "llm"], grids, 2, 5, beams=1)
    assert len(rows) >= 10
    for name, real, scaled in rows:
        assert abs(scaled / real - 1) <= fv.PROPORTION_TOLERANCE, (name, real, scaled)
    by_name = {name: (real, scaled) for name, real, scaled in rows}
    real, scaled = by_name["video: select 4 of 32 (itc, grid 8) / uniform 4"] if 8 in grids else (
        by_name["video: select 4 of 32 (itc, grid 6) / uniform 4"])
    assert 1.5 < real < 3 and abs(scaled / real - 1) < 0.03
    # the small config is far from these proportions: its Q-Former pass weighs ~12x more
    small = fv.Sizes(vit_width=256, vit_depth=2, vit_mlp=1024, q_layers=4, q_width=256,
                     q_ffn=1024, q_heads=4, llm_layers=4, llm_width=256, llm_ffn=1024, vocab=512)
    off = fv.proportion_rows(32, 4, ["itc"], grids, 2, 5, beams=1, scaled=small)
    assert max(abs(s / r - 1) for _, r, s in off) > 5
    assert fv.print_proportions(rows) == max(abs(s / r - 1) for _, r, s in rows)


def test_flop_script_prints_the_proportions(capsys):
    import flops_video_selection as fv

    fv.main(["--proportions", "--grid", "8", "--itm-pool", "2"])
    out = capsys.readouterr().out
    assert "# PROPORTIONS" in out and "(tolerance 10%)" in out
    assert "| video: select 4 of 32 (itm, grid 8) / uniform 4 | 2.554 | 2.533 | 0.992 |" in out


def test_proportional_model_is_built_as_counted_flops(lp, tmp_path):
    """The model bench_video_qa builds for --proportions real runs the multiply-adds
    flops_video_selection.PROPORTIONAL counts (torch's FLOP counter: a frame through the ViT at
    224 px and at grid 8, the stage-2 query pass; the LLM's width and depth), and its small
    tokenizers give the prompts' real lengths."""
    import torch

    import _video_proportions as proportions
    import bench_video_qa as bench
    import flops_video_selection as fv

    s = fv.PROPORTIONAL
    args = bench.parse_args(["--selection", "32", "4", "--proportions", "real"])
    proportions.make_folders(args, tmp_path)
    prompt = bench.PROMPT.format(bench.QUESTION)
    counts = proportions.token_counts(tmp_path, prompt, bench.QUESTION)
    assert counts == {"question_tokens": 12, "selection_prompt_tokens": s.selection_prompt_tokens,
                      "text_tokens": 9, "vocab": s.vocab}
    model, _ = bench.build_ours(args, tmp_path, 4)
    model.requires_grad_(False)

    for grid in (16, 8):
        frame = torch.randn(1, 3, grid * 14, grid * 14)
        assert counted_flops(model.vit_features, frame) == 2 * fv.vit_macs(s, grid)
    feats = model.encode_image(torch.randn(1, 3, 224, 224))
    assert feats.shape[1] == 257
    assert counted_flops(model.query_output, feats) == 2 * fv.qformer_macs(s, 257)
    opt = model.opt_model.config
    assert (opt.num_hidden_layers, opt.hidden_size, opt.ffn_dim) == (
        s.llm_layers, s.llm_width, s.llm_ffn)
    assert opt.max_position_embeddings >= 32 * 32 + s.question_tokens + 5  # uniform 32 fits


@pytest.mark.parametrize("argv, message", [
    (["--proportions", "real"], "--proportions real measures frame selection: add --selection"),
    (["--selection", "32", "4", "--proportions", "real", "--real-size"],
     "--proportions real and --real-size exclude each other"),
    (["--selection", "32", "4", "--proportions", "blip2"], "invalid choice: 'blip2'"),
])
def test_video_qa_proportions_option_refuses_bad_values(argv, message, capsys):
    import bench_video_qa as bench

    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ itm_negatives_shapes.py


def test_itm_shapes_train_split_is_built_like_test(shapes_home, tmp_path):
    """The "train" evaluation split: 200 training images with distinct descriptions, each with
    its 4 reference captions (its 2 training captions among them), as val/test are built."""
    import itm_negatives_shapes as bench

    from lavis_plugins.demo_data import default_root

    root = default_root()
    refs = bench.scene_references()
    train = json.loads((root / "annotations" / "caption_train.json").read_text())
    test = json.loads((root / "annotations" / "caption_test.json").read_text())
    assert all(a["caption"] in refs for a in train)  # every template's caption is known
    assert all(tuple(a["caption"]) == refs[a["caption"][0]] for a in test)
    rows = json.loads(bench.train_subset_annotation(root, tmp_path).read_text())
    assert len(rows) == bench.TRAIN_SUBSET
    assert len({tuple(r["caption"]) for r in rows}) == len(rows)  # one image per description
    trained = {}
    for a in train:
        trained.setdefault(a["image"], []).append(a["caption"])
    for r in rows:
        assert r["image"].startswith("train/") and len(r["caption"]) == 4
        assert set(trained[r["image"]]) <= set(r["caption"])
    data = bench.eval_split("train", tmp_path)
    assert len(data.image) == 200 and len(data.text) == 800
    assert all(data.txt2img[t] == i for i, ts in data.img2txt.items() for t in ts)


def test_itm_shapes_overlap_counts_right_and_wrong_queries():
    """Two images, two captions each: where ITC alone and re-ranking are right, and whether the
    truth is among ITC's top k."""
    import itm_negatives_shapes as bench

    data = argparse.Namespace(img2txt={0: [0, 1], 1: [2, 3]}, txt2img=[0, 0, 1, 1])
    itc = np.array([[.9, .1, .5, .2],    # image 0: ITC right (text 0)
                    [.8, .1, .3, .2]])   # image 1: ITC wrong (text 0)
    rerank_i2t = np.array([[0, 0, 1, 0],  # re-ranking: image 0 wrong, image 1 right
                           [0, 0, 1, 0.]])
    rerank_t2i = np.array([[1, 0], [1, 0], [1, 0], [0, 1.]])  # texts 0, 1, 3 right
    out = bench.overlap(itc, rerank_i2t, rerank_t2i, data, k=1)
    # i2t: both right 0, ITC only 1, re-rank only 1, neither 0; image 1's truth not in top 1
    assert out["i2t"] == [0, 1, 1, 0, 50.0]
    # t2i by ITC: every text -> image 0 (column max), so texts 0, 1 right
    assert out["t2i"] == [2, 0, 1, 1, 50.0]
    assert out["img_err_phi"] == pytest.approx(-1.0)  # opposite images wrong


def test_itm_shapes_reads_a_runs_model_settings(tmp_path):
    import itm_negatives_shapes as bench

    (tmp_path / "log.txt").write_text(json.dumps(
        {"run": {"seed": 7}, "model": {"arch": "lp_blip2_qformer", "num_query_token": 8}},
        indent=4) + '\n{"train_lr": "0.001"}\n')
    assert bench.run_model_config(tmp_path) == {"arch": "lp_blip2_qformer",
                                                "num_query_token": 8}


@pytest.mark.parametrize("argv, message", [
    ([], "name ITM negative modes to train, or --eval-runs folders to evaluate"),
    (["mixed", "--splits", "all"], "invalid choice: 'all'"),
    (["easy"], "mode 'easy': choose from ['hard', 'mixed', 'random', 'curriculum']"),
])
def test_itm_shapes_refuses_bad_options(argv, message, tmp_path, monkeypatch, capsys):
    import itm_negatives_shapes as bench

    monkeypatch.setattr(sys, "argv", ["itm_negatives_shapes.py", "--out", str(tmp_path), *argv])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2 and message in capsys.readouterr().err
