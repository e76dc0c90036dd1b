"""The README's install commands, as written, into fresh virtual environments (slow: two venvs
filled from uv's local cache, about a minute each; no network needed once `make setup` ran)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

LOCK = "env/requirements-py310.lock" if sys.version_info < (3, 11) else "env/requirements.lock"
# `python3 -m uv` prefers the interpreter that runs it unless --python names one: always name it
UV = ["python3", "-m", "uv"]


def _run(cmd, cwd=REPO, env=None, timeout=900):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _venv(path: Path) -> Path:
    _run([*UV, "venv", "-q", "--seed", "--python", sys.executable, str(path)])
    return path / "bin" / "python"


def _check_installed(python: Path, cwd: Path) -> None:
    """The installed wheel (not the source tree: run elsewhere) works: help, the shipped YAMLs,
    and a tiny model."""
    exe = python.parent / "lavis-plugins"
    assert "predict" in _run([str(exe), "--help"], cwd=cwd)
    assert "projects/demo/stage1.yaml" in _run([str(exe), "projects"], cwd=cwd)
    out = _run([str(python), "-c", "import lavis_plugins, os; "
                "assert 'site-packages' in lavis_plugins.__file__, lavis_plugins.__file__; "
                "print(type(lavis_plugins.load_model('lp_blip2_opt', 'tiny')).__name__)"], cwd=cwd)
    assert "LPBlip2OPT" in out


def test_uv_install_into_your_own_environment(tmp_path):
    python = _venv(tmp_path / "env")
    # README: uv pip install -c <lock> --override env/overrides.txt .   (environment active)
    _run([*UV, "pip", "install", "-q", "--python", str(python), "-c", LOCK, "--override",
          "env/overrides.txt", "."], env={"UV_OFFLINE": "1"})
    _check_installed(python, tmp_path)


def test_pip_install_into_your_own_environment(tmp_path):
    python = _venv(tmp_path / "env")
    # the lock's packages, as `pip install --no-deps -r <lock>` would download them (here from
    # uv's cache, so the test needs no network); then the README's pip commands, offline
    _run([*UV, "pip", "install", "-q", "--no-deps", "--python", str(python), "-r", LOCK],
         env={"UV_OFFLINE": "1"})
    offline = {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "-r", LOCK], env=offline)
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "."],
         env=offline)
    _check_installed(python, tmp_path)
