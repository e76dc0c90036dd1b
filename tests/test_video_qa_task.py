"""Video QA / retrieval datasets and builders, the lp_video_qa task (both scoring protocols), the
bad-video policy, distributed merging, and a tiny zero-shot evaluation through the CLI."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List

import pytest
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from lavis_plugins.common.errors import UserError

SIZE = 32  # frame side of the test videos
N_FRAMES = 6  # frames per test video


def write_video(path: Path, colors: List[tuple], size: int = SIZE) -> Path:
    """An H.264 MP4 whose frame i is filled with ``colors[i]`` (RGB)."""
    import av
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8, options={"crf": "10", "g": "4",
                                                                  "threads": "1"})
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for c in colors:
            frame = np.empty((size, size, 3), dtype=np.uint8)
            frame[:] = c
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


RED, BLUE = (220, 30, 30), (30, 30, 220)

QA = [  # question_id, video, question, answer, question_type
    (1, "a/red.mp4", "what color is it?", "red", "color"),
    (2, "a/blue.mp4", "what color is it?", "blue", "color"),
    (3, "a/red.mp4", "how many shapes?", "two", "count"),
    (4, "b/blue.mp4", "is it moving?", "yes", "exist"),
]


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    """videos/ with good clips, a corrupt file and an audio-less text file named .mp4."""
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "a" / "red.mp4", [RED] * N_FRAMES)
    write_video(root / "a" / "blue.mp4", [BLUE] * N_FRAMES)
    write_video(root / "b" / "blue.mp4", [BLUE] * (N_FRAMES - 2) + [RED] * 2)
    good = (root / "a" / "red.mp4").read_bytes()
    (root / "bad").mkdir()
    (root / "bad" / "truncated.mp4").write_bytes(good[: len(good) // 5])
    (root / "bad" / "text.mp4").write_text("not a video at all")
    return root


def qa_records(rows=QA):
    return [{"question_id": q, "video": v, "question": qu, "answer": a, "question_type": t}
            for q, v, qu, a, t in rows]


def builder_cfg(name: str, video_root: Path, anns: dict, **extra):
    """A dataset config as the runner hands it to a builder (default YAML merged with ours)."""
    from lavis.common.registry import registry

    cls = registry.get_builder_class(name)
    base = OmegaConf.load(cls.default_config_path()).datasets[name]
    ours = {
        "build_info": {"annotations": {k: {"storage": str(v)} for k, v in anns.items()},
                       "videos": {"storage": str(video_root)}},
        "vis_processor": {"train": {"name": "lp_video_train", "n_frms": 2, "image_size": SIZE},
                          "eval": {"name": "lp_video_eval", "n_frms": 2, "image_size": SIZE}},
    }
    cfg = OmegaConf.merge(base, OmegaConf.create(ours), OmegaConf.create(extra))
    if "annotations" in cfg.build_info:  # drop the default splits we did not give
        for split in list(cfg.build_info.annotations):
            if split not in anns:
                del cfg.build_info.annotations[split]
    return cls(cfg)


# ------------------------------------------------------------------------------ datasets


def test_builder_reads_yaml_paths_and_answer_list(lp, video_root, tmp_path):
    train = write_json(tmp_path / "train.json", qa_records()[:2] + [
        {"question_id": 9, "video": "a/red.mp4", "question": "q", "answer": "red"}])
    test = write_json(tmp_path / "test.json", qa_records()[2:])
    ds = builder_cfg("lp_msrvtt_qa", video_root, {"train": train, "test": test}).build_datasets()
    assert set(ds) == {"train", "test"} and len(ds["test"]) == 2
    # built from train + test answers, most frequent first, then alphabetical
    assert ds["test"].answer_list == ["red", "blue", "two", "yes"]
    assert ds["train"].answer_list == ds["test"].answer_list
    batch = ds["test"].collater([ds["test"][0], ds["test"][1]])
    assert batch["video"].shape == (2, 3, 2, SIZE, SIZE)
    assert batch["question_id"] == [3, 4] and batch["answer"] == ["two", "yes"]
    assert batch["question_type"] == ["count", "exist"] and batch["skipped"] == []
    assert batch["text_input"] == ["how many shapes?", "is it moving?"]  # blip_question


def test_answer_list_file_takes_precedence(lp, video_root, tmp_path):
    test = write_json(tmp_path / "test.json", qa_records())
    ans2label = write_json(tmp_path / "ans2label.json", {"yes": 1, "no": 0, "red": 2})
    b = builder_cfg("lp_msvd_qa", video_root, {"test": test, "answer_list": ans2label})
    assert b.build_datasets()["test"].answer_list == ["no", "yes", "red"]  # by label


@pytest.mark.parametrize("bad", ["../outside.mp4", "a/../../outside.mp4", "/etc/passwd"])
def test_video_paths_escaping_the_root_are_refused(lp, video_root, tmp_path, bad):
    rows = qa_records()
    rows[1]["video"] = bad
    test = write_json(tmp_path / "test.json", rows)
    with pytest.raises(UserError, match=r"test\.json: record 1.*(escapes|absolute)"):
        builder_cfg("lp_msrvtt_qa", video_root, {"test": test}).build_datasets()


def test_missing_files_and_bad_records_name_the_key(lp, video_root, tmp_path):
    with pytest.raises(UserError, match=r"lp_msrvtt_qa\.build_info\.annotations\.test.*not found"):
        builder_cfg("lp_msrvtt_qa", video_root, {"test": tmp_path / "none.json"}).build_datasets()
    test = write_json(tmp_path / "t.json", [{"video": "a/red.mp4", "question": "q"}])
    with pytest.raises(UserError, match=r"record 0 lacks \['answer'\]"):
        builder_cfg("lp_msrvtt_qa", video_root, {"test": test}).build_datasets()
    dup = write_json(tmp_path / "dup.json", qa_records()[:1] * 2)
    with pytest.raises(UserError, match="question_id '1' appears twice"):
        builder_cfg("lp_msrvtt_qa", video_root, {"test": dup}).build_datasets()
    test = write_json(tmp_path / "ok.json", qa_records())
    with pytest.raises(UserError, match="on_bad_video"):
        builder_cfg("lp_msrvtt_qa", video_root, {"test": test}, on_bad_video="ignore").build()


def _bad_video_set(video_root, tmp_path, policy):
    rows = qa_records() + [
        {"question_id": 5, "video": "bad/truncated.mp4", "question": "q", "answer": "red"},
        {"question_id": 6, "video": "bad/text.mp4", "question": "q", "answer": "red"},
        {"question_id": 7, "video": "bad/missing.mp4", "question": "q", "answer": "red"},
    ]
    test = write_json(tmp_path / "test.json", rows)
    return builder_cfg("lp_msrvtt_qa", video_root, {"test": test},
                       on_bad_video=policy).build_datasets()["test"]


def test_fail_policy_stops_at_the_bad_video_naming_it(lp, video_root, tmp_path):
    from lavis_plugins.video.decode import VideoDecodeError

    ds = _bad_video_set(video_root, tmp_path, "fail")
    ds[0]  # good videos decode
    with pytest.raises(VideoDecodeError, match="missing.mp4"):
        ds[6]


def test_skip_policy_collates_skip_records(lp, video_root, tmp_path):
    ds = _bad_video_set(video_root, tmp_path, "skip")
    batch = ds.collater([ds[i] for i in (0, 4, 5, 6)])
    assert batch["video"].shape[0] == 1 and batch["question_id"] == [1]
    assert [s["key"] for s in batch["skipped"]] == [5, 6, 7]
    assert batch["skipped"][2]["kind"] == "missing"
    assert all(s["video"].startswith(str(video_root)) for s in batch["skipped"])
    only_bad = ds.collater([ds[5]])
    assert "video" not in only_bad and len(only_bad["skipped"]) == 1


def test_retrieval_builder_layout(lp, video_root, tmp_path):
    test = write_json(tmp_path / "ret.json", [
        {"video": "a/red.mp4", "caption": ["a red screen", "red"]},
        {"video": "a/blue.mp4", "caption": ["a blue screen"]}])
    ds = builder_cfg("lp_msrvtt_retrieval", video_root, {"test": test}).build_datasets()["test"]
    assert ds.text == ["a red screen", "red", "a blue screen"]
    assert ds.txt2img == {0: 0, 1: 0, 2: 1} and ds.img2txt == {0: [0, 1], 1: [2]}
    sample = ds[1]
    assert sample["index"] == 1 and sample["video"].shape == (3, 2, SIZE, SIZE)


# ------------------------------------------------------------------------------ scoring


@pytest.fixture
def result_dirs(tmp_path, monkeypatch):
    from lavis.common.registry import registry

    out = tmp_path / "out"
    (out / "result").mkdir(parents=True)
    monkeypatch.setitem(registry.mapping["paths"], "output_dir", str(out))
    monkeypatch.setitem(registry.mapping["paths"], "result_dir", str(out / "result"))
    return out


def _answered(qid, answer, qtype, gen, rank, question="q"):
    return {"question_id": qid, "question": question, "question_type": qtype, "answer": answer,
            "predictions": {"generate": gen, "rank": rank}}


HAND_MADE = [
    # generate: normalisation makes "Two." == "two" == "2"; "a red" == "red" (article)
    _answered(1, "red", "color", "A red.", "red"),
    _answered(2, "blue", "color", "green", "blue"),
    _answered(3, "2", "count", "Two.", "3"),
    _answered(4, "yes", "exist", "no", "no"),
    _answered(5, "dog", None, "dog", "dogs"),
]


def test_both_protocols_and_per_type_accuracy(lp, result_dirs):
    from lavis_plugins.tasks.video_qa import VideoQATask

    task = VideoQATask()
    m = task.score(HAND_MADE, [], "test")
    assert m["generate"]["accuracy"] == 60.0 and m["generate"]["num_correct"] == 3
    assert m["rank"]["accuracy"] == 40.0
    assert m["generate"]["per_question_type"] == {"color": 50.0, "count": 100.0, "exist": 0.0,
                                                  "unknown": 100.0}
    assert m["rank"]["per_question_type"] == {"color": 100.0, "count": 0.0, "exist": 0.0,
                                              "unknown": 0.0}
    assert m["agg_metrics"] == 60.0 and m["num_questions"] == 5 and m["num_skipped"] == 0
    rows = json.loads((result_dirs / "result" / "test_video_qa_generate.json").read_text())
    assert rows[2] == {"question_id": 3, "question": "q", "question_type": "count",
                       "prediction": "Two.", "answer": "2", "correct": True}
    rank_rows = json.loads((result_dirs / "result" / "test_video_qa_rank.json").read_text())
    assert [r["correct"] for r in rank_rows] == [True, True, False, False, False]
    assert not (result_dirs / "result" / "test_video_qa_skipped.json").exists()


def test_list_answers_match_any(lp):
    from lavis_plugins.tasks.video_qa import is_correct

    assert is_correct("The cat", ["dog", "cat"]) and not is_correct("cow", ["dog", "cat"])


def test_protocol_choice_and_agg(lp, result_dirs):
    from lavis_plugins.tasks.video_qa import VideoQATask, VideoQATaskConfig

    cfg = VideoQATaskConfig.from_run_cfg(OmegaConf.create({"protocols": ["rank"]}))
    m = VideoQATask(cfg).score(HAND_MADE, [], "val")
    assert "generate" not in m and m["agg_metrics"] == 40.0
    assert not (result_dirs / "result" / "val_video_qa_generate.json").exists()
    with pytest.raises(UserError, match="run.protocols"):
        VideoQATaskConfig.from_run_cfg(OmegaConf.create({"protocols": ["vote"]}))


def test_distributed_merge_has_no_duplicates_or_losses(lp):
    from lavis_plugins.runners.runner import EpochSampler
    from lavis_plugins.tasks.video_qa import merge_results

    records = HAND_MADE + [{"question_id": 6, "skipped": True, "kind": "missing", "reason": "x",
                            "video": "v"}]
    world = 4
    shards = [[records[i] for i in EpochSampler(len(records), False, 0, r, world, False)]
              for r in range(world)]
    answered, skipped, dup = merge_results(shards)
    assert sorted(r["question_id"] for r in answered) == [1, 2, 3, 4, 5] and dup == 0
    assert [r["question_id"] for r in skipped] == [6]
    # a padding sampler repeats samples: they are dropped, and a skip of an answered id too
    answered, skipped, dup = merge_results(shards + [[HAND_MADE[0], dict(records[5],
                                                                         question_id=2)]])
    assert len(answered) == 5 and dup == 1 and [r["question_id"] for r in skipped] == [6]


def _merge_worker(rank: int, world: int, port: int, out: str, shards) -> None:
    """One process of a gloo group: after_evaluation on its shard (rank 0 writes the files)."""
    import torch.distributed as torch_dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from lavis.common.registry import registry

        from lavis_plugins.tasks.video_qa import VideoQATask

        registry.mapping["paths"]["output_dir"] = out
        registry.mapping["paths"]["result_dir"] = os.path.join(out, "result")
        task = VideoQATask()
        task._expected_ids = [str(q) for q in range(1, 8)]
        metrics = task.after_evaluation(shards[rank], "test")
        if rank == 0:
            Path(out, "metrics.json").write_text(json.dumps(metrics))
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_evaluation_merges_every_result_once(lp, tmp_path):
    """A real 2-process gloo group: shards rank::2 merge into one set, one missing id reported."""
    import socket

    import torch.multiprocessing as mp

    records = HAND_MADE + [{"question_id": 6, "skipped": True, "kind": "missing", "reason": "x",
                            "video": "v"}]  # question 7 is in no shard: missing
    shards = [records[0::2], records[1::2]]
    (tmp_path / "result").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_merge_worker, args=(2, port, str(tmp_path), shards), nprocs=2, join=True)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["num_questions"] == 5 and m["num_skipped"] == 1 and m["num_missing"] == 1
    assert m["generate"]["accuracy"] == 60.0 and m["rank"]["accuracy"] == 40.0
    rows = json.loads((tmp_path / "result" / "test_video_qa_generate.json").read_text())
    assert sorted(r["question_id"] for r in rows) == [1, 2, 3, 4, 5]


def test_skipped_videos_are_counted_and_reported(lp, video_root, tmp_path, result_dirs):
    """The real dataset under ``skip`` through the task's valid_step and after_evaluation."""
    from lavis_plugins.tasks.video_qa import VideoQATask

    ds = _bad_video_set(video_root, tmp_path, "skip")
    model = lp.load_model("lp_blip2_video_opt", "tiny", is_eval=True)
    task = VideoQATask()
    task.before_evaluation(model, ds)
    assert task.answer_list == ["red", "blue", "two", "yes"]  # train+test answers (test only)
    loader = DataLoader(ds, batch_size=4, collate_fn=ds.collater)
    results = [r for batch in loader for r in task.valid_step(model, batch)]
    m = task.after_evaluation(results, "test")
    assert m["num_questions"] == 4 and m["num_skipped"] == 3 and m["num_missing"] == 0
    assert m["skipped_by_kind"] == {"missing": 1, "unreadable": 2}
    skipped = json.loads((result_dirs / "result" / "test_video_qa_skipped.json").read_text())
    assert [s["question_id"] for s in skipped] == [5, 6, 7]
    for protocol in ("generate", "rank"):
        rows = json.loads((result_dirs / "result" / f"test_video_qa_{protocol}.json").read_text())
        assert [r["question_id"] for r in rows] == [1, 2, 3, 4]
        from lavis_plugins.tasks.video_qa import is_correct

        assert all(r["correct"] == is_correct(r["prediction"], r["answer"]) for r in rows)
        assert m[protocol]["accuracy"] == 100.0 * sum(r["correct"] for r in rows) / 4
    assert all(r["prediction"] in task.answer_list for r in rows)  # rank picks from the list
    logged = json.loads((result_dirs / "evaluate.txt").read_text().splitlines()[-1])
    assert logged["test"]["num_skipped"] == 3


