"""The shapes dataset's stage-1 shard set (lavis_plugins/demo_shards.py): built once with
make-shards beside the images, one sample per caption annotation, reused while current, rebuilt
when missing, damaged or stale; the demo's stage 1 reads it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lavis_plugins import demo_data, demo_shards
from lavis_plugins.demo_data import ShapesSize, ensure_shapes_dataset

SMALL = ShapesSize(train_images=24, val_images=8, test_images=8, val_videos=3, test_videos=4)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data_home") / demo_data.DEFAULT_FOLDER
    return ensure_shapes_dataset(root, size=SMALL)


def _index(root: Path) -> dict:
    return json.loads((demo_shards.shards_folder(root) / "shards.json").read_text())


def _mtimes(root: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in demo_shards.shards_folder(root).iterdir()}


def test_dataset_ships_a_shard_set_with_every_caption_annotation(lp, small_root):
    from lavis_plugins.datasets.shard_plan import expand_shard_spec, load_shard_set
    from lavis_plugins.datasets.webdataset_caption import read_segments, sample_captions
    from lavis_plugins.datasets.shard_plan import Segment

    anns = json.loads((small_root / demo_shards.SOURCE).read_text())
    index = _index(small_root)
    assert index["samples"] == len(anns) and index["shard_size"] == demo_shards.SHARD_SIZE
    assert demo_shards.shard_set_problems(small_root) == []
    shards = load_shard_set(expand_shard_spec(str(demo_shards.shards_folder(small_root)), "t"), "t")
    raws = list(read_segments(shards, [Segment(i, 0, n) for i, n in enumerate(shards.sizes)]))
    assert [sample_captions(r.files, "caption") for r in raws] == [[a["caption"]] for a in anns]
    first = anns[0]["image"]
    assert raws[0].files["png"] == (small_root / "images" / first).read_bytes()


def test_a_current_shard_set_is_reused(lp, small_root):
    before = _mtimes(small_root)
    assert ensure_shapes_dataset(small_root) == small_root
    assert _mtimes(small_root) == before


@pytest.mark.parametrize("damage, expect", [
    ("delete_index", "shards.json is missing"),
    ("delete_shard", "train-000000.tar is missing"),
    ("truncate_shard", "train-000000.tar is damaged"),
    ("other_source", "stale: made from another annotations/caption_train.json"),
    ("other_shard_size", "stale: 7 samples per shard"),
])
def test_a_missing_damaged_or_stale_shard_set_is_rebuilt(lp, small_root, tmp_path, damage, expect):
    root = tmp_path / demo_data.DEFAULT_FOLDER
    shutil.copytree(small_root, root)
    folder = demo_shards.shards_folder(root)
    good = _index(root)
    index = dict(good)
    if damage == "delete_index":
        (folder / "shards.json").unlink()
    elif damage == "delete_shard":
        (folder / "train-000000.tar").unlink()
    elif damage == "truncate_shard":
        data = (folder / "train-000000.tar").read_bytes()
        (folder / "train-000000.tar").write_bytes(data[: len(data) // 2])
    else:
        if damage == "other_source":
            index["source_sha256"] = "0" * 64
        else:
            index["shard_size"] = 7
        (folder / "shards.json").write_text(json.dumps(index))
    problems = demo_shards.shard_set_problems(root)
    assert any(expect in p for p in problems), problems
    assert ensure_shapes_dataset(root) == root
    assert demo_shards.shard_set_problems(root) == []
    rebuilt = _index(root)
    assert [(e["file"], e["bytes"]) for e in rebuilt["shards"]] == \
        [(e["file"], e["bytes"]) for e in good["shards"]]  # the same bytes again
    assert not (root / "shards.tmp").exists()


def test_a_regenerated_dataset_gets_a_new_shard_set(lp, small_root, tmp_path):
    root = tmp_path / demo_data.DEFAULT_FOLDER
    shutil.copytree(small_root, root)
    other = ShapesSize(train_images=12, val_images=8, test_images=8, val_videos=3, test_videos=4)
    ensure_shapes_dataset(root, size=other)
    anns = json.loads((root / demo_shards.SOURCE).read_text())
    assert _index(root)["samples"] == len(anns) < _index(small_root)["samples"]


def test_demo_stage1_reads_the_datasets_shard_set(lp, tmp_path):
    from lavis_plugins import demo

    ctx = demo.DemoContext(out=tmp_path, data_root=Path("/data/shapes_v1"),
                           bert_dir=tmp_path / "bert", llm_dir=tmp_path / "llm")
    assert ("datasets.lp_webdataset_caption.build_info.shards=/data/shapes_v1/shards"
            in demo.stage_options("stage1", ctx))
    text = demo.demo_yaml("stage1.yaml").read_text()
    assert "shards: data/shapes/shards" in text and "lp_webdataset_caption" in text
