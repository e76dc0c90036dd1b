"""Registration, Python API, shipped YAMLs, packaging and CLI bad-input handling."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO

KINDS = ("model", "processor", "builder", "task", "runner", "lr_scheduler")


def test_every_plugin_name_is_prefixed_and_every_kind_registered(lp):
    names = lp.plugin_names()
    for kind in KINDS:
        assert names[kind], f"no plugin {kind} registered"
        for n in names[kind]:
            assert n.startswith(lp.PREFIX), f"{kind} {n!r} lacks the {lp.PREFIX!r} prefix"
    from lavis.common.registry import registry

    # LAVIS's own names still map to LAVIS classes
    assert registry.get_model_class("blip2_opt").__module__.startswith("lavis.")
    assert registry.get_runner_class("runner_base").__module__.startswith("lavis.")


def test_model_zoo_lists_lavis_and_plugin_models(lp):
    zoo = dict(iter(lp.model_zoo()))
    assert "blip2_opt" in zoo and "blip2_feature_extractor" in zoo
    plugin_models = lp.plugin_names()["model"]
    assert plugin_models and all(m in zoo for m in plugin_models)
    assert "lp_blip2_qformer" in str(lp.model_zoo())


def test_plugin_default_configs_resolve_inside_the_plugin(lp):
    from lavis.common.registry import registry

    from lavis_plugins.paths import resource_dir

    root = resource_dir("configs").resolve()
    for name in lp.plugin_names()["model"]:
        cls = registry.get_model_class(name)
        for mtype in cls.PRETRAINED_MODEL_CONFIG_DICT:
            path = Path(cls.default_config_path(mtype)).resolve()
            assert root in path.parents, f"{name}/{mtype}: {path} is outside {root}"
            assert path.is_file(), path
    for name in lp.plugin_names()["builder"]:
        cls = registry.get_builder_class(name)
        for t in cls.DATASET_CONFIG_DICT:
            assert Path(cls.default_config_path(t)).resolve().is_file()


def test_unknown_names_fail_with_choices(lp):
    from lavis_plugins.common.errors import UserError

    with pytest.raises(UserError, match="Did you mean: lp_blip2_qformer"):
        lp.load_model("lp_blip2_qformr", "pretrain")
    with pytest.raises(UserError, match="model_type"):
        lp.load_model("lp_blip2_qformer", "no_such_type")


def _yamls(folder):
    return sorted((REPO / folder).rglob("*.yaml"))


@pytest.mark.parametrize("path", _yamls("configs"), ids=lambda p: str(p.relative_to(REPO)))
def test_default_yaml_loads(lp, path):
    cfg = OmegaConf.load(path)
    assert "model" in cfg or "datasets" in cfg, f"{path} has neither model: nor datasets:"


@pytest.mark.parametrize("path", _yamls("projects"), ids=lambda p: str(p.relative_to(REPO)))
def test_project_yaml_builds_lavis_config(lp, path):
    """Every experiment YAML goes through LAVIS's ``Config`` and names registered classes."""
    import argparse

    from lavis.common.config import Config
    from lavis.common.registry import registry

    cfg = Config(argparse.Namespace(cfg_path=str(path), options=[]))
    assert registry.get_model_class(cfg.model_cfg.arch) is not None
    assert registry.get_task_class(cfg.run_cfg.task) is not None
    assert registry.get_runner_class(cfg.run_cfg.get("runner", "runner_base")) is not None
    head = path.read_text().splitlines()[0]
    assert head.startswith("#") and "lavis" in head, f"{path} should open with its launch command"


