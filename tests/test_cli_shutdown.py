"""How ``lavis-plugins`` leaves a process group at exit (``cli._shut_down_process_group``): a
finished gloo run waits for every rank (bounded) before destroying the group, so torch < 2.8's
gloo destructor cannot deadlock on the GIL; a failed command leaves at once."""
from __future__ import annotations

import types

import pytest

from lavis_plugins import cli


def _fake_dist(monkeypatch, backend: str = "gloo", initialized: bool = True,
               barrier_error: Exception = None) -> list:
    calls: list = []

    def barrier(timeout):
        calls.append(("barrier", timeout.total_seconds()))
        if barrier_error is not None:
            raise barrier_error

    fake = types.SimpleNamespace(
        is_available=lambda: True, is_initialized=lambda: initialized,
        get_backend=lambda: backend, monitored_barrier=barrier,
        destroy_process_group=lambda: calls.append(("destroy",)))
    monkeypatch.setitem(cli.sys.modules, "torch.distributed", fake)
    return calls


def test_a_finished_gloo_run_waits_for_every_rank_then_destroys_the_group(monkeypatch):
    calls = _fake_dist(monkeypatch)
    cli._shut_down_process_group(finished=True)
    assert calls == [("barrier", float(cli.EXIT_BARRIER_SECONDS)), ("destroy",)]


@pytest.mark.parametrize("finished,backend", [(False, "gloo"), (True, "nccl")])
def test_a_failed_command_or_another_backend_destroys_without_waiting(monkeypatch, finished,
                                                                      backend):
    calls = _fake_dist(monkeypatch, backend=backend)
    cli._shut_down_process_group(finished=finished)
    assert calls == [("destroy",)]


def test_a_rank_that_never_arrives_is_left_behind_with_one_warning(monkeypatch, caplog):
    calls = _fake_dist(monkeypatch, barrier_error=RuntimeError("rank 1 failed to pass"))
    cli._shut_down_process_group(finished=True)
    assert calls[-1] == ("destroy",)
    assert "not every rank reached the end of the run" in caplog.text


def test_no_group_no_calls(monkeypatch):
    calls = _fake_dist(monkeypatch, initialized=False)
    cli._shut_down_process_group(finished=True)
    assert calls == []


def test_main_reports_whether_the_command_finished(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(cli, "_shut_down_process_group", seen.append)
    assert cli.main(["projects"]) == 0
    assert cli.main(["interpolate", "--zero-shot", str(tmp_path / "missing.pth"), "--finetuned",
                     str(tmp_path / "missing.pth"), "--out", str(tmp_path / "out")]) == 2
    assert seen == [True, False]  # the refused command: no barrier
