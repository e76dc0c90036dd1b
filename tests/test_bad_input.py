"""Bad input, table-driven, through ``lavis_plugins.cli.main`` in this one interpreter.

Every case asserts the exit code, that stderr holds one ``lavis-plugins: error:`` line naming
the problem (no traceback), and that nothing outside the case's own run folder changed. The
categories: configs, distributed environment, weights files (malicious pickles: a marker file
must not appear; empty, text, truncated, wrong structure), run folders (finished run, lock,
stale lock, stale temp files, disk full), divergence, annotations, images and feature caches.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest
import torch

from test_cli_train import SMOKE  # the tiny stage-1 run on the shapes data

MARKER = "pwned.txt"


class Evil:
    """Unpickling this runs code: it creates the marker file (in the working directory)."""

    def __reduce__(self):
        return (exec, (f"open({MARKER!r}, 'w').close()",))


@dataclass
class Env:
    """What every case gets: the folder (cwd), the YAML, the prepared files."""

    root: Path
    yaml: Path
    files: Dict[str, Path] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.root / "out"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _lock(env: Env, job: str, pid: int) -> None:
    folder = env.out / job
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".lavis_plugins.lock").write_text(json.dumps(
        {"pid": pid, "host": socket.gethostname(), "started": time.time()}))


def _make_files(root: Path, shapes_home: Path) -> Dict[str, Path]:
    """Weights files (evil, empty, text, truncated, wrong structure), a shapes copy with bad
    annotations and images, and damaged feature caches."""
    f: Dict[str, Path] = {}
    w = root / "weights"
    w.mkdir()
    f["evil_ckpt"] = w / "evil_ckpt.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "optimizer": Evil()}, f["evil_ckpt"])
    f["evil_state"] = w / "evil_state.pth"
    torch.save({"model": {"a": torch.zeros(1), "b": Evil()}}, f["evil_state"])
    f["empty"] = w / "empty.pth"
    f["empty"].write_bytes(b"")
    f["text"] = w / "page.pth"
    f["text"].write_text("<html><body>403 Forbidden</body></html>\n")
    good = w / "good.pth"
    torch.save({"model": {"a": torch.zeros(1000)}, "optimizer": {}}, good)
    f["truncated"] = w / "truncated.pth"
    f["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    f["list"] = w / "list.pth"
    torch.save([1, 2, 3], f["list"])

    # a copy of the shapes data with extra (bad) annotation files and images beside the
    # manifest's own files, which stay intact
    data = root / "shapes"
    src = shapes_home / "shapes_v1"
    # the files, with the image folders linked (not copied: thousands of files)
    shutil.copytree(src, data,
                    ignore=lambda folder, names: ["images"] if folder == str(src) else [])
    (data / "images").mkdir()
    for sub in (src / "images").iterdir():
        (data / "images" / sub.name).symlink_to(sub, target_is_directory=True)
    ann = json.loads((data / "annotations" / "caption_train.json").read_text())[:12]
    bad_dir = data / "images" / "bad"
    bad_dir.mkdir()
    png = (data / "images" / ann[0]["image"]).read_bytes()
    (bad_dir / "truncated.png").write_bytes(png[: len(png) // 2])
    (bad_dir / "empty.png").write_bytes(b"")
    (bad_dir / "text.png").write_text("not an image\n")

    def annotations(name: str, bad: dict, at: int = 0) -> None:
        recs = [dict(r) for r in ann]
        recs[at] = {**recs[at], **bad}
        recs[at] = {k: v for k, v in recs[at].items() if v is not None}
        (data / "annotations" / f"{name}.json").write_text(json.dumps(recs))

    annotations("no_caption", {"caption": None}, at=3)
    annotations("int_caption", {"caption": 5}, at=2)
    annotations("missing_image", {"image": "bad/nope.png"})
    annotations("empty_image", {"image": "bad/empty.png"})
    annotations("truncated_image", {"image": "bad/truncated.png"})
    annotations("text_image", {"image": "bad/text.png"})
    (data / "annotations" / "empty_list.json").write_text("[]")
    f["data"] = data

    # feature caches: unreadable meta, truncated features, fewer rows than the meta says
    meta = {"encoder": "x", "images": {}, "keys": ["a", "b"], "shape": [2, 3, 4],
            "dtype": "float16"}
    for name in ("bad_meta", "truncated_npy", "few_rows"):
        (root / name).mkdir()
        (root / name / "meta.json").write_text(json.dumps(meta))
        np.save(root / name / "features.npy", np.zeros((2, 3, 4), np.float16))
        f[name] = root / name
    (root / "bad_meta" / "meta.json").write_text("{not json")
    npy = root / "truncated_npy" / "features.npy"
    npy.write_bytes(npy.read_bytes()[:-20])
    np.save(root / "few_rows" / "features.npy", np.zeros((1, 3, 4), np.float16))
    # two augmented views of each of the two images (rows r * 2 + k)
    (root / "two_views").mkdir()
    (root / "two_views" / "meta.json").write_text(json.dumps({**meta, "views": 2,
                                                              "shape": [4, 3, 4]}))
    np.save(root / "two_views" / "features.npy", np.zeros((4, 3, 4), np.float16))
    f["two_views"] = root / "two_views"
    return f


@dataclass
class Case:
    name: str
    options: List[str] = field(default_factory=list)
    expect: str = ""  # substring of the error line ("" for a valid run)
    code: int = 2
    environ: Dict[str, str] = field(default_factory=dict)
    argv: List[str] = field(default_factory=list)  # extra CLI arguments
    command: Optional[List[str]] = None  # a whole other command (its own argv)
    setup: Optional[Callable[[Env], None]] = None
    check: Optional[Callable[[Env], None]] = None
    job: str = ""  # the run folder name (default: the case name)


def _opt(key: str, path) -> str:
    return f"{key}={path}"


def _data(ann: str, *more: str) -> List[str]:
    return ["datasets.lp_shapes_caption.build_info.root=@data",
            f"datasets.lp_shapes_caption.build_info.annotations.train.storage="
            f"annotations/{ann}.json", "run.iters_per_epoch=3", *more]


def _finished_run_untouched(env: Env) -> None:
    folder = env.out / "done"
    assert (folder / "run_finished.json").is_file()
    ckpt = torch.load(folder / "checkpoint_0.pth", weights_only=True)  # loads weights-only
    assert ckpt["global_step"] == 2


def _stale_lock_taken_over(env: Env) -> None:
    assert not (env.out / "stale_lock" / ".lavis_plugins.lock").exists()
    assert (env.out / "stale_lock" / "checkpoint_0.pth").is_file()


def _resumed_and_cleaned(env: Env) -> None:
    folder = env.out / "done"
    assert not list(folder.glob("*.tmp")) and not list(folder.glob(".*.tmp"))


def _previous_checkpoint_intact(env: Env, job: str = "disk_full") -> None:
    folder = env.out / job
    assert not list(folder.glob("*.tmp")), "partial file left"
    prev = folder / "checkpoint_step1.pth"
    assert torch.load(prev, weights_only=True)["global_step"] == 1
    assert os.path.realpath(folder / "checkpoint_latest.pth") == str(prev.resolve())


def _skipped_counted(env: Env) -> None:
    log = (env.out / "skip_bad" / "log.txt").read_text()
    assert '"train_data_bad": "1"' in log  # this epoch's count (runners/train_stream.py)


def _no_nan_saved(env: Env) -> None:
    for p in (env.out / "diverge").glob("checkpoint_*.pth"):
        for k, v in torch.load(p, weights_only=True)["model"].items():
            assert torch.isfinite(v).all(), (p, k)


def _prepare_done(env: Env) -> None:
    (env.out / "done" / "checkpoint_9.pth.tmp").write_bytes(b"partial")


def _failing_save(monkeypatch, err: OSError) -> None:
    """``torch.save`` whose second call writes part of the file, then fails with ``err``."""
    real = torch.save
    calls = []

    def save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"\x00" * 100)
            raise err
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)


FAILING_WRITES = {"disk_full": OSError(errno.ENOSPC, "No space left on device"),
                  "read_only": OSError(errno.EROFS, "Read-only file system")}


CASES = [
    # --- configs
    Case("typo_run_key", ["run.max_epochs=1"], "run.max_epochs is not a known key"),
    Case("bad_batch", ["run.batch_size_train=abc"], "run.batch_size_train is 'abc'"),
    Case("negative_lr", ["run.init_lr=-1"], "run.init_lr is -1; it must be a number > 0"),
    Case("log_freq_0", ["run.log_freq=0"], "run.log_freq is 0"),
    Case("max_epoch_0", ["run.max_epoch=0"], "run.max_epoch is 0"),
    Case("device_tpu", ["run.device=tpu"], "run.device is 'tpu'"),
    Case("workers_negative", ["run.num_workers=-1"], "run.num_workers is -1"),
    Case("policy_typo", ["run.on_nonfinite=skp"], "did you mean skip"),
    Case("persistent_not_bool", ["run.persistent_workers=sometimes"],
         "run.persistent_workers is 'sometimes'; it must be true or false"),
    Case("prefetch_0", ["run.prefetch_factor=0"], "run.prefetch_factor is 0"),
    Case("prefetch_not_int", ["run.prefetch_factor=1.5"], "run.prefetch_factor is 1.5"),
    Case("prefetch_without_workers", ["run.prefetch_factor=4"],
         "run.prefetch_factor is 4 but run.num_workers is 0"),
    Case("compile_not_bool", ["run.compile=sometimes"],
         "run.compile is 'sometimes'; it must be true or false"),
    Case("persistent_without_workers", ["run.persistent_workers=true"],
         "run.persistent_workers is True but run.num_workers is 0"),
    Case("unknown_section", ["modle.arch=x"], "unknown top-level section 'modle'"),
    Case("unknown_dataset_key", ["datasets.lp_shapes_caption.bild_info.root=x"],
         "datasets.lp_shapes_caption.bild_info is not a known key (it would be ignored). "
         "Did you mean build_info"),
    # --- distributed environment
    Case("rank_beyond_world", environ={"RANK": "5", "WORLD_SIZE": "2"},
         expect="RANK=5 is not below WORLD_SIZE=2"),
    Case("world_not_int", environ={"WORLD_SIZE": "abc", "RANK": "0"},
         expect="WORLD_SIZE='abc' must be an integer"),
    Case("no_master_addr", environ={"WORLD_SIZE": "2", "RANK": "0"},
         expect="MASTER_ADDR is not set"),
    Case("missing_peer", ["run.dist_timeout_s=1.5"],
         environ={"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": "@port"},
         expect="rank(s) 1 of WORLD_SIZE=2 never joined"),
    # --- weights files: no load path runs pickled code
    Case("evil_resume", ["run.resume_ckpt_path=@evil_ckpt"],
         "would run code stored in the file (it pickles builtins.exec)"),
    Case("evil_pretrained", ["model.load_pretrained=True", "model.pretrained=@evil_state"],
         "lavis-plugins convert --trust"),
    Case("evil_vit_path", ["model.vit_model=eva_clip_g", "model.vit_path=@evil_state"],
         "model.vit_path: refusing to load"),
    Case("empty_resume", ["run.resume_ckpt_path=@empty"], "is empty (0 bytes)"),
    Case("text_resume", ["run.resume_ckpt_path=@text"], "is a text file (starts with '<html>"),
    Case("truncated_resume", ["run.resume_ckpt_path=@truncated"], "is truncated or damaged"),
    Case("list_resume", ["run.resume_ckpt_path=@list"], "holds a list, not a training checkpoint"),
    Case("convert_untrusted", command=["convert", "@evil_ckpt", "@root/converted.pth"],
         expect="pass --trust only if you trust"),
    # --- run folders: nothing is lost
    Case("first_run", job="done", code=0),
    Case("rerun_finished", job="done", expect="already holds a finished run",
         check=_finished_run_untouched),
    Case("resume_into_it", ["run.resume_ckpt_path=@out/done/checkpoint_latest.pth"], job="done",
         code=0, setup=_prepare_done, check=_resumed_and_cleaned),
    Case("force_replaces", argv=["--force"], job="done", code=0, check=_finished_run_untouched),
    Case("live_lock", setup=lambda env: _lock(env, "live_lock", os.getppid()),
         expect="is in use by process"),
    Case("stale_lock", setup=lambda env: _lock(env, "stale_lock", _dead_pid()), code=0,
         check=_stale_lock_taken_over),
    Case("disk_full", ["run.ckpt_freq=1", "run.iters_per_epoch=3"],
         "No space left on device; free disk space", check=_previous_checkpoint_intact),
    Case("read_only", ["run.ckpt_freq=1", "run.iters_per_epoch=3"],
         "Read-only file system; check that run.output_dir is writable",
         check=lambda env: _previous_checkpoint_intact(env, "read_only")),
    # --- divergence: exit 3, the step not applied, no NaN saved
    Case("diverge", ["run.init_lr=1e30", "run.warmup_steps=0", "run.iters_per_epoch=4",
                     "run.ckpt_freq=1"], "training diverged", code=3, check=_no_nan_saved),
    # --- data
    Case("no_caption", _data("no_caption"), "record 3 has a bad 'caption' (missing)"),
    Case("int_caption", _data("int_caption"), "record 2 has a bad 'caption' (5)"),
    Case("empty_annotations", _data("empty_list"), "is an empty list"),
    Case("missing_image", _data("missing_image"), "does not exist"),
    Case("empty_image", _data("empty_image"), "is empty (0 bytes)"),
    Case("truncated_image", _data("truncated_image"), "cannot be decoded"),
    Case("text_image", _data("text_image"), "cannot be decoded"),
    Case("skip_bad", _data("truncated_image", "run.on_bad_sample=skip",
                           "run.max_bad_fraction=0.2"), code=0, check=_skipped_counted),
    Case("too_many_bad", _data("truncated_image", "run.on_bad_sample=skip",
                               "run.max_bad_fraction=0.01"), "could not be read"),
    Case("cache_bad_meta", ["datasets.lp_shapes_caption.feature_cache=@bad_meta"],
         "meta.json is unreadable"),
    Case("cache_truncated", ["datasets.lp_shapes_caption.feature_cache=@truncated_npy"],
         "damaged or truncated"),
    Case("cache_few_rows", ["datasets.lp_shapes_caption.feature_cache=@few_rows"],
         "holds shape [1, 3, 4] but meta.json says [2, 3, 4]"),
    Case("cache_views_zero", ["datasets.lp_shapes_caption.feature_cache=@two_views",
                              "datasets.lp_shapes_caption.feature_cache_views=0"],
         "datasets.lp_shapes_caption.feature_cache_views=0: must be a whole number >= 1"),
    Case("cache_views_text", ["datasets.lp_shapes_caption.feature_cache=@two_views",
                              "datasets.lp_shapes_caption.feature_cache_views=many"],
         "feature_cache_views='many': must be a whole number >= 1"),
    Case("cache_views_float", ["datasets.lp_shapes_caption.feature_cache=@two_views",
                               "datasets.lp_shapes_caption.feature_cache_views=2.5"],
         "feature_cache_views=2.5: must be a whole number >= 1"),
    Case("cache_views_alone", ["datasets.lp_shapes_caption.feature_cache_views=2"],
         "feature_cache_views is set but datasets.lp_shapes_caption.feature_cache is not"),
    Case("cache_views_mismatch", ["datasets.lp_shapes_caption.feature_cache=@two_views",
                                  "datasets.lp_shapes_caption.feature_cache_views=3"],
         "holds 2 view(s) per image but the config asks for feature_cache_views=3"),
    Case("cache_views_rows", ["datasets.lp_shapes_caption.feature_cache=@two_views"],
         "holds 2 view(s) per image but the config asks for feature_cache_views=1"),
]


@pytest.fixture(scope="module")
def env(lp, tiny_bert_dir, shapes_home, tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("bad_input")
    yaml = root / "smoke.yaml"
    yaml.write_text(SMOKE.format(bert=tiny_bert_dir, out=root / "out", iters=2))
    return Env(root, yaml, _make_files(root, shapes_home))


def _snapshot(root: Path, skip: Path) -> Dict[str, tuple]:
    """Size and mtime of every file under ``root`` but ``skip``'s (the shapes images, thousands
    of files the manifest already guards, are not walked: it keeps each case fast)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "images" and Path(folder, d) != skip]
        for name in files:
            st = os.stat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def _fill(text: str, env: Env, port: int) -> str:
    subs = {"@root": str(env.root), "@out": str(env.out), "@port": str(port),
            **{f"@{k}": str(v) for k, v in env.files.items()}}
    for k in sorted(subs, key=len, reverse=True):
        text = text.replace(k, subs[k])
    return text


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case: Case, env: Env, capsys, monkeypatch):
    from lavis_plugins.cli import main

    monkeypatch.chdir(env.root)  # where an evil pickle would write its marker
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    port = _free_port()
    for k, v in case.environ.items():
        monkeypatch.setenv(k, _fill(v, env, port))
    if case.name in FAILING_WRITES:
        _failing_save(monkeypatch, FAILING_WRITES[case.name])
    job = case.job or case.name
    if case.setup:
        case.setup(env)
    if case.command:
        argv = [_fill(a, env, port) for a in case.command]
    else:
        argv = ["train", "--cfg-path", str(env.yaml), "--job-id", job, *case.argv]
        if case.options:
            argv += ["--options", *[_fill(o, env, port) for o in case.options]]
    before = _snapshot(env.root, env.out / job)
    before_run = _snapshot(env.out / job, env.root / "none")
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "lavis-plugins: error:" in line]
    assert code == case.code, err[-3000:]
    if case.code:
        assert len(errors) == 1 and case.expect in errors[0], err[-3000:]
        assert "Traceback" not in err
        after_run = _snapshot(env.out / job, env.root / "none")
        assert {k: after_run.get(k) for k in before_run} == before_run, "the run folder changed"
    else:
        assert not errors, err[-3000:]
    assert not (env.root / MARKER).exists(), "pickled code ran"
    assert _snapshot(env.root, env.out / job) == before, "files outside the run folder changed"
    if case.check:
        case.check(env)


