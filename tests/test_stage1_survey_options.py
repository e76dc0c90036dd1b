"""The stage-1 options from the survey: CyCLIP's cyclic consistency terms and ALBEF's momentum
distillation, through load_model, the CLI (training, resume) and two DDP processes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_forked
from torch import nn

from lavis_plugins import cli
from lavis_plugins.common.errors import UserError

CAPTIONS = ["a red circle", "a blue square on the left", "two green triangles",
            "a small yellow circle", "a large blue triangle at the top", "a purple square"]


def _samples(lo=0, hi=4):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randn(6, 3, 32, 32, generator=g)[lo:hi], "text_input": CAPTIONS[lo:hi]}


def _no_dropout(m: nn.Module) -> nn.Module:
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
        if hasattr(mod, "dropout_p"):
            mod.dropout_p = 0.0
    return m


def _model(lp, bert, **options):
    torch.manual_seed(0)
    m = lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(bert), **options)
    with torch.no_grad():  # away from init, so images and captions differ clearly
        for name, p in m.named_parameters():
            if name != "temp":
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return _no_dropout(m).train()


# ------------------------------------------------------------------------------------ CyCLIP


def test_cyclip_terms_equal_a_direct_computation(lp, tiny_bert_dir):
    model = _model(lp, tiny_bert_dir, cyclip=True)
    out = model(_samples())
    with torch.no_grad():
        img = model.extract_features(_samples(), mode="image").image_embeds_proj  # (B, Nq, E)
        txt = torch.stack([model.extract_features({"text_input": [c]}, mode="text")
                           .text_embeds_proj[0, 0] for c in CAPTIONS[:4]])  # (B, E)
    b = len(txt)
    cross = inmodal = 0.0
    for j in range(b):
        for k in range(b):
            s_jk = max(float(img[j, q] @ txt[k]) for q in range(img.shape[1]))
            s_kj = max(float(img[k, q] @ txt[j]) for q in range(img.shape[1]))
            cross += (s_jk - s_kj) ** 2
            s_ii = sum(float(img[j, q] @ img[k, q]) for q in range(img.shape[1])) / img.shape[1]
            inmodal += (s_ii - float(txt[j] @ txt[k])) ** 2
    assert float(out.loss_cyclip_crossmodal) == pytest.approx(cross / b, rel=1e-4, abs=1e-7)
    assert float(out.loss_cyclip_inmodal) == pytest.approx(inmodal / b, rel=1e-4, abs=1e-7)
    assert cross > 0 and inmodal > 0
    base = out.loss_itc + out.loss_itm + out.loss_itg
    torch.testing.assert_close(out.loss - base, 0.25 * (out.loss_cyclip_inmodal
                                                        + out.loss_cyclip_crossmodal))
    out.loss.backward()  # the terms train the model
    assert model.vision_proj.weight.grad.abs().sum() > 0


def test_cyclip_terms_vanish_for_symmetric_similarities():
    from lavis_plugins.models.stage1_losses import cyclip_losses

    text = F.normalize(torch.randn(5, 8), dim=-1)
    image = text[:, None].expand(5, 3, 8)  # every query is its caption's feature
    cos = (image @ text.t()).max(dim=1).values  # symmetric: <t_j, t_k>
    inmodal, cross = cyclip_losses(cos, cos.t(), image, image, text, text)
    assert abs(float(inmodal)) < 1e-10 and abs(float(cross)) < 1e-10  # zero up to rounding
    skew = torch.randn(5, 5)
    _, cross = cyclip_losses(cos + skew, (cos + skew).t(), image, image, text, text)
    assert float(cross) == pytest.approx(float((skew - skew.t()).square().sum()) / 5, rel=1e-5)


def test_options_are_off_by_default(lp, tiny_bert_dir):
    model = _model(lp, tiny_bert_dir)
    out = model(_samples())
    assert out.loss_cyclip_inmodal is None and out.loss_cyclip_crossmodal is None
    torch.testing.assert_close(out.loss, out.loss_itc + out.loss_itm + out.loss_itg)
    assert not hasattr(model, "momentum_model")
    assert not any(k.startswith("momentum") for k in model.state_dict())


@pytest.mark.parametrize("key,value,expect", [
    ("cyclip", "yes", "cyclip must be true or false"),
    ("cyclip_inmodal_weight", -0.1, "cyclip_inmodal_weight = -0.1 is out of range"),
    ("momentum_distill", 1, "momentum_distill must be true or false"),
    ("momentum", 1.0, "momentum = 1.0 is out of range"),
    ("distill_alpha", 1.5, "distill_alpha = 1.5 is out of range"),
    ("distill_alpha", "0.4", "distill_alpha = '0.4' is out of range"),
])
def test_bad_option_values_are_named(lp, tiny_bert_dir, key, value, expect):
    with pytest.raises(UserError, match=expect):
        lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir), **{key: value})


# ------------------------------------------------------------------------ momentum distillation


def test_momentum_model_follows_the_ema_formula(lp, tiny_bert_dir):
    model = _model(lp, tiny_bert_dir, momentum_distill=True)
    names = model.momentum_model.names
    assert names and all(n.startswith(("Qformer.", "query_tokens", "vision_proj.", "text_proj."))
                         for n in names)
    assert not any(n.startswith("momentum") for n, _ in model.named_parameters())
    ema = lambda: {n: b.clone() for n, b in model.momentum_model.weights.named_buffers()}  # noqa
    model(_samples())  # first step: the EMA starts as a copy of the weights
    params = dict(model.named_parameters())
    for n, b in ema().items():
        assert torch.equal(b, params[n].detach())
    before = ema()
    with torch.no_grad():  # an optimizer step
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model(_samples())
    for n, b in ema().items():
        torch.testing.assert_close(b, 0.995 * before[n] + 0.005 * params[n].detach(),
                                   rtol=0, atol=1e-6)
    state = model.state_dict()  # checkpointed with the model's buffers
    assert f"momentum_model.weights.{names[0]}" in state and "momentum_model.initialised" in state


def test_alpha_zero_gives_the_plain_losses_exactly(lp, tiny_bert_dir):
    plain = _model(lp, tiny_bert_dir)
    distilled = _model(lp, tiny_bert_dir, momentum_distill=True, distill_alpha=0.0)
    a, b = plain(_samples()), distilled(_samples())
    assert torch.equal(a.loss_itc, b.loss_itc) and torch.equal(a.loss_itg, b.loss_itg)
    # alpha > 0 after the first epoch: the targets move towards the momentum model's
    full = _model(lp, tiny_bert_dir, momentum_distill=True)
    c = full({**_samples(), "epoch": 1, "iters": 0, "num_iters_per_epoch": 10})
    assert not torch.equal(a.loss_itc, c.loss_itc)


def test_alpha_ramps_up_over_the_first_epoch():
    from lavis_plugins.models.momentum import ramped_alpha

    at = lambda **s: float(ramped_alpha(0.4, s, torch.device("cpu")))  # noqa: E731
    assert at(epoch=0, iters=0, num_iters_per_epoch=10) == 0.0
    assert at(epoch=0, iters=5, num_iters_per_epoch=10) == pytest.approx(0.2)
    assert at(epoch=1, iters=0, num_iters_per_epoch=10) == pytest.approx(0.4)
    assert at() == pytest.approx(0.4)


def _train_yaml(tmp_path: Path, bert: Path) -> Path:
    from test_zeroshot_classification import _png

    folder = tmp_path / "data" / "train"
    for c, name in enumerate(["red_circle", "blue_square"]):
        for j in range(4):
            _png(folder / name / f"{j}.png", 10 * c + j)
    path = tmp_path / "train.yaml"
    path.write_text(f"""# lavis-plugins train --cfg-path {path}