# ------------------------------------------------------------------------------ end to end

E2E_YAML = """\
# lavis-plugins evaluate --cfg-path <this file>
model:
  arch: lp_blip2_video_opt
  model_type: tiny
  image_size: 64
  fusion: concat
datasets:
  lp_shapes_video_qa:
    build_info:
      root: {root}
    vis_processor:
      eval:
        name: lp_video_eval
        n_frms: 2
        image_size: 64
run:
  task: lp_video_qa
  runner: lp_runner
  evaluate: True
  test_splits: [test]
  batch_size_train: 4
  batch_size_eval: 4
  num_workers: 0
  device: cpu
  max_len: 3
  num_beams: 2
  output_dir: {out}
"""


def test_tiny_zero_shot_evaluation_through_the_cli(lp, tmp_path):
    """``lavis-plugins evaluate`` on the shapes videos writes both protocols' accuracies."""
    from lavis_plugins import cli, demo_data

    root = demo_data.ensure_shapes_dataset(
        tmp_path / "data" / demo_data.DEFAULT_FOLDER,
        size=demo_data.ShapesSize(train_images=2, val_images=1, test_images=1, val_videos=1,
                                  test_videos=3))
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(E2E_YAML.format(root=root, out=tmp_path / "out"))
    assert cli.main(["evaluate", "--cfg-path", str(cfg), "--job-id", "e2e"]) == 0
    out = tmp_path / "out" / "e2e"
    metrics = json.loads((out / "evaluate.txt").read_text().splitlines()[-1])["test"]
    n = len(json.loads((root / "annotations" / "videoqa_test.json").read_text()))
    assert metrics["num_questions"] == n and metrics["num_skipped"] == 0
    for protocol in ("generate", "rank"):
        assert 0.0 <= metrics[protocol]["accuracy"] <= 100.0
        assert set(metrics[protocol]["per_question_type"]) <= set(demo_data.VIDEO_QUESTION_TYPES)
        rows = json.loads((out / "result" / f"test_video_qa_{protocol}.json").read_text())
        assert len(rows) == n and len({r["question_id"] for r in rows}) == n
        assert metrics[protocol]["num_correct"] == sum(r["correct"] for r in rows)