def test_convert_trusted_file_then_loads_weights_only(env, capsys, monkeypatch, tmp_path):
    """``convert --trust`` runs the file's code (the marker appears: that is what trust means),
    drops the non-data object and writes a file every load path accepts."""
    from lavis_plugins.cli import main
    from lavis_plugins.common.safe_load import load_weights

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "converted.pth"
    src = tmp_path / "trusted.pth"
    torch.save({"model": {"w": torch.arange(3.0)}, "epoch": np.int64(4), "arr": np.ones(2),
                "hook": Evil(), "when": datetime.date(2024, 1, 1)}, src)
    assert main(["convert", "--trust", str(src), str(out)]) == 0
    printed = capsys.readouterr().out
    assert (tmp_path / MARKER).exists() and "dropped 1" in printed
    obj = load_weights(out)
    assert torch.equal(obj["model"]["w"], torch.arange(3.0)) and obj["epoch"] == 4
    assert torch.equal(obj["arr"], torch.ones(2, dtype=torch.float64))
    assert obj["hook"] is None and "when" not in obj  # exec's result; the date is no data
    st = tmp_path / "converted.safetensors"
    assert main(["convert", "--trust", str(src), str(st)]) == 0
    assert torch.equal(load_weights(st)["w"], torch.arange(3.0))