model:
  arch: lp_blip2_qformer
  model_type: tiny
  bert_path: {bert}
  momentum_distill: True
  cyclip: True
datasets:
  lp_imagefolder:
    build_info:
      splits: {{train: {folder}}}
      caption_templates: ["a {{}}", "there is a {{}}"]
    vis_processor:
      train: {{name: blip_image_eval, image_size: 32}}
run:
  task: lp_image_text_pretrain
  runner: lp_runner
  init_lr: 1e-3
  max_epoch: 2
  batch_size_train: 4
  num_workers: 0
  log_freq: 1
  device: cpu
  output_dir: {tmp_path}/out
  train_splits: [train]
  valid_splits: []
  test_splits: []
""")
    return path


def test_training_with_both_options_resumes_exactly(lp, tmp_path, tiny_bert_dir):
    """Through the CLI: a run resumed from its epoch-0 checkpoint logs the same epoch-1 losses
    (distillation and CyCLIP terms included) and ends with the same momentum weights."""
    yaml = _train_yaml(tmp_path, tiny_bert_dir)
    full, _ = cli.run(str(yaml), [], evaluate_only=False, job_id="full")
    resumed, _ = cli.run(str(yaml), [f"run.resume_ckpt_path={full.output_dir}/checkpoint_0.pth"],
                         evaluate_only=False, job_id="resumed")
    log = lambda r: [json.loads(x) for x in (Path(r.output_dir) / "train_log.jsonl")  # noqa
                     .read_text().splitlines()]
    ref = [r for r in log(full) if r["epoch"] == 1]
    got = log(resumed)
    assert len(got) == len(ref) == 2
    for a, b in zip(got, ref):
        for k in ("loss", "loss_itc", "loss_itg", "loss_cyclip_inmodal", "loss_cyclip_crossmodal"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), k
    from lavis_plugins.cli.interpolate import read_weights  # weights-only reader

    end_full = read_weights(Path(full.output_dir) / "checkpoint_1.pth", "full")
    end_res = read_weights(Path(resumed.output_dir) / "checkpoint_1.pth", "resumed")
    ema_keys = [k for k in end_full if k.startswith("momentum_model.")]
    assert len(ema_keys) > 10
    for k in ema_keys:
        assert torch.equal(end_full[k], end_res[k]), k
    # the EMA moved away from its starting copy, and lags the trained weights
    start = read_weights(Path(full.output_dir) / "checkpoint_0.pth", "epoch 0")
    k = "momentum_model.weights.vision_proj.weight"
    assert not torch.equal(start[k], end_full[k])
    assert not torch.equal(end_full[k], end_full["vision_proj.weight"])


# ---------------------------------------------------------------------------------- DDP

B = 3


def _losses(out):
    return out.loss_itc + 0.25 * (out.loss_cyclip_inmodal + out.loss_cyclip_crossmodal)


def _worker(rank: int, init_file: str, model, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    # the loss leaves ITM out (its negatives are random): DDP must be told some weights get no
    # gradient, or it never all-reduces
    ddp = DDP(model, find_unused_parameters=True)
    out = ddp(_samples(rank * B, rank * B + B))
    loss = _losses(out)
    loss.backward()  # DDP averages the gradients
    losses = [torch.zeros(()) for _ in range(2)]
    dist.all_gather(losses, loss.detach())
    ema = {n: b.clone() for n, b in model.momentum_model.weights.named_buffers()}
    torch.save({"loss": torch.stack(losses).mean(), "ema": ema,
                "grads": {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None}}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_ddp_processes_equal_one_process_with_double_batch(lp, tmp_path, tiny_bert_dir):
    """Distilled ITC + CyCLIP terms under DDP (gloo, forked): the mean loss, the averaged
    gradients of the projections and the momentum weights equal one process with batch 2B."""
    model = _model(lp, tiny_bert_dir, momentum_distill=True, cyclip=True)
    run_forked(_worker, [(r, str(tmp_path / "init"), model, str(tmp_path)) for r in range(2)])
    out = model(_samples(0, 2 * B))
    ref = _losses(out)
    ref.backward()
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(got[0]["loss"], ref.detach(), rtol=1e-5, atol=1e-6)
    for n, b in model.momentum_model.weights.named_buffers():
        assert torch.equal(got[0]["ema"][n], got[1]["ema"][n]), n  # identical copies
        torch.testing.assert_close(got[0]["ema"][n], b)
    for n in ("vision_proj.weight", "text_proj.weight"):
        g = model.get_parameter(n).grad
        torch.testing.assert_close(got[0]["grads"][n], g, rtol=1e-3, atol=1e-3 * g.abs().max())
        assert g.abs().sum() > 0
