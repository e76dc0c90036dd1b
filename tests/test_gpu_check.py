"""benchmarks/gpu (issue #15's prepared GPU check): its dry run on the CPU, the budget that kills
a check without losing its results, the summary into docs/benchmarks.md rows, the wheel
repacking, and their bad-input messages. No GPU: the dry run is the same code path at tiny sizes,
so the script cannot rot while no GPU is at hand."""
from __future__ import annotations

import json
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

GPU = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"
sys.path[:0] = [str(GPU), str(GPU.parent)]

import gpu_check  # noqa: E402
import summary  # noqa: E402


def test_dry_run_measures_every_check_and_summarises(lp, tmp_path, monkeypatch, capsys):
    """The whole script, checks a-f, on the CPU at tiny sizes, in this process."""
    import torch
    from lavis.models.blip2_models.blip2 import Blip2Base

    # the benchmark builders patch these for LAVIS's models (one process, our encoder): restore
    # them for the tests that run after this one
    for obj, name in ((torch.distributed, "get_rank"), (torch.distributed, "get_world_size"),
                      (Blip2Base, "init_vision_encoder")):
        monkeypatch.setattr(obj, name, getattr(obj, name))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LP_GPU_CHECK_SKIP_PARTS", "")  # --skip-parts sets it; restored after
    out = tmp_path / "out"
    # compile is left out here: its CPU compilation takes minutes (tests/test_compile.py covers
    # run.compile; test_dry_run_compile_part, marked slow, runs this part)
    assert gpu_check.main(["--dry-run", "--in-process", "--skip-parts", "compile",
                           "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dry_run"] and list(res["checks"]) == list(gpu_check.CHECKS)
    c = res["checks"]
    assert all(r["status"] == "ok" for k, r in c.items() if k != "f"), \
        {k: r.get("error") for k, r in c.items()}
    # a: the parity selection still collects its cases; bf16 within its tolerance; no NaN
    assert c["a"]["parity_fp32"]["collected"] >= 12
    bf16 = c["a"]["bf16_vs_fp32"]
    assert max(bf16["relative_diff"][k] for k in bf16["checked"]) <= bf16["tolerance"]
    assert all(c["a"]["fp16_gradscaler"][k]["all_finite"] for k in ("ours", "lavis"))
    # b: the CLI run under torchrun logged every step; the collective gave the right values
    assert c["b"]["torchrun_1proc"]["ok"] and c["b"]["collective"]["all_reduce_all_gather_ok"]
    # c, d, e: both implementations measured, ratios computed
    for key, impls, field in (("stage1", ("ours", "lavis"), "images_per_s"),
                              ("stage2", ("ours", "lavis"), "gen_tokens_per_s"),
                              ("video_qa", ("ours", "LAVIS"), "videos_per_s")):
        rec = next(r[key] for r in c.values() if key in r)
        assert all(rec[i][field] > 0 for i in impls), key
    assert c["c"]["stage1_feature_cache"]["speedup_cached_over_inline"] > 0
    assert c["e"]["video_qa"]["same_answers_same_frames"] == "2/2"  # fp32: same answers
    # f: fsdp ran through torchrun and the CLI; compile was skipped as asked
    assert c["f"]["fsdp"]["status"] == "ok", c["f"]["fsdp"]
    assert c["f"]["compile"] == {"status": "skipped", "reason": "gpu_check --skip-parts"}
    # the summary turns this JSON into docs/benchmarks.md rows, one check letter per row
    capsys.readouterr()
    assert summary.main([str(out / "results.json"), "--command", "bash run.sh"]) == 0
    table = capsys.readouterr().out
    assert "DRY RUN" in table and "`bash run.sh`" in table
    rows = [x for x in table.splitlines() if x.startswith("| ") and not x.startswith("| check")]
    assert {r.split("|")[1].strip() for r in rows} == set(gpu_check.CHECKS)
    assert any("stage-1 step" in r and ">= 2x" in r for r in rows)



@pytest.mark.slow
def test_dry_run_compile_part(lp, tmp_path, monkeypatch):
    """Check f's run.compile part on the CPU: a tiny stage-1 CLI run compiled with inductor
    (minutes of compilation here, hence slow)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LP_GPU_CHECK_SKIP_PARTS", "")
    out = tmp_path / "out"
    assert gpu_check.main(["--dry-run", "--in-process", "--only", "f", "--skip-parts", "fsdp",
                           "--out", str(out)]) == 0
    f = json.loads((out / "results.json").read_text())["checks"]["f"]
    assert f["compile"]["status"] == "ok" and f["compile"]["steps_logged"] > 0, f["compile"]


def test_skip_parts_names_the_parts(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--dry-run", "--skip-parts", "compil"])
    assert "the parts are compile, fsdp" in capsys.readouterr().err


CHILD = textwrap.dedent("""
    import subprocess, sys, time
    sys.path.insert(0, {gpu!r})
    from _record import Record
    rec = Record({result!r})
    rec.put("first", 1)  # measured before the budget runs out
    grandchild = subprocess.Popen(["sleep", "60"])
    rec.put("grandchild", grandchild.pid)
    time.sleep(60)
    rec.put("second", 2)
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_check_over_budget_is_killed_with_its_children_and_keeps_its_results(tmp_path):
    result = tmp_path / "r.json"
    cmd = [sys.executable, "-c", CHILD.format(gpu=str(GPU), result=str(result))]
    t0 = time.perf_counter()
    rec = gpu_check.run_child(cmd, 3, tmp_path / "x.log", result)
    assert time.perf_counter() - t0 < 20
    assert rec["status"] == "timeout" and "budget of 3 s" in rec["error"]
    assert rec["first"] == 1 and "second" not in rec
    time.sleep(0.2)
    assert not _alive(rec["grandchild"]), "the check's own child outlived the budget"


def test_check_that_exits_non_zero_is_failed(tmp_path):
    rec = gpu_check.run_child([sys.executable, "-c", "import sys; sys.exit(3)"], 30,
                              tmp_path / "x.log", tmp_path / "none.json")
    assert rec["status"] == "failed" and "exit code 3" in rec["error"]


@pytest.mark.parametrize("argv,message", [
    (["--only", "a,z"], "--only: unknown check z; the checks are a, b, c, d, e, f"),
    (["--budget", "c=soon"], "--budget 'c=soon': expected X=SECONDS"),
    (["--budget", "q=10"], "--budget 'q=10': expected X=SECONDS"),
    (["--total-s", "0"], "--total-s 0: must be > 0 seconds"),
])
def test_bad_options_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content,message", [
    (None, "does not exist; give the results.json"),
    ("{not json", "is not JSON"),
    ('{"environment": {}}', 'has no "checks" object'),
])
def test_summary_bad_input_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    assert summary.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_summary_names_a_check_that_timed_out():
    table = summary.summarise({"checks": {"d": {"status": "timeout", "wall_s": 110,
                                                "budget_s": 110,
                                                "error": "killed after its budget of 110 s",
                                                "stage2": {"batch": 16, "gen_batch": 16,
                                                           "new_tokens": 20, "precision": "fp16",
                                                           "ours": {"images_per_s": 50.0}}}}})
    assert "| d | status: timeout | killed after its budget of 110 s |" in table
    assert "| 50.0 | - |" in table  # what it measured before the kill is kept