def test_wheel_ships_the_yamls(tmp_path):
    """A non-editable install finds configs/ and projects/: they are package data."""
    src = tmp_path / "src"
    src.mkdir()
    for item in ("setup.py", "README.md", "lavis_plugins", "configs", "projects"):
        p = REPO / item
        if p.is_dir():
            shutil.copytree(p, src / item, ignore=shutil.ignore_patterns("__pycache__"))
        elif p.exists():
            shutil.copy(p, src / item)
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-c",
                    f"from setuptools import build_meta; build_meta.build_wheel({str(out)!r})"],
                   cwd=src, check=True, capture_output=True)
    wheel = next(out.glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("configs", "projects"):
        for y in _yamls(folder):
            rel = f"lavis_plugins/{folder}/{y.relative_to(REPO / folder).as_posix()}"
            assert rel in names, f"{rel} missing from the wheel"
    assert any(n.endswith("entry_points.txt") for n in names)


# ---------------------------------------------------------------- CLI bad input (in-process)
def _cli(capsys, *argv):
    from lavis_plugins.cli import main

    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def _write(tmp_path, text, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_cli_missing_yaml(lp, capsys, tmp_path):
    code, err = _cli(capsys, "train", "--cfg-path", str(tmp_path / "missing.yaml"))
    assert code == 2 and "config file not found" in err and "missing.yaml" in err
    assert "Traceback" not in err


GOOD_RUN = "run: {task: image_text_pretrain, runner: lp_runner, max_epoch: 1, init_lr: 1e-4}\n"


@pytest.mark.parametrize("text,expect", [
    ("model: {arch: lp_blip2_qformr, model_type: tiny}\ndatasets: {}\n" + GOOD_RUN,
     "unknown model.arch 'lp_blip2_qformr'. Did you mean: lp_blip2_qformer"),
    ("model: {arch: lp_blip2_qformer, model_type: huge}\ndatasets: {}\n" + GOOD_RUN,
     "unknown model.model_type of 'lp_blip2_qformer' 'huge'"),
    ("model: {arch: lp_blip2_qformer, model_type: tiny}\ndatasets: {coco_captoin: {}}\n" + GOOD_RUN,
     "unknown dataset 'coco_captoin'. Did you mean: coco_caption"),
    ("model: {arch: lp_blip2_qformer, model_type: tiny}\ndatasets: {}\n"
     "run: {task: captionin, max_epoch: 1, init_lr: 1e-4}\n", "unknown run.task 'captionin'"),
    ("model: {arch: lp_blip2_qformer, model_type: tiny}\ndatasets: {}\n"
     "run: {task: captioning, runner: lp_runnr}\n", "unknown run.runner 'lp_runnr'"),
    ("model: {arch: lp_blip2_qformer, model_type: tiny}\n"
     "datasets: {coco_caption: {build_info: {annotations: {train: "
     "{storage: /nonexistent/a.json}}}}}\n"
     + GOOD_RUN, "annotation file for split 'train' not found: /nonexistent/a.json"),
    ("model: [unclosed\n", "cannot parse"),
])
def test_cli_bad_config_gives_one_clear_message(lp, capsys, tmp_path, text, expect):
    code, err = _cli(capsys, "train", "--cfg-path", _write(tmp_path, text))
    assert code == 2, err
    assert expect in err
    assert "Traceback" not in err


def test_cli_bad_options(lp, capsys, tmp_path):
    path = _write(tmp_path, "model: {arch: lp_blip2_qformer, model_type: tiny}\n" + GOOD_RUN)
    code, err = _cli(capsys, "train", "--cfg-path", path, "--options", "run.max_epoch")
    assert code == 2 and "key=value" in err


def test_cli_rejects_unknown_model_key(lp, capsys, tmp_path, tiny_bert_dir):
    path = _write(tmp_path, "model: {arch: lp_blip2_qformer, model_type: tiny, "
                            f"bert_path: {tiny_bert_dir}, num_querry_token: 4}}\n"
                            "datasets: {}\nrun: {task: image_text_pretrain, evaluate: True}\n")
    code, err = _cli(capsys, "evaluate", "--cfg-path", path)
    assert code == 2 and "num_querry_token" in err and "num_query_token" in err
