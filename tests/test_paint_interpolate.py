"""``lavis-plugins interpolate`` (PAINT): alpha 0 and 1 give the inputs bit for bit, other alphas
the formula, weights equal in both stay untouched, mismatched checkpoints and bad alpha lists are
one clear line, and --eval-cfg evaluates every alpha into a table and a plot."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from lavis_plugins import cli
from lavis_plugins.cli.interpolate import parse_alphas
from lavis_plugins.common.errors import UserError


def _states():
    g = torch.Generator().manual_seed(0)
    zero = {"Qformer.w": torch.randn(4, 3, generator=g),
            "half.w": torch.randn(5, generator=g).half(),
            "frozen.w": torch.randn(2, 2, generator=g),  # the same in both: must stay untouched
            "position_ids": torch.arange(6)}
    fine = {k: (v + torch.randn(v.shape, generator=g).to(v.dtype)
                if k in ("Qformer.w", "half.w") else v.clone()) for k, v in zero.items()}
    return zero, fine


def _save(path: Path, state, wrap=True) -> Path:
    torch.save({"model": state} if wrap else state, path)
    return path


def test_alpha_lists():
    assert parse_alphas("0.0,0.1,...,1.0") == [round(0.1 * i, 10) for i in range(11)]
    assert parse_alphas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_alphas("1, 0,0.3") == [1.0, 0.0, 0.3]
    for bad, msg in (("", "is empty"), ("0,x", "not a number"), ("0,1.5", "outside [0, 1]"),
                     ("0,0.5,0.5", "repeats"), ("0,...,1", "a,b,...,c"), ("0:1", "start:stop"),
                     ("0:1:0.3", "evenly"), ("1:0:0.1", "positive step"), ("nan", "finite")):
        with pytest.raises(UserError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            parse_alphas(bad)


def test_ends_are_the_inputs_bit_for_bit_and_the_middle_is_the_formula(tmp_path, capsys):
    zero, fine = _states()
    zp, fp = _save(tmp_path / "zero.pth", zero), _save(tmp_path / "fine.pth", fine, wrap=False)
    out = tmp_path / "paint"
    assert cli.main(["interpolate", "--zero-shot", str(zp), "--finetuned", str(fp),
                     "--alpha", "0,0.3,1", "--out", str(out)]) == 0
    read = {a: torch.load(out / f"alpha_{a}.pth", weights_only=True)
            for a in ("0.00", "0.30", "1.00")}
    for k in zero:
        assert torch.equal(read["0.00"]["model"][k], zero[k])
        assert read["0.00"]["model"][k].dtype == zero[k].dtype
        assert torch.equal(read["1.00"]["model"][k], fine[k])
    mid = read["0.30"]["model"]
    assert torch.allclose(mid["Qformer.w"], 0.7 * zero["Qformer.w"] + 0.3 * fine["Qformer.w"])
    assert mid["half.w"].dtype == torch.float16
    assert torch.allclose(mid["half.w"].float(),
                          0.7 * zero["half.w"].float() + 0.3 * fine["half.w"].float(),
                          atol=2e-3)
    assert torch.equal(mid["frozen.w"], zero["frozen.w"])
    assert torch.equal(mid["position_ids"], zero["position_ids"])
    assert read["0.30"]["interpolation"]["alpha"] == 0.3


@pytest.mark.parametrize("case", ["missing", "extra", "shape", "dtype", "int", "not_weights",
                                  "no_file", "alpha"])
def test_bad_input_is_one_clear_line(case, tmp_path, capsys):
    zero, fine = _states()
    expect = {"missing": "only in", "extra": "only in", "shape": "shape or dtype",
              "dtype": "shape or dtype", "int": "only floating-point",
              "not_weights": "refusing to load", "no_file": "file not found",
              "alpha": "outside [0, 1]"}[case]
    alpha = "0,0.5,1"
    if case == "missing":
        del fine["Qformer.w"]
    elif case == "extra":
        fine["momentum.w"] = torch.zeros(1)
    elif case == "shape":
        fine["Qformer.w"] = torch.zeros(3, 4)
    elif case == "dtype":
        fine["Qformer.w"] = fine["Qformer.w"].double()
    elif case == "int":
        fine["position_ids"] = fine["position_ids"] + 1
    elif case == "alpha":
        alpha = "0,2"
    zp, fp = _save(tmp_path / "zero.pth", zero), _save(tmp_path / "fine.pth", fine)
    if case == "not_weights":  # arbitrary pickled objects are refused, never unpickled
        fp.write_bytes(pickle.dumps({"model": {"x": Path("/")}}))
    if case == "no_file":
        fp.unlink()
    rc = cli.main(["interpolate", "--zero-shot", str(zp), "--finetuned", str(fp), "--alpha",
                   alpha, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and expect in err[0], err


def test_eval_cfgs_evaluate_every_alpha_into_a_table_and_plot(lp, tmp_path, tiny_bert_dir,
                                                             capsys):
    from test_zeroshot_classification import _png, _yaml

    torch.manual_seed(0)
    model = lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir))
    zero = {k: v.clone() for k, v in model.state_dict().items()}
    fine = {k: v + 0.3 * torch.randn_like(v) if v.is_floating_point() else v
            for k, v in zero.items()}
    zp, fp = _save(tmp_path / "zero.pth", zero), _save(tmp_path / "fine.pth", fine)
    folder = tmp_path / "images" / "test"
    for c, name in enumerate(["cat", "dog", "red_circle"]):
        _png(folder / name / "0.png", c)
    yaml = _yaml(tmp_path, tiny_bert_dir, zp, folder)
    out = tmp_path / "paint"
    assert cli.main(["interpolate", "--zero-shot", str(zp), "--finetuned", str(fp), "--alpha",
                     "0,0.5,1", "--out", str(out), "--eval-cfg", str(yaml), "--label", "top1",
                     "--eval-cfg", str(yaml), "--label", "mean_class",
                     "--metric", "mean_per_class"]) == 0
    table = json.loads((out / "interpolation.json").read_text())
    assert [r["alpha"] for r in table["rows"]] == [0.0, 0.5, 1.0]
    assert (out / "interpolation.png").is_file()
    assert "| alpha |" in (out / "interpolation.md").read_text()
    # alpha 0's row is the zero-shot checkpoint's own evaluation
    _, direct = cli.run(str(yaml), ["model.finetuned=" + str(zp)], evaluate_only=True,
                        job_id="direct")
    assert table["rows"][0]["top1"] == pytest.approx(direct["test"]["mean_per_class"])
    # a metric the task does not report is named
    capsys.readouterr()
    assert cli.main(["interpolate", "--zero-shot", str(zp), "--finetuned", str(fp), "--alpha",
                     "0", "--out", str(tmp_path / "o2"), "--eval-cfg", str(yaml),
                     "--metric", "bleu"]) == 2
    assert "reported no 'bleu'" in capsys.readouterr().err


def test_eval_labels_must_match_the_eval_cfgs(tmp_path, capsys):
    zero, fine = _states()
    zp, fp = _save(tmp_path / "zero.pth", zero), _save(tmp_path / "fine.pth", fine)
    base = ["interpolate", "--zero-shot", str(zp), "--finetuned", str(fp), "--out",
            str(tmp_path / "out")]
    for extra, expect in ((["--eval-cfg", "a.yaml", "--label", "x", "--label", "y"],
                           "--label given 2 times for 1 --eval-cfg"),
                          (["--eval-cfg", "a.yaml", "--eval-cfg", "b/a.yaml"],
                           "evaluation labels repeat")):
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expect in err[0], err
    assert not (tmp_path / "out").exists()  # nothing written before the checks
