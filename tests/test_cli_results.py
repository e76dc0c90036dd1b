"""Visible results (issue 17): the metrics table at the end of evaluate, result files named by
split (and epoch when training), per-query retrieval top-k, loss_curves.png each epoch,
run.tensorboard, and progress lines that stay readable in a log file."""
from __future__ import annotations

import json

import pytest

RETRIEVAL_YAML = """\
# lavis-plugins evaluate --cfg-path <this file>
model:
  arch: lp_blip2_qformer
  model_type: tiny
  image_size: 64
datasets:
  lp_shapes_retrieval:
    build_info:
      root: {root}
run:
  task: lp_retrieval
  runner: lp_runner
  k_test: 4
  topk_save: 3
  evaluate: True
  test_splits: [test]
  batch_size_train: 8
  batch_size_eval: 8
  num_workers: 0
  device: cpu
  output_dir: {out}
"""


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory):
    from lavis_plugins import demo_data

    root = tmp_path_factory.mktemp("shapes") / demo_data.DEFAULT_FOLDER
    return demo_data.ensure_shapes_dataset(root, size=demo_data.ShapesSize(
        train_images=8, val_images=4, test_images=5, val_videos=1, test_videos=1))


def test_evaluate_prints_the_metrics_table_and_writes_retrieval_topk(lp, tmp_path, capsys,
                                                                      small_shapes):
    from lavis_plugins import cli

    cfg = tmp_path / "ret.yaml"
    cfg.write_text(RETRIEVAL_YAML.format(root=small_shapes, out=tmp_path / "out"))
    assert cli.main(["evaluate", "--cfg-path", str(cfg), "--job-id", "r"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("split"):]
    assert "metric" in table.splitlines()[0]
    for key in ("txt_r1", "img_r1", "agg_metrics"):
        assert any(ln.split()[:2] == ["test", key] for ln in table.splitlines()), key
    # evaluate-only: the file is named by its split alone (no "_epochbest_")
    files = sorted(p.name for p in (tmp_path / "out" / "r" / "result").iterdir())
    assert files == ["test_retrieval_topk.json"]
    topk = json.loads((tmp_path / "out" / "r" / "result" / files[0]).read_text())
    n_images = 5
    assert len(topk["image_to_text"]) == n_images
    first = topk["image_to_text"][0]
    assert len(first["top_k"]) == 3 and {"text", "score", "correct"} <= set(first["top_k"][0])
    scores = [m["score"] for m in first["top_k"]]
    assert scores == sorted(scores, reverse=True)
    assert len(topk["text_to_image"]) == 4 * n_images  # 4 captions per eval image
    assert all(r["ground_truth"] for r in topk["text_to_image"])
    assert (tmp_path / "out" / "r" / "evaluate.txt").is_file()


def test_metrics_table_flattens_nested_metrics():
    from lavis_plugins.runners.reporting import format_metrics_table

    table = format_metrics_table({"test": {"agg_metrics": 61.25, "generate": {"accuracy": 61.25},
                                           "num_questions": 8, "metric": "vqa_acc"}})
    rows = [ln.split() for ln in table.splitlines()[2:]]
    assert (["test", "generate.accuracy", "61.2500"] in rows
            and ["test", "num_questions", "8"] in rows)
    assert format_metrics_table(None) == "" and format_metrics_table({"test": None}) == ""


def test_result_file_names_carry_the_epoch_only_when_training():
    from lavis_plugins.runners.reporting import result_file_name

    assert result_file_name("test", None, "vqa_result.json") == "test_vqa_result.json"
    assert result_file_name("val", 2, "captions.json") == "val_epoch2_captions.json"
    assert result_file_name("test", "best", "captions.json") == "test_epochbest_captions.json"


def test_loss_curves_png_has_loss_and_eval_panels(tmp_path):
    from PIL import Image

    from lavis_plugins.runners.reporting import LOSS_PNG, plot_run_curves

    assert plot_run_curves(tmp_path) is None  # nothing logged yet
    with open(tmp_path / "train_log.jsonl", "w") as f:
        for step in range(1, 6):
            f.write(json.dumps({"step": step, "loss": 3.0 / step, "loss_itc": 1.0 / step}) + "\n")
    # log.txt also holds LAVIS's indented config, which is skipped
    (tmp_path / "log.txt").write_text('{\n    "run": {}\n}\n{"train_loss": "1.0"}\n'
                                      '{"val_agg_metrics": 10.0, "val_best_epoch": 0}\n'
                                      '{"val_agg_metrics": 20.0, "val_best_epoch": 1}\n')
    path = plot_run_curves(tmp_path)
    assert path == tmp_path / LOSS_PNG
    w, h = Image.open(path).size
    assert w > 1.5 * h  # two panels side by side


def test_tensorboard_without_the_package_is_one_clear_error(lp, monkeypatch, tmp_path):
    import builtins

    from lavis_plugins.common.errors import UserError
    from lavis_plugins.runners.reporting import TensorboardLogger

    real_import = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(UserError, match="run.tensorboard.*pip install tensorboard"):
        TensorboardLogger(tmp_path)


def test_tensorboard_logger_writes_every_number(lp, tmp_path):
    """Numbers, nested metrics and numeric strings become scalars (read back with tensorboard's
    own reader); other strings are left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lavis_plugins.runners.reporting import TensorboardLogger

    tb = TensorboardLogger(tmp_path)
    tb.scalars("val", {"agg_metrics": 1.5, "generate": {"accuracy": 50}, "metric": "x",
                       "lr": "0.001"}, step=7)
    tb.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["val/agg_metrics", "val/generate.accuracy",
                                                "val/lr"]
    got = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}
    assert got["val/agg_metrics"] == [(7, 1.5)] and got["val/generate.accuracy"] == [(7, 50.0)]
    assert got["val/lr"][0][0] == 7 and abs(got["val/lr"][0][1] - 0.001) < 1e-9

def test_two_runs_started_in_the_same_second_get_two_folders(monkeypatch, tmp_path):
    """The automatic job id is the time to the second; a second run in that second must not be
    refused because the first run's folder holds a finished run."""
    from datetime import datetime

    from lavis_plugins.cli import experiment

    class FrozenClock:
        @staticmethod
        def now():
            return datetime(2026, 12, 5, 10, 30, 40)

    monkeypatch.setattr(experiment, "datetime", FrozenClock)
    assert experiment.fresh_job_id(tmp_path) == "20261205103040"
    (tmp_path / "20261205103040").mkdir()
    assert experiment.fresh_job_id(tmp_path) == "20261205103040-2"
    (tmp_path / "20261205103040-2").mkdir()
    assert experiment.fresh_job_id(tmp_path) == "20261205103040-3"
