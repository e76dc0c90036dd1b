"""Multiple-choice video QA: the NExT-QA / STAR / How2QA / JSON builders on tiny files in each
benchmark's published format, the lp_video_mcqa task (log-likelihood and letter protocols,
per-type and per-group accuracy) and a zero-shot evaluation through the CLI."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lavis_plugins.common.errors import UserError
from test_video_qa_task import BLUE, RED, SIZE, builder_cfg, result_dirs, write_json, write_video  # noqa: F401

NEXTQA_HEADER = ["video", "frame_count", "width", "height", "question", "answer", "qid", "type",
                 "a0", "a1", "a2", "a3", "a4"]


@pytest.fixture(scope="module")
def mc_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mc_videos")
    write_video(root / "1000" / "4010069381.mp4", [RED] * 4)
    write_video(root / "6H78U.mp4", [BLUE] * 4)
    write_video(root / "how_clip.mp4", [RED] * 2 + [BLUE] * 2)
    return root


def _write_csv(path: Path, rows, header=None) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def _nextqa(tmp_path, rows=None, header=NEXTQA_HEADER):
    rows = rows or [
        ["4010069381", 60, 640, 480, "why did the boy wave", 2, 3, "CW",
         "to eat", "to jump", "to greet", "to run", "to sleep"],
        ["4010069381", 60, 640, 480, "what did he do after waving", 0, 4, "TN",
         "sat down", "ran", "cried", "ate", "slept"]]
    return _write_csv(tmp_path / "val.csv", rows, header)


def test_nextqa_csv_with_video_map(lp, mc_root, tmp_path):
    vmap = write_json(tmp_path / "map_vid_vidorID.json", {"4010069381": "1000/4010069381"})
    b = builder_cfg("lp_nextqa", mc_root, {"val": _nextqa(tmp_path)},
                    build_info={"video_map": {"storage": str(vmap)}})
    ds = b.build_datasets()["val"]
    batch = ds.collater([ds[0], ds[1]])
    assert batch["video"].shape == (2, 3, 2, SIZE, SIZE)
    assert batch["options"][0] == ["to eat", "to jump", "to greet", "to run", "to sleep"]
    assert batch["answer"] == [2, 0] and batch["question_type"] == ["CW", "TN"]
    assert batch["question_id"] == ["4010069381_3", "4010069381_4"]


def test_star_json_and_how2qa_csv_and_plain_json(lp, mc_root, tmp_path):
    star = write_json(tmp_path / "STAR_val.json", [{
        "question_id": "Interaction_T1_13", "question": "Which object was tidied up by the person?",
        "video_id": "6H78U", "start": 11.1, "end": 19.6, "answer": "The clothes.",
        "choices": [{"choice_id": 1, "choice": "The closet/cabinet."},
                    {"choice_id": 0, "choice": "The blanket."},
                    {"choice_id": 2, "choice": "The clothes."},
                    {"choice_id": 3, "choice": "The table."}]}])
    rec = builder_cfg("lp_star", mc_root, {"val": star}).build_datasets()["val"][0]
    assert rec["options"] == ["The blanket.", "The closet/cabinet.", "The clothes.", "The table."]
    assert rec["answer"] == 2 and rec["question_type"] == "Interaction"

    how = _write_csv(tmp_path / "how2QA_val_release.csv", [
        ["how_clip", "[0, 4]", "a knife", "a fork", "a spoon", "what does he hold", "a brush"]])
    plain = builder_cfg("lp_how2qa", mc_root, {"val": how},
                        build_info={"shuffle_seed": None}).build_datasets()["val"][0]
    assert plain["options"][0] == "a brush" and plain["answer"] == 0
    shuffled = builder_cfg("lp_how2qa", mc_root, {"val": how}).build_datasets()["val"][0]
    assert sorted(shuffled["options"]) == sorted(plain["options"])
    assert shuffled["options"][shuffled["answer"]] == "a brush"

    mcq = write_json(tmp_path / "mc.json", [
        {"video": "how_clip.mp4", "question": "what colour", "a0": "red", "a1": "blue",
         "answer": 1, "qid": "q1"},
        {"video": "6H78U.mp4", "question": "what colour", "options": ["red", "blue", "green"],
         "answer": 1, "question_type": "color"}])
    ds = builder_cfg("lp_video_mcqa", mc_root, {"test": mcq}).build_datasets()["test"]
    assert [ds[0]["options"], ds[1]["options"]] == [["red", "blue"], ["red", "blue", "green"]]
    assert ds[0]["question_id"] == "q1" and ds[1]["question_id"] == 1


def test_video_map_looks_up_each_record_s_own_video_id(lp, mc_root, tmp_path):
    """The map is keyed by the record's video id, never parsed out of its question_id (which in a
    plain JSON file may be an integer, or a string without the video in it)."""
    vmap = write_json(tmp_path / "map.json", {"4010069381": "1000/4010069381.mp4"})
    mcq = write_json(tmp_path / "mc.json", [
        {"video": "4010069381", "question": "what colour", "options": ["red", "blue"],
         "answer": 0, "question_id": 7},
        {"video": "4010069381", "question": "what shape", "options": ["circle", "square"],
         "answer": 1, "question_id": "q_two"}])
    ds = builder_cfg("lp_video_mcqa", mc_root, {"test": mcq},
                     build_info={"video_map": {"storage": str(vmap)}}).build_datasets()["test"]
    assert [ds[0]["question_id"], ds[1]["question_id"]] == [7, "q_two"]
    assert ds[0]["video"].shape == ds[1]["video"].shape == (3, 2, SIZE, SIZE)


@pytest.mark.parametrize("name", ["lp_star", "lp_video_mcqa", "lp_msrvtt_qa"])
def test_json_annotation_files_are_read_by_one_loader(lp, mc_root, tmp_path, name):
    """STAR, plain multiple-choice JSON and open-ended video QA files share one reader: the same
    message for a file that is not a list, and for a record that lacks a field."""
    split = "test" if name == "lp_video_mcqa" else "val"
    not_a_list = write_json(tmp_path / f"{name}.json", {"question": "q"})
    with pytest.raises(UserError, match=r"must be a JSON list of records \(.*\), got a dict"):
        builder_cfg(name, mc_root, {split: not_a_list}).build_datasets()
    lacking = write_json(tmp_path / f"{name}_lacking.json", [{"unrelated": 1}])
    with pytest.raises(UserError, match=r"record 0 lacks \[.*'question'.*\] \(a .* record needs"):
        builder_cfg(name, mc_root, {split: lacking}).build_datasets()


def test_bad_multiple_choice_annotations_name_the_row_and_fix(lp, mc_root, tmp_path):
    def build(name, path, **extra):
        return builder_cfg(name, mc_root, {"val": path} if name != "lp_video_mcqa"
                           else {"test": path}, **extra).build_datasets()

    bad_header = _nextqa(tmp_path, header=NEXTQA_HEADER[:-1])
    with pytest.raises(UserError, match=r"missing \['a4'\]"):
        build("lp_nextqa", bad_header, build_info={"video_map": None})
    out_of_range = _nextqa(tmp_path, rows=[["4010069381", 1, 1, 1, "q", 7, 1, "CW",
                                            "a", "b", "c", "d", "e"]])
    with pytest.raises(UserError, match="row 2: answer 7 is not an option index"):
        build("lp_nextqa", out_of_range, build_info={"video_map": None})
    vmap = write_json(tmp_path / "map.json", {"other": "x"})
    with pytest.raises(UserError, match="not in the video map"):
        build("lp_nextqa", _nextqa(tmp_path), build_info={"video_map": {"storage": str(vmap)}})
    star = write_json(tmp_path / "star.json", [{"question_id": "Sequence_1", "question": "q",
                                                "video_id": "6H78U", "answer": "x",
                                                "choices": [{"choice_id": 0, "choice": "y"},
                                                            {"choice_id": 1, "choice": "z"}]}])
    with pytest.raises(UserError, match="record 0: answer 'x' is none of the choices"):
        build("lp_star", star)
    how = _write_csv(tmp_path / "how.csv", [["clip", "[0, 1]", "a", "b", "question", "c"]])
    with pytest.raises(UserError, match="row 1 has 6 columns"):
        build("lp_how2qa", how)
    one_option = write_json(tmp_path / "one.json", [{"video": "6H78U.mp4", "question": "q",
                                                     "options": ["only"], "answer": 0}])
    with pytest.raises(UserError, match="2 to 10 non-empty options"):
        build("lp_video_mcqa", one_option)
    good = write_json(tmp_path / "good.json", [{"video": "6H78U", "question": "q",
                                                "options": ["a", "b"], "answer": 0}])
    with pytest.raises(UserError, match="ann_format"):
        build("lp_video_mcqa", good, build_info={"ann_format": "msrvtt"})
    with pytest.raises(UserError, match="video_template"):
        build("lp_video_mcqa", good, build_info={"video_template": "{vid}.mp4"})


# ------------------------------------------------------------------------------ the task


@pytest.fixture(scope="module")
def tiny_model(lp):
    torch.manual_seed(0)
    return lp.load_model("lp_blip2_video_opt", "tiny", is_eval=True)


def test_option_scores_equal_scoring_each_option_alone(lp, tiny_model):
    from lavis_plugins.tasks.video_mcqa import VideoMCQATask, VideoMCQATaskConfig, lettered

    task = VideoMCQATask(VideoMCQATaskConfig(prompt="Question: {} Answer:"))
    video = torch.randn(1, 3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    options = ["a red square", "blue", "two large circles", "no"]
    scores = task.option_scores(tiny_model, video, "what is shown", options)
    for j, option in enumerate(options):
        alone = tiny_model.score_candidates({"video": video, "text_input": ["what is shown"]},
                                            [option], prompt="Question: {} Answer:")
        assert scores["loglik"][j] == pytest.approx(float(alone[0, 0]), abs=1e-4)
        letter = tiny_model.score_candidates(
            {"video": video, "text_input": [task.cfg.letter_prompt.format(
                question="what is shown", options=lettered(options))]}, ["ABCD"[j]], prompt="{}")
        assert scores["letter"][j] == pytest.approx(float(letter[0, 0]), abs=1e-4)


def test_per_type_and_nextqa_group_accuracy(lp, result_dirs):  # noqa: F811 - pytest fixture
    from lavis_plugins.tasks.video_mcqa import VideoMCQATask

    def rec(qid, qtype, answer, pred):
        return {"question_id": qid, "question": "q", "question_type": qtype,
                "options": ["a", "b", "c"], "answer": answer, "scores": {"loglik": [0, 0, 0]},
                "predictions": {"loglik": pred}}

    task = VideoMCQATask()
    task.cfg.protocols = ["loglik"]
    m = task.score([rec(1, "CW", 0, 0), rec(2, "CH", 1, 2), rec(3, "TN", 2, 2),
                    rec(4, "DO", 0, 0)], [], "val")
    assert m["loglik"]["accuracy"] == 75.0 and m["agg_metrics"] == 75.0
    assert m["loglik"]["per_question_type"] == {"CH": 0.0, "CW": 100.0, "DO": 100.0, "TN": 100.0}
    assert m["loglik"]["per_question_group"] == {"causal": 50.0, "descriptive": 100.0,
                                                 "temporal": 100.0}
    rows = json.loads((result_dirs / "result" / "val_video_mcqa_loglik.json").read_text())
    assert rows[1]["predicted_option"] == "c" and rows[1]["correct"] is False


def test_task_options_are_checked(lp):
    from omegaconf import OmegaConf

    from lavis_plugins.tasks.video_mcqa import VideoMCQATaskConfig

    with pytest.raises(UserError, match="run.protocols"):
        VideoMCQATaskConfig.from_run_cfg(OmegaConf.create({"protocols": ["rank"]}))
    with pytest.raises(UserError, match="letter_prompt"):
        VideoMCQATaskConfig.from_run_cfg(OmegaConf.create({"letter_prompt": "Q: {question}"}))
    with pytest.raises(UserError, match="letter_prompt"):
        VideoMCQATaskConfig.from_run_cfg(OmegaConf.create({"letter_prompt": "{q} {options}"}))


MC_YAML = """\
# lavis-plugins evaluate --cfg-path <this file>
model:
  arch: lp_blip2_video_opt
  model_type: tiny
  frame_selection: llm
  selection_k: 2