def test_repacked_wheel_drops_files_and_their_record_lines(tmp_path):
    import wheels

    src, dst = tmp_path / "p-1.0-py3-none-any.whl", tmp_path / "out.whl"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("p/__init__.py", "x = 1\n")
        z.writestr("p/tool.jar", b"\0" * 1000)
        z.writestr("p-1.0.dist-info/RECORD", "p/__init__.py,sha256=a,6\np/tool.jar,sha256=b,1000\n"
                                             "p-1.0.dist-info/RECORD,,\n")
    wheels.repack(src, dst, lambda n: n.endswith(".jar"))
    with zipfile.ZipFile(dst) as z:
        assert sorted(z.namelist()) == ["p-1.0.dist-info/RECORD", "p/__init__.py"]
        assert "tool.jar" not in z.read("p-1.0.dist-info/RECORD").decode()


def test_wheel_without_a_pin_names_the_lock(monkeypatch, tmp_path):
    import wheels

    lock = tmp_path / "requirements.lock"
    lock.write_text("torch==2.5.1\n")
    monkeypatch.setattr(wheels, "LOCK", lock)
    assert wheels.pinned(["torch"]) == {"torch": "2.5.1"}
    with pytest.raises(SystemExit, match="no pin for decord; add it to env/requirements.in"):
        wheels.pinned(["decord"])