def test_no_load_path_runs_pickled_code(env, monkeypatch, tiny_bert_dir, tmp_path):
    """The load paths the CLI table does not reach (stage 2's ``stage1_checkpoint`` /
    ``pretrained`` / ``finetuned``, a transformers folder's ``.bin``, the text-LM export, the
    Python API's ``checkpoint``) refuse a pickle that runs code, naming the conversion command."""
    from lavis_plugins.api import load_model
    from lavis_plugins.common.errors import UserError
    from lavis_plugins.models._blip2_llm import load_pth
    from lavis_plugins.models.hf_format import read_hf_state_dict
    from lavis_plugins.models.text_lm import export_checkpoint

    monkeypatch.chdir(tmp_path)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "blip-2"}')
    shutil.copy(env.files["evil_state"], hf / "pytorch_model.bin")
    evil = str(env.files["evil_state"])
    paths = {
        "stage-2 stage1_checkpoint/pretrained/finetuned": lambda: load_pth(evil),
        "transformers folder .bin": lambda: read_hf_state_dict(str(hf)),
        "text-LM export": lambda: export_checkpoint(evil, tmp_path / "export"),
        "load_model(checkpoint=...)": lambda: load_model(
            "lp_blip2_qformer", "tiny", checkpoint=evil, bert_path=str(tiny_bert_dir)),
        # what LAVIS's own load_checkpoint / ViT builders do while the CLI or API builds a model
        "LAVIS's torch.load in model building": lambda: _lavis_style_load(evil),
    }
    for name, load in paths.items():
        with pytest.raises(UserError, match="would run code stored in the file") as e:
            load()
        assert "lavis-plugins convert --trust" in str(e.value), name
        assert not (tmp_path / MARKER).exists(), f"{name}: pickled code ran"
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored after model building


def _lavis_style_load(path: str):
    from lavis_plugins.common.safe_load import weights_only_loads

    with weights_only_loads([path]):
        return torch.load(path, map_location="cpu")  # as LAVIS calls it: no weights_only


def test_video_qa_annotations_empty_or_with_bad_text_are_refused(lp, tmp_path):
    """An empty video-QA file (which made the generate protocol divide by zero) and records
    whose question or answer is not text are refused when the dataset is built."""
    from lavis_plugins.common.errors import UserError
    from lavis_plugins.datasets.video_datasets import VideoQADataset

    def build(records):
        path = tmp_path / "qa.json"
        path.write_text(json.dumps(records))
        return VideoQADataset(vis_root=str(tmp_path), ann_paths=[str(path)])

    good = {"video": "a.mp4", "question": "what colour?", "answer": "red"}
    assert len(build([good])) == 1
    with pytest.raises(UserError, match="hold no records"):
        build([])
    with pytest.raises(UserError, match=r"record 1 has a bad 'question' \(7\)"):
        build([good, {**good, "question": 7}])
    with pytest.raises(UserError, match=r"record 0 has a bad 'answer' \(''\)"):
        build([{**good, "answer": ""}])