datasets:
  lp_video_mcqa:
    build_info:
      annotations:
        test: {{storage: {ann}}}
      videos: {{storage: {root}}}
    vis_processor:
      eval: {{name: lp_video_eval, n_frms: 4, image_size: 32}}
run:
  task: lp_video_mcqa
  runner: lp_runner
  evaluate: True
  test_splits: [test]
  batch_size_train: 2
  batch_size_eval: 2
  num_workers: 0
  device: cpu
  output_dir: {out}
"""


def test_multiple_choice_evaluation_through_the_cli(lp, mc_root, tmp_path):
    from lavis_plugins import cli

    ann = write_json(tmp_path / "mc.json", [
        {"video": "how_clip.mp4", "question": "what colour", "options": ["red", "blue"],
         "answer": 0, "question_type": "color"},
        {"video": "6H78U.mp4", "question": "what colour", "options": ["red", "blue", "green"],
         "answer": 1, "question_type": "color"},
        {"video": "6H78U.mp4", "question": "how many", "options": ["1", "2", "3", "4"],
         "answer": 0, "question_type": "count"}])
    cfg = tmp_path / "mc.yaml"
    cfg.write_text(MC_YAML.format(ann=ann, root=mc_root, out=tmp_path / "out"))
    assert cli.main(["evaluate", "--cfg-path", str(cfg), "--job-id", "mc"]) == 0
    out = tmp_path / "out" / "mc"
    metrics = json.loads((out / "evaluate.txt").read_text().splitlines()[-1])["test"]
    assert metrics["num_questions"] == 3
    for protocol in ("loglik", "letter"):
        rows = json.loads((out / "result" / f"test_video_mcqa_{protocol}.json").read_text())
        assert [len(r["scores"]) for r in rows] == [2, 3, 4]
        assert all(r["prediction"] == max(range(len(r["scores"])), key=r["scores"].__getitem__)
                   for r in rows)
        assert metrics[protocol]["num_correct"] == sum(r["correct"] for r in rows)
        assert set(metrics[protocol]["per_question_type"]) == {"color", "count"}
    # frames scored by how far they tell the options apart (model.selection_aggregate)
    assert cli.main(["evaluate", "--cfg-path", str(cfg), "--job-id", "spread", "--options",
                     "model.selection_aggregate=spread"]) == 0
    spread = json.loads((tmp_path / "out" / "spread" / "evaluate.txt").read_text()
                        .splitlines()[-1])["test"]
    assert spread["num_questions"] == 3


def test_a_bad_selection_aggregate_is_one_error_line_through_the_cli(lp, mc_root, tmp_path,
                                                                    capsys):
    from lavis_plugins import cli

    ann = write_json(tmp_path / "mc.json", [
        {"video": "how_clip.mp4", "question": "what colour", "options": ["red", "blue"],
         "answer": 0}])
    cfg = tmp_path / "mc.yaml"
    cfg.write_text(MC_YAML.format(ann=ann, root=mc_root, out=tmp_path / "o"))
    rc = cli.main(["evaluate", "--cfg-path", str(cfg), "--options",
                   "model.selection_aggregate=mean"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1
    assert "selection_aggregate" in err[0] and "spread" in err[0]


@pytest.mark.parametrize("name", ["nextqa_mc_flant5xl_select4of32", "star_mc_flant5xl_select4of32",
                                  "how2qa_mc_flant5xl_select4of32",
                                  "msrvtt_qa_flant5xl_instructblip_protocol",
                                  "msvd_qa_flant5xl_instructblip_protocol"])
def test_shipped_protocol_yamls_hold_valid_settings(lp, name):
    """The recipes' model, task and processor settings pass the checks a run makes (without
    building the 3B-parameter model)."""
    import argparse

    from lavis.common.config import Config
    from lavis.common.registry import registry

    from lavis_plugins.models.blip2_video import Blip2VideoT5Config
    from lavis_plugins.processors.video_processors import VideoEvalProcessor

    path = Path(__file__).resolve().parents[1] / "projects" / "blip2_video" / f"{name}.yaml"
    cfg = Config(argparse.Namespace(cfg_path=str(path), options=[]))
    model_cfg = Blip2VideoT5Config.from_cfg(cfg.model_cfg, cfg.model_cfg.arch)
    task = registry.get_task_class(cfg.run_cfg.task).setup_task(cfg=cfg)
    (ds_name, ds_cfg), = cfg.datasets_cfg.items()
    proc = VideoEvalProcessor.from_config(ds_cfg.vis_processor.eval)
    if "instructblip" in name:  # InstructBLIP's video protocol
        assert (proc.cfg.n_frms, proc.cfg.sampling) == (4, "headtail")
        assert task.cfg.num_beams == 5 and task.cfg.length_penalty == -1.0
        assert task.cfg.prompt == "Question: {} Short Answer:" and task.cfg.protocols[0] == "rank"
    else:  # SeViLA-style: 32 candidates, 4 kept, "Frame {i}:" cues
        assert proc.cfg.n_frms == 32 and model_cfg.selection_k == 4
        assert model_cfg.frame_selection == "llm" and model_cfg.frame_prompt == "Frame {i}:"
