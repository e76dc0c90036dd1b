"""``make demo-capfilt``'s pieces: the caption corruption, the filter-quality count, its YAML with
the options the demo adds, and the report table (the run itself: README / docs/capfilt_demo.md)."""
from __future__ import annotations

import json

import pytest


def test_corruption_changes_one_colour_or_shape_word_in_the_asked_fraction():
    from lavis_plugins.demo_capfilt import corrupt_captions
    from lavis_plugins.demo_data import COLORS, SHAPES

    anns = [{"image": f"{i}.png", "caption": c, "image_id": i} for i, c in enumerate(
        ["a small red circle on the left", "there is a large blue square at the top",
         "a small green triangle on the left and a large red circle on the right"] * 20)]
    noisy, flags = corrupt_captions(anns, 0.4, seed=3)
    assert sum(flags) == 24 and len(noisy) == 60
    for a, b, f in zip(anns, noisy, flags):
        diff = [(x, y) for x, y in zip(a["caption"].split(), b["caption"].split()) if x != y]
        assert len(diff) == (1 if f else 0)
        if f:
            old, new = diff[0]
            vocab = COLORS if old in COLORS else SHAPES
            assert new in vocab and new not in a["caption"].split()
        assert {k: v for k, v in b.items() if k != "caption"} == {k: v for k, v in a.items()
                                                                 if k != "caption"}
    assert corrupt_captions(anns, 0.4, seed=3) == (noisy, flags)  # seeded


def test_filter_quality_counts_web_captions_removed_and_kept():
    from lavis_plugins.demo_capfilt import filter_quality

    merged = [{"image": "0.png", "capfilt": {"kept": [1, 2], "candidates": [
        {"caption": "bad", "source": "web"}, {"caption": "good", "source": "web"},
        {"caption": "syn", "source": "synthetic"}]}},
              {"image": "1.png", "capfilt": {"kept": [0], "candidates": [
                  {"caption": "bad2", "source": "web"}, {"caption": "good2", "source": "web"}]}}]
    truth = {("0.png", "bad"): True, ("0.png", "good"): False, ("1.png", "bad2"): True,
             ("1.png", "good2"): False}
    q = filter_quality(merged, truth)
    assert q["corrupted_removed"] == 50 and q["correct_kept"] == 50
    assert q["kept_synthetic"] == pytest.approx(100 / 3)
    merged[0]["capfilt"]["candidates"][2]["caption"] = "a large red circle"
    assert filter_quality(merged, truth, {"0.png": "a small red circle on the left"}
                          )["synthetic_right"] == 100
    assert filter_quality(merged, truth, {"0.png": "a small blue circle on the left"}
                          )["synthetic_right"] == 0
    assert q["corrupted_web"] == 2 and q["correct_web"] == 2


def test_demo_yaml_takes_the_options_the_demo_adds(lp, tmp_path):
    from lavis_plugins import cli
    from lavis_plugins.paths import resource_dir

    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": "a.png", "caption": "x"}]))
    opts = [f"model.bert_path={tmp_path}", f"model.finetuned={tmp_path / 'c.pth'}",
            f"datasets.lp_capfilt_input.build_info.annotations={ann}",
            f"datasets.lp_capfilt_input.build_info.images.storage={tmp_path}",
            f"run.output_dir={tmp_path}", f"run.capfilt.output={tmp_path / 'o'}",
            f"run.capfilt.shards={tmp_path / 's'}", "run.capfilt.shard_size=500"]
    cfg = cli.load_config(str(resource_dir("projects") / "capfilt" / "demo.yaml"), opts)
    from lavis_plugins.capfilt.config import CapFiltConfig

    c = CapFiltConfig.from_mapping(cfg.run_cfg.capfilt)
    assert (c.top_k, c.rank_by, c.shard_size, c.itm_threshold) == (1, "itc", 500, None)


def test_report_tables():
    from lavis_plugins.demo_capfilt import format_tables

    m = {"img_r1": 40.0, "txt_r1": 45.0, "itc_img_r1": 38.0, "itc_txt_r1": 44.0, "itm_acc": 80.0}
    text = format_tables({"fraction": 0.4, "filter": {
        "corrupted_removed": 90.0, "correct_kept": 80.0, "kept_synthetic": 30.0,
        "corrupted_web": 1600, "correct_web": 2400}, "retrieval": {"noisy": m, "capfilt": m}})
    assert "| corrupted web captions removed (of 1600) | 90.0 |" in text
    assert "| CapFilt output | 40.00 | 45.00 | 38.00 | 44.00 | 80.0 |" in text
