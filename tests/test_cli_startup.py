"""Start-up (issue 17): help imports neither LAVIS nor torch and answers in under 2 s, the
dependency warnings are filtered, and LAVIS's repeated log line is gone."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest

from conftest import REPO

PROBE = """
import sys, time
start = time.perf_counter()
import lavis_plugins_cli
try:
    code = lavis_plugins_cli.main({argv!r})
except SystemExit as e:
    code = e.code
print("RESULT", code, round(time.perf_counter() - start, 3),
      sorted(m for m in ("lavis", "torch", "transformers") if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["evaluate", "--help"],
                                  ["predict", "--help"], ["cache-features", "--help"],
                                  ["zoo", "--help"], ["projects"]])
def test_help_is_fast_and_imports_neither_lavis_nor_torch(argv):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    _, code, seconds, heavy = line.split(" ", 3)
    assert code in ("0", "None") and heavy == "[]", (line, proc.stderr[-2000:])
    assert float(seconds) < 2.0, line
    if argv == ["train", "--help"]:  # the run-section options, with meaning and default
        for key in ("max_epoch", "batch_size_train", "accum_grad_iters", "tensorboard"):
            assert key in proc.stdout
        assert "lp_linear_warmup_cosine" in proc.stdout
    if argv == ["projects"]:
        assert "projects/blip2/train/pretrain_stage1.yaml" in proc.stdout
        assert "projects/demo/stage1.yaml" in proc.stdout


def test_missing_cfg_path_points_at_the_projects_command(capsys, tmp_path):
    from lavis_plugins.cli import main

    assert main(["train", "--cfg-path", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "`lavis-plugins projects`" in err and len(err.strip().splitlines()) == 1


def test_progress_lines_are_whole_lines_in_files():
    from lavis_plugins.common.progress import LineProgress, progress

    stream = io.StringIO()  # not a TTY: plain lines, no carriage returns
    bar = progress(3, "train epoch 0", stream=stream)
    assert isinstance(bar, LineProgress)
    bar.interval = 0.0
    for _ in range(3):
        bar.update(1)
        bar.set_postfix(loss="1.2345")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 4
    assert lines[-1].startswith("train epoch 0: 3/3 it (100%)") and "loss=1.2345" in lines[-1]
    slow = LineProgress(100, "x", interval=3600, stream=io.StringIO())
    for _ in range(100):
        slow.update()
    slow.close()
    assert len(slow.stream.getvalue().splitlines()) == 1  # only the final line
