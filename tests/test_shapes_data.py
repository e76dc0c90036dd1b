"""The built-in shapes dataset: deterministic generation, LAVIS formats, damage detection,
builders."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from lavis_plugins import demo_data
from lavis_plugins.common.errors import UserError
from lavis_plugins.demo_data import ShapesSize, ensure_shapes_dataset, verify_shapes_dataset

SMALL = ShapesSize(train_images=24, val_images=8, test_images=8, val_videos=3, test_videos=4)
BUILDERS = ("lp_shapes_caption", "lp_shapes_retrieval", "lp_shapes_vqa", "lp_shapes_video_qa")


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    """A small dataset at <data home>/shapes_v1, generated once for the read-only tests."""
    root = tmp_path_factory.mktemp("data_home") / demo_data.DEFAULT_FOLDER
    return ensure_shapes_dataset(root, size=SMALL)


@pytest.fixture
def data_home(small_root, monkeypatch) -> Path:
    """Point the default cache ($LAVIS_PLUGINS_DATA) at the small dataset, for the builders."""
    monkeypatch.setenv(demo_data.ENV_VAR, str(small_root.parent))
    assert demo_data.default_root() == small_root
    return small_root.parent


def load(root: Path, rel: str):
    return json.loads((root / "annotations" / rel).read_text())


def manifest(root: Path) -> dict:
    return json.loads((root / demo_data.MANIFEST).read_text())


# ------------------------------------------------------------------------------ generation


def test_generation_is_deterministic(small_root, tmp_path):
    again = demo_data.generate_shapes_dataset(tmp_path / "again", SMALL, seed=0)
    assert again == manifest(small_root)  # same bytes (SHA-256) for every PNG, MP4 and JSON
    other = demo_data.generate_shapes_dataset(tmp_path / "other", SMALL, seed=1)
    assert other["files"] != again["files"]


def test_counts_and_splits(small_root):
    m = manifest(small_root)
    assert m["seed"] == 0 and m["size"] == dataclasses.asdict(SMALL)
    pngs = {s: len(list((small_root / "images" / s).glob("*.png"))) for s in demo_data.SPLITS}
    assert pngs == {"train": 24, "val": 8, "test": 8}
    assert len(list((small_root / "videos" / "val").glob("*.mp4"))) == 3
    assert len(list((small_root / "videos" / "test").glob("*.mp4"))) == 4
    assert len(load(small_root, "caption_train.json")) == 24 * SMALL.train_captions_per_image
    for split in ("val", "test"):
        evals = load(small_root, f"caption_{split}.json")
        assert len(evals) == 8 and all(len(a["caption"]) == 4 for a in evals)
        # eval scenes are unique in their split, so each caption identifies one image
        assert len({a["caption"][0] for a in evals}) == 8
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        vqa = load(small_root, f"vqa_{split}.json")
        assert len(vqa) == n * SMALL.questions_per_image
        per_image = {}
        for q in vqa:
            per_image.setdefault(q["image_id"], []).append(q["question_type"])
        assert all(len(set(t)) == len(t) for t in per_image.values())  # distinct types per image
    assert len(load(small_root, "videoqa_val.json")) == 3 * SMALL.questions_per_video
    assert len(load(small_root, "videoqa_test.json")) == 4 * SMALL.questions_per_video
    assert {q["question_type"] for q in load(small_root, "videoqa_test.json")} <= set(
        demo_data.VIDEO_QUESTION_TYPES)  # never "position": video shapes move
    ids = [q["question_id"] for s in demo_data.SPLITS for q in load(small_root, f"vqa_{s}.json")]
    ids += [q["question_id"] for s in ("val", "test")
            for q in load(small_root, f"videoqa_{s}.json")]
    assert len(ids) == len(set(ids))


def test_every_annotation_points_at_an_existing_file(small_root):
    for rel in sorted(p.name for p in (small_root / "annotations").iterdir()):
        data = load(small_root, rel)
        if not isinstance(data, list) or not data or not isinstance(data[0], dict):
            continue
        key, folder = ("video", "videos") if rel.startswith("videoqa") else ("image", "images")
        for ann in data:
            assert (small_root / folder / ann[key]).is_file(), (rel, ann[key])
    listed = set(manifest(small_root)["files"])
    on_disk = {p.relative_to(small_root).as_posix() for p in small_root.rglob("*") if p.is_file()}
    # the stage-1 shard set (demo_shards) has its own index, shards/shards.json
    shards = {f"shards/{e['file']}" for e in load(small_root, "../shards/shards.json")["shards"]}
    assert on_disk - listed == {demo_data.MANIFEST, demo_data.MARKER, "shards/shards.json"} | shards


def test_vocabulary_covers_every_text(small_root):
    vocab, answers = set(demo_data.shapes_vocabulary()), set(demo_data.answer_list())
    assert answers == set(load(small_root, "answer_list.json"))
    texts, used_answers = [], set()
    texts += [a["caption"] for a in load(small_root, "caption_train.json")]
    for s in ("val", "test"):
        texts += [c for a in load(small_root, f"caption_{s}.json") for c in a["caption"]]
        for q in load(small_root, f"videoqa_{s}.json"):
            texts.append(q["question"])
            used_answers.add(q["answer"])
    for s in demo_data.SPLITS:
        for q in load(small_root, f"vqa_{s}.json"):
            texts.append(q["question"])
            used_answers.update(q["answer"])
    words = {w for t in texts for w in re.findall(r"[a-z0-9]+", t)}
    assert words <= vocab, words - vocab
    assert used_answers <= answers and all(" " not in a for a in used_answers)


def test_video_is_h264_and_shows_its_shapes_in_every_frame(tmp_path):
    import av
    import numpy as np

    scene = (demo_data.Shape("circle", "red", "large"), demo_data.Shape("square", "blue", "small"))
    path = tmp_path / "clip.mp4"
    demo_data._write_video(path, scene, [(12, 12, 50, 16), (50, 50, 10, 46)])
    with av.open(str(path)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        frames = [f.to_ndarray(format="rgb24").astype(int) for f in c.decode(video=0)]
    assert len(frames) == demo_data.VIDEO_FRAMES
    assert frames[0].shape == (demo_data.IMAGE_SIZE, demo_data.IMAGE_SIZE, 3)
    for frame in frames:
        for shape in scene:
            close = np.abs(frame - np.array(demo_data.COLORS[shape.color])).sum(-1) < 60
            r = demo_data.SIZES[shape.size]
            assert close.sum() > r * r, (shape, close.sum())  # visible, never hidden
    assert not np.array_equal(frames[0], frames[-1])  # the shapes move


def test_lavis_video_loader_reads_the_videos(small_root):
    # LAVIS's own decord-based loader (the path its video processors use)
    from lavis.datasets.data_utils import load_video

    clip = load_video(str(next((small_root / "videos" / "test").glob("*.mp4"))), n_frms=4)
    assert tuple(clip.shape) == (3, 4, demo_data.IMAGE_SIZE, demo_data.IMAGE_SIZE)


# ------------------------------------------------------------------- damage and regeneration


def copy_of(small_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "shapes_v1"
    shutil.copytree(small_root, root)
    return root


@pytest.mark.parametrize("damage",
                         ["delete_png", "truncate_manifest", "flip_byte", "delete_manifest"])
def test_damaged_folder_is_detected_and_regenerated(small_root, tmp_path, damage):
    root = copy_of(small_root, tmp_path)
    png = next((root / "images" / "val").glob("*.png"))
    if damage == "delete_png":
        png.unlink()
    elif damage == "truncate_manifest":
        text = (root / demo_data.MANIFEST).read_text()
        (root / demo_data.MANIFEST).write_text(text[: len(text) // 2])
    elif damage == "flip_byte":
        data = bytearray(png.read_bytes())
        data[len(data) // 2] ^= 0xFF
        png.write_bytes(bytes(data))
    else:
        (root / demo_data.MANIFEST).unlink()
    problems = verify_shapes_dataset(root)
    assert problems, damage
    assert ensure_shapes_dataset(root, size=SMALL) == root
    assert verify_shapes_dataset(root, size=SMALL, seed=0) == []
    assert manifest(root) == manifest(small_root)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".shapes_v1.")]
    assert leftovers == [".shapes_v1.lock"]  # no temp or trash folder is left behind


def test_complete_folder_is_used_as_is(small_root):
    before = (small_root / demo_data.MANIFEST).stat().st_mtime_ns
    assert ensure_shapes_dataset(small_root) == small_root  # size=None accepts any complete copy
    assert ensure_shapes_dataset(small_root, size=SMALL) == small_root
    assert (small_root / demo_data.MANIFEST).stat().st_mtime_ns == before


def test_folder_not_made_by_the_generator_is_never_replaced(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not empty and was not made by"):
        ensure_shapes_dataset(tmp_path / "mine", size=SMALL)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(demo_data.ENV_VAR, str(tmp_path))
    assert demo_data.default_root() == tmp_path / "shapes_v1"
    monkeypatch.delenv(demo_data.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert demo_data.default_root() == tmp_path / "cache" / "lavis_plugins" / "shapes_v1"


def test_impossible_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="questions_per_video"):
        demo_data.generate_shapes_dataset(tmp_path / "x", ShapesSize(questions_per_video=9))


# ------------------------------------------------------------------------------- builders


def builder(name: str, **overrides):
    """A registered builder on its shipped default YAML, with dotted-key overrides."""
    from lavis.common.registry import registry

    cls = registry.get_builder_class(name)
    cfg = OmegaConf.load(cls.default_config_path()).datasets[name]
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cls(cfg)


def first_batch(dataset, batch_size=4):
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collater)
    return next(iter(loader))


def test_builders_are_registered_with_shipped_yamls(lp):
    from lavis.common.config import Config
    from lavis.common.registry import registry

    for name in BUILDERS:
        cls = registry.get_builder_class(name)
        assert cls is not None and os.path.isfile(cls.default_config_path()), name
        # LAVIS's own merge of the default YAML with a run config's dataset section
        merged = Config.build_dataset_config(OmegaConf.create({"datasets": {name: {}}}))
        assert merged.datasets[name].build_info.root == "default"


def test_caption_builder(lp, data_home):
    ds = builder("lp_shapes_caption").build_datasets()
    assert set(ds) == {"train", "val", "test"} and len(ds["train"]) == 48 and len(ds["test"]) == 8
    batch = first_batch(ds["train"])
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert len(batch["text_input"]) == 4 and batch["image_id"].shape == (4,)
    batch = first_batch(ds["val"])
    assert set(batch) == {"image", "image_id", "instance_id"}
    # image ids are those of the COCO ground truth that scores the captions
    gt = json.loads(Path(ds["val"].coco_gt_file).read_text())
    assert set(batch["image_id"].tolist()) <= {im["id"] for im in gt["images"]}
    from pycocotools.coco import COCO

    coco = COCO(ds["test"].coco_gt_file)
    results = [{"image_id": a["image_id"], "caption": a["caption"][0]}
               for a in ds["test"].annotation]
    res = coco.loadRes(results)
    assert len(res.getImgIds()) == 8 and all(len(coco.imgToAnns[i]) == 4 for i in coco.getImgIds())


def test_retrieval_builder(lp, data_home):
    ds = builder("lp_shapes_retrieval").build_datasets()
    test = ds["test"]
    assert len(test.text) == 8 * 4 and len(test.image) == 8
    assert all(test.txt2img[t] == i for i, ts in test.img2txt.items() for t in ts)
    batch = first_batch(test)
    assert batch["image"].shape == (4, 3, 64, 64) and batch["index"].tolist() == [0, 1, 2, 3]
    assert set(first_batch(ds["train"])) == {"image", "text_input", "image_id", "instance_id"}


def test_vqa_builder_batches_and_lavis_semantics(lp, data_home):
    from lavis.datasets.datasets.coco_vqa_datasets import COCOVQADataset

    ds = builder("lp_shapes_vqa").build_datasets()
    train = ds["train"]
    assert len(train) == 24 * 3 and train.answer_list == demo_data.answer_list()
    batch = first_batch(train)
    assert batch["image"].shape == (4, 3, 64, 64)
    assert len(batch["text_input"]) == 4 and len(batch["answer"]) == 4
    assert batch["weight"].tolist() == [1.0] * 4 and batch["n_answers"].tolist() == [1] * 4
    assert batch["question_id"].dtype == torch.int64 and len(batch["question_type"]) == 4
    # the same items as LAVIS's own VQA dataset on the same files
    ref = COCOVQADataset(train.vis_processor, train.text_processor, train.vis_root,
                         [str(data_home / "shapes_v1" / "annotations" / "vqa_train.json")])
    for i in (0, 5):
        ours, theirs = train[i], ref[i]
        assert torch.equal(ours["image"], theirs["image"])
        assert {k: ours[k] for k in ("text_input", "answers", "weights")} == {
            k: theirs[k] for k in ("text_input", "answers", "weights")}


def test_vqa_official_files_score_with_lavis_vqa_eval(lp, data_home, tmp_path):
    from lavis.common.vqa_tools.vqa import VQA
    from lavis.common.vqa_tools.vqa_eval import VQAEval

    test = builder("lp_shapes_vqa").build_datasets()["test"]
    assert test.coco_fmt_qust_file.endswith("vqa_test_questions.json")
    vqa = VQA(test.coco_fmt_anno_file, test.coco_fmt_qust_file)
    for wrong, expected in ((False, 100.0), (True, 0.0)):
        results = [{"question_id": a["question_id"],
                    "answer": "nothing" if wrong else a["answer"][0]}
                   for a in test.annotation]
        (tmp_path / "results.json").write_text(json.dumps(results))  # as LAVIS's VQATask saves
        scorer = VQAEval(vqa, vqa.loadRes(str(tmp_path / "results.json"),
                                          test.coco_fmt_qust_file), n=2)
        scorer.evaluate()
        assert scorer.accuracy["overall"] == expected


def test_video_qa_builder_with_lavis_video_processor(lp, data_home):
    b = builder("lp_shapes_video_qa",
                **{"vis_processor.eval": {"name": "alpro_video_eval", "n_frms": 4,
                                          "image_size": 64}})
    ds = b.build_datasets()
    assert set(ds) == {"val", "test"} and len(ds["test"]) == 8
    assert ds["test"].answer_list == demo_data.answer_list()
    batch = first_batch(ds["test"])
    assert batch["video"].shape == (4, 3, 4, 64, 64) and batch["video"].dtype == torch.float32
    assert set(batch) == {"video", "text_input", "answer", "question_id", "question_type",
                          "instance_id"}
    assert all(a in demo_data.answer_list() for a in batch["answer"])


def test_video_qa_builder_with_default_processor(lp, data_home):
    from lavis.common.registry import registry

    if registry.get_processor_class("lp_video_eval") is None:
        pytest.skip("lp_video_eval (lavis_plugins/processors/video_processors.py) not registered")
    batch = first_batch(builder("lp_shapes_video_qa").build_datasets()["test"])
    assert batch["video"].shape[:3] == (4, 3, 4) and batch["video"].shape[-2:] == (64, 64)


def test_missing_user_folder_is_reported_with_the_fix(lp, tmp_path):
    b = builder("lp_shapes_vqa", **{"build_info.root": str(tmp_path / "nowhere")})
    with pytest.raises(UserError, match=r"nowhere.*python -m lavis_plugins.demo_data --root"):
        b.build_datasets()


def test_damaged_user_folder_is_reported_not_regenerated(lp, small_root, tmp_path):
    root = copy_of(small_root, tmp_path)
    next((root / "videos" / "test").glob("*.mp4")).unlink()
    b = builder("lp_shapes_caption", **{"build_info.root": str(root)})
    with pytest.raises(UserError, match="missing"):
        b.build_datasets()
    assert verify_shapes_dataset(root)  # left as it was: a user folder is the user's


def test_default_folder_is_generated_on_first_use(lp, tmp_path, monkeypatch):
    monkeypatch.setenv(demo_data.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(demo_data, "DEFAULT_SIZE", SMALL)  # keep the test small
    ds = builder("lp_shapes_caption").build_datasets()
    assert verify_shapes_dataset(tmp_path / "shapes_v1", size=SMALL) == []
    assert len(ds["train"]) == 48


def test_paths_escaping_the_dataset_are_refused(lp, data_home):
    b = builder("lp_shapes_caption", **{"build_info.annotations.train.storage": "../x.json"})
    with pytest.raises(UserError, match="escapes the dataset folder"):
        b.build_datasets()
    b = builder("lp_shapes_caption", **{"build_info.images.storage": "/etc"})
    with pytest.raises(UserError, match="escapes the dataset folder"):
        b.build_datasets()


def test_unknown_processor_is_a_user_error(lp, data_home):
    b = builder("lp_shapes_vqa", **{"vis_processor.train.name": "blip_imag_train"})
    with pytest.raises(UserError, match="Did you mean: blip_image_train"):
        b.build_datasets()


@pytest.mark.slow
def test_default_size_is_identical_across_processes(tmp_path):
    """Full-size generation in two fresh interpreters (the cache case) gives the same bytes."""
    import subprocess
    import sys

    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "lavis_plugins.demo_data", "--root",
                        str(tmp_path / name)], check=True, capture_output=True)
    assert manifest(tmp_path / "a") == manifest(tmp_path / "b")
    assert manifest(tmp_path / "a")["size"] == dataclasses.asdict(demo_data.DEFAULT_SIZE)
