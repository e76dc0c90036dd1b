"""``run.strategy: fsdp``: options, wrap plan per model, sharded checkpoints, and 2 gloo processes.

torch 2.5.1's FullyShardedDataParallel runs on the CPU with gloo (``device_id=cpu``; FSDP2
``fully_shard`` needs CUDA), so the real sharded path is tested here: two forked processes train
a small model under FSDP and under DDP and log the same losses; a run killed after a sharded
checkpoint resumes to the uninterrupted run's losses; the checkpoint folder has one shard file
per process. The runner's own behaviour (schedule, accumulation, ...) is tested in
``test_runner.py`` with the same regression model.
"""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import run_forked
from test_runner import NoisyPairs, Regressor, _Cfg


class _Block(nn.Module):
    """A residual block: what FSDP shards as one unit."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, width) -> (B, width)
        return x + torch.relu(self.fc(self.norm(x)))


class BlockRegressor(Regressor):
    """The runner tests' regressor with two repeated blocks and a frozen part."""

    def __init__(self, dim: int = 6, **kw) -> None:
        super().__init__(dim=dim, dropout=0.0, **kw)
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.frozen_blocks = nn.ModuleList([_Block(), _Block()]).requires_grad_(False)

    def forward(self, samples):
        self.calls += 1
        if self.fail_at_call is not None and self.calls == self.fail_at_call:
            raise KeyboardInterrupt("simulated kill")
        h = torch.relu(self.embed(samples["x"]))
        for b in [*self.frozen_blocks, *self.blocks]:
            h = b(h)
        pred = self.head(h)
        loss_mse = ((pred - samples["y"]) ** 2).mean()
        return {"loss": loss_mse, "loss_mse": loss_mse}


def _runner(tmp_path, model, job, **run):
    from lavis.tasks.base_task import BaseTask

    from lavis_plugins.runners.runner import PluginRunner

    base = dict(max_epoch=2, init_lr=1e-2, min_lr=1e-4, warmup_steps=2, weight_decay=0.05,
                batch_size_train=4, num_workers=0, seed=7, output_dir=str(tmp_path),
                device="cpu", train_splits=["train"], log_freq=1, strategy="fsdp")
    base.update(run)
    return PluginRunner(cfg=_Cfg(**base), task=BaseTask(), model=model,
                        datasets={"pairs": {"train": NoisyPairs(n=32)}}, job_id=job)


def _losses(folder: Path):
    return [json.loads(l)["loss"] for l in (folder / "train_log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------- options
@pytest.mark.parametrize("key,value,fragment", [
    ("strategy", "fsdpp", "did you mean fsdp"),
    ("strategy", "deepspeed", "one of ddp, fsdp"),
    ("fsdp_sharding", "full", "one of full_shard, shard_grad_op, hybrid_shard, no_shard"),
    ("fsdp_mixed_precision", "fp16", "one of none, bf16"),
    ("fsdp_cpu_offload", "yes", "true or false"),
])
def test_bad_option_values_are_one_line(key, value, fragment):
    from lavis_plugins.common.config_check import check_run
    from lavis_plugins.common.errors import UserError

    with pytest.raises(UserError, match=fragment):
        check_run({key: value})
    check_run({"strategy": "fsdp", "fsdp_sharding": "shard_grad_op",
               "fsdp_mixed_precision": "bf16", "fsdp_cpu_offload": False})


@pytest.mark.parametrize("run,fragment", [
    ({"fsdp_sharding": "full_shard"}, "run.strategy is 'ddp'"),
    ({"strategy": "fsdp", "fsdp_cpu_offload": True}, "needs CUDA"),
    ({"strategy": "fsdp", "amp": True, "amp_dtype": "fp16"}, "run.amp_dtype: bf16"),
    ({"strategy": "fsdp", "compile": True}, "run.compile: true with run.strategy: fsdp"),
])
def test_option_combinations_that_cannot_work_are_refused(run, fragment):
    from lavis_plugins.common.errors import UserError
    from lavis_plugins.runners.fsdp import FSDPSettings

    with pytest.raises(UserError, match=fragment):
        FSDPSettings.from_run(run, torch.device("cpu"))


def test_settings_defaults_and_ddp():
    from lavis_plugins.runners.fsdp import FSDPSettings

    assert FSDPSettings.from_run({}, torch.device("cpu")) is None
    s = FSDPSettings.from_run({"strategy": "FSDP", "fsdp_mixed_precision": "BF16"},
                              torch.device("cpu"))
    assert (s.sharding, s.mixed_precision, s.cpu_offload) == ("full_shard", "bf16", False)


# ------------------------------------------------------------------------------- wrap plan
def test_wrap_plan_of_each_blip2_model(lp, tiny_bert_dir, tmp_path):
    """Units are the repeated blocks: the ViT's blocks, and the LLM's layers (OPT, FlanT5) in
    stage 2. The Q-Former's layers are not (their cross-attention weights are read before they
    run): the Q-Former is sharded within the root unit."""
    from lavis_plugins.api import load_model
    from lavis_plugins.common.tiny_llm import make_tiny_opt, make_tiny_t5
    from lavis_plugins.runners.fsdp import plan

    def names(model):
        p = plan(model)
        return sorted(c.__name__ for c in p.unit_classes), p.ignored_names

    stage1 = load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir))
    # FSDP refuses 0-d parameters: the learned temperature stays whole, its gradient averaged
    assert names(stage1) == (["Block"], ["temp"])
    opt = load_model("lp_blip2_opt", "tiny", bert_path=str(tiny_bert_dir),
                     opt_model=str(make_tiny_opt(tmp_path / "opt")))
    assert names(opt) == (["Block", "OPTDecoderLayer"], [])
    t5 = load_model("lp_blip2_t5", "tiny", bert_path=str(tiny_bert_dir),
                    t5_model=str(make_tiny_t5(tmp_path / "t5")))
    assert names(t5) == (["Block", "T5Block"], [])


def test_wrap_plan_keeps_frozen_parts_in_another_dtype_whole():
    """FSDP flattens one unit's weights into one tensor: a frozen half-precision part is left
    out of sharding; trainable weights in two dtypes are refused with the fix."""
    from lavis_plugins.common.errors import UserError
    from lavis_plugins.runners.fsdp import plan

    model = BlockRegressor()
    model.frozen.half()  # a frozen fp16 leaf at the root, beside fp32 trainable weights
    # a frozen block with fp16 linears and an fp32 LayerNorm (as LAVIS's vit_precision: fp16):
    # the larger dtype is sharded, the smaller part kept whole
    model.frozen_blocks[0].fc.half()
    p = plan(model)
    assert [c.__name__ for c in p.unit_classes] == ["_Block"]
    assert sorted(p.ignored_names) == ["frozen", "frozen_blocks.0.norm"]

    model.head.half()
    with pytest.raises(UserError, match="trainable weights mix dtypes"):
        plan(model)


# ----------------------------------------------------------------- checkpoints, one process
def test_one_process_writes_sharded_folders_and_resumes_exactly(lp, tmp_path):
    """strategy: fsdp in one process trains unwrapped but writes the same checkpoint folders
    (so a run moves between 1 and N processes), and resumes them exactly."""
    torch.manual_seed(0)
    full = _runner(tmp_path, BlockRegressor(), "full", ckpt_freq=4)
    full.train()
    ref = _losses(full.output_dir)

    torch.manual_seed(0)
    killed = _runner(tmp_path, BlockRegressor(fail_at_call=7), "killed", ckpt_freq=4)
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    folder = killed.output_dir / "checkpoint_step4.dcp"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp",
                                                        "trainer_state.pth"]
    assert (killed.output_dir / "checkpoint_latest.pth").resolve() == folder.resolve()
    assert not list(killed.output_dir.glob("*.tmp"))

    torch.manual_seed(0)  # frozen weights are not in checkpoints: they come from the model's files
    model = BlockRegressor()
    torch.manual_seed(123)  # a different process state: the checkpoint must restore it all
    resumed = _runner(tmp_path, model, "resumed", ckpt_freq=4,
                      resume_ckpt_path=str(killed.output_dir / "checkpoint_latest.pth"))
    resumed.train()
    assert _losses(resumed.output_dir) == pytest.approx(ref[4:], rel=1e-6, abs=1e-7)


def test_resume_refuses_the_other_strategys_checkpoint_and_unsafe_folders(lp, tmp_path):
    from lavis_plugins.common.errors import UserError

    torch.manual_seed(0)
    sharded = _runner(tmp_path, BlockRegressor(), "sharded", max_epoch=1)
    sharded.train()
    folder = sharded.output_dir / "checkpoint_0.dcp"
    plain = _runner(tmp_path, BlockRegressor(), "plain", max_epoch=1, strategy="ddp")
    plain.train()
    pth = plain.output_dir / "checkpoint_0.pth"

    with pytest.raises(UserError, match="written by run.strategy: fsdp"):
        _runner(tmp_path, BlockRegressor(), "a", strategy="ddp",
                resume_ckpt_path=str(folder)).train()
    with pytest.raises(UserError, match="not a sharded checkpoint folder"):
        _runner(tmp_path, BlockRegressor(), "b", resume_ckpt_path=str(pth)).train()
    with pytest.raises(UserError, match="does not match the model"):
        _runner(tmp_path, BlockRegressor(dim=5), "c", resume_ckpt_path=str(folder)).train()

    class Boom:  # an index that would run code when unpickled
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(UserError, match="not a readable sharded checkpoint.*print"):
        _runner(tmp_path, BlockRegressor(), "d", resume_ckpt_path=str(folder)).train()


# ------------------------------------------------------------------------- two processes
def _two_process_worker(rank: int, init_file: str, root: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    root_p = Path(root)

    def run(job, make, perturb=False, **kw):
        torch.manual_seed(0)  # the same weights in every run (frozen ones are not saved)
        model = make()
        if perturb:  # another process state: a resume must restore it all
            torch.manual_seed(123 + rank)
        r = _runner(root_p, model, job, distributed=True, **kw)
        return r, r.train()

    run("ddp", BlockRegressor, strategy="ddp")
    runner, _ = run("fsdp", BlockRegressor, ckpt_freq=2)
    if rank == 0:  # the sharded path was taken: one unit per block, shards on both ranks
        from torch.distributed.fsdp import FullyShardedDataParallel

        units = [m for m in runner.model.modules() if isinstance(m, FullyShardedDataParallel)]
        (root_p / "units.txt").write_text(str(len(units)))
    run("fsdp_bf16", BlockRegressor, fsdp_mixed_precision="bf16")
    run("fsdp_grad_op", BlockRegressor, fsdp_sharding="shard_grad_op", max_grad_norm=0.5)
    run("ddp_clip", BlockRegressor, strategy="ddp", max_grad_norm=0.5)
    try:
        run("killed", lambda: BlockRegressor(fail_at_call=7), ckpt_freq=2)
    except KeyboardInterrupt:
        pass
    run("resumed", BlockRegressor, ckpt_freq=2, perturb=True,
        resume_ckpt_path=str(root_p / "killed" / "checkpoint_latest.pth"))
    dist.barrier()


def test_two_gloo_processes_fsdp_equals_ddp_and_resumes_exactly(lp, tmp_path):
    run_forked(_two_process_worker, [(r, str(tmp_path / "init"), str(tmp_path))
                                     for r in range(2)], timeout=600)
    assert (tmp_path / "units.txt").read_text() == "5"  # root + 4 blocks
    ddp, sharded = _losses(tmp_path / "ddp"), _losses(tmp_path / "fsdp")
    assert len(sharded) == len(ddp) == 8  # 2 epochs x 32 samples / (2 ranks x 4)
    # same data, same averaged gradients; only the order of float sums differs
    assert sharded == pytest.approx(ddp, rel=1e-5, abs=1e-6)
    assert _losses(tmp_path / "fsdp_grad_op") == pytest.approx(_losses(tmp_path / "ddp_clip"),
                                                               rel=1e-5, abs=1e-6)
    # bf16 compute: close to float32, not equal
    bf16 = _losses(tmp_path / "fsdp_bf16")
    assert bf16 == pytest.approx(ddp, rel=3e-2) and bf16 != ddp

    # 4 steps per epoch; killed in epoch 1 at its third batch, after the step-6 checkpoint
    folder = tmp_path / "killed" / "checkpoint_step6.dcp"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp",
                                                        "__1_0.distcp", "trainer_state.pth"]
    state = torch.load(folder / "trainer_state.pth", weights_only=True)
    assert (state["global_step"], state["world_size"], len(state["rng"])) == (6, 2, 2)
    assert _losses(tmp_path / "resumed") == pytest.approx(sharded[6:], rel=1e-6, abs=1e-7)

    # the same folder resumes in one process (DCP reshards on load): the run goes on at step 7,
    # through the rest of epoch 1 (8 batches of 4 per epoch in one process, 2 of them done)
    torch.manual_seed(0)
    one = _runner(tmp_path, BlockRegressor(), "one_process", resume_ckpt_path=str(folder))
    one.train()
    log = [json.loads(l) for l in (one.output_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(7, 13))
    assert all(math.isfinite(r["loss"]) for r in log)


# ------------------------------------------------------- BLIP-2 models, two processes
CAPTIONS = ["a red circle", "a blue square on the left", "two green triangles",
            "a small yellow circle"]


def _blip2_worker(rank: int, init_file: str, models: dict, out: str) -> None:
    """Two AdamW steps of each model under DDP and under FSDP; rank 0 saves both loss lists."""
    import copy

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lavis_plugins.runners import fsdp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=g)[2 * rank:2 * rank + 2]
    samples = {"image": images, "text_input": CAPTIONS[2 * rank:2 * rank + 2],
               "text_output": ["yes", "no"]}
    result = {}
    for name, model in models.items():
        for strategy in ("ddp", "fsdp"):
            m = copy.deepcopy(model)
            params = [p for p in m.parameters() if p.requires_grad]  # groups before wrapping
            opt = torch.optim.AdamW(params, lr=1e-3)
            wrapped = (fsdp.wrap(m, fsdp.FSDPSettings(), torch.device("cpu"))
                       if strategy == "fsdp" else DDP(m))
            if name == "opt":  # OPT without padding rows, its layers sharded or not
                from lavis_plugins.models._opt_packed import supports_packing

                assert supports_packing(m.opt_model.get_decoder()), strategy
            losses = []
            torch.manual_seed(rank)  # ITM draws hard negatives: the same draws in both runs
            for _ in range(2):
                loss = wrapped(dict(samples))["loss"]
                loss.backward()
                if strategy == "fsdp":  # what the runner's step calls (averages temp's grad)
                    fsdp.grad_norm(wrapped, None)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.detach())
            result[(name, strategy)] = torch.stack(losses)
            if strategy == "fsdp":  # the sharded state of every weight (query_tokens (1, ...))
                from torch.distributed.checkpoint.state_dict import get_state_dict

                from lavis_plugins.runners.sharded_checkpoint import _options

                model_sd, optim_sd = get_state_dict(wrapped, opt, options=_options())
                assert "query_tokens" in model_sd and optim_sd["state"]
    if rank == 0:
        torch.save(result, Path(out) / "blip2.pt")
    dist.barrier()


def test_blip2_models_under_fsdp_train_as_under_ddp(lp, tiny_bert_dir, tmp_path):
    """(a) stage 1 with the ViT unfrozen (ViT blocks sharded, the Q-Former in the root unit,
    ITC gathering across processes, the 0-d temperature averaged by hand) and (b) stage 2 with
    the frozen LLM's layers sharded (OPT, FlanT5): the same losses over two optimizer steps as
    DDP."""
    from lavis_plugins.api import load_model
    from lavis_plugins.common.tiny_llm import make_tiny_opt, make_tiny_t5

    torch.manual_seed(0)
    models = {
        "stage1_vit_unfrozen": load_model("lp_blip2_qformer", "tiny", freeze_vit=False,
                                          bert_path=str(tiny_bert_dir)),
        "opt": load_model("lp_blip2_opt", "tiny", bert_path=str(tiny_bert_dir),
                          opt_model=str(make_tiny_opt(tmp_path / "opt"))),
        "t5": load_model("lp_blip2_t5", "tiny", bert_path=str(tiny_bert_dir),
                         t5_model=str(make_tiny_t5(tmp_path / "t5"))),
    }
    for m in models.values():
        m.eval()  # no dropout: both strategies must compute the same function
    assert any(p.requires_grad for p in models["stage1_vit_unfrozen"].visual_encoder.parameters())
    run_forked(_blip2_worker, [(r, str(tmp_path / "init"), models, str(tmp_path))
                               for r in range(2)], timeout=600)
    result = torch.load(tmp_path / "blip2.pt")
    for name in models:
        ddp, sharded = result[(name, "ddp")], result[(name, "fsdp")]
        assert ddp[1] != ddp[0]  # the first step changed the weights
        torch.testing.assert_close(sharded, ddp, rtol=1e-5, atol=1e-6,
                                   msg=f"{name}: fsdp {sharded.tolist()} ddp {ddp.tolist()}")


# ------------------------------------------------------------------- the CLI (public API)
def test_cli_train_with_strategy_fsdp_writes_sharded_checkpoint(lp, tmp_path, tiny_bert_dir,
                                                                shapes_home, capsys):
    """``lavis-plugins train --options run.strategy=fsdp``: the YAML path, one process; a bad
    value is one line and exit status 2."""
    from test_cli_train import _yaml

    from lavis_plugins.cli import main

    cfg = str(_yaml(tmp_path, tiny_bert_dir, iters=2))
    assert main(["train", "--cfg-path", cfg, "--options", "run.strategy=fsdpp"]) == 2
    assert "run.strategy is 'fsdpp'" in capsys.readouterr().err
    assert main(["train", "--cfg-path", cfg, "--job-id", "fsdp",
                 "--options", "run.strategy=fsdp"]) == 0
    folder = tmp_path / "out" / "fsdp" / "checkpoint_0.dcp"
    assert {".metadata", "__0_0.distcp", "trainer_state.pth"} == {p.name for p in folder.iterdir()}
    state = torch.load(folder / "trainer_state.pth", weights_only=True)
    assert state["config"]["run"]["strategy"] == "fsdp" and state["global_step"] == 2


def _torchrun(tmp_path, cfg: str, job: str, *options: str, nproc: int = 2):
    """``torchrun -m lavis_plugins.cli train`` with ``--options``; the run's logged losses."""
    import os
    import subprocess
    import sys

    from test_cli_train import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m",
           "lavis_plugins.cli", "train", "--cfg-path", cfg, "--job-id", job, "--options",
           *options]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _losses(tmp_path / "out" / job)


def _check_torchrun_fsdp(tmp_path, tiny_bert_dir, device: str) -> None:
    """2 processes: fsdp logs DDP's losses (bf16: close), and a second launch resumed from the
    mid-epoch sharded checkpoint logs the uninterrupted run's losses."""
    from test_cli_train import _yaml

    cfg = str(_yaml(tmp_path, tiny_bert_dir, iters=4))
    common = (f"run.device={device}", "run.ckpt_freq=2")
    ddp = _torchrun(tmp_path, cfg, "ddp", *common)
    full = _torchrun(tmp_path, cfg, "full", "run.strategy=fsdp", *common)
    # stage 1's ITM draws hard negatives from softmaxed similarities: a last-bit difference in
    # them can pick another negative, so the tolerance is looser than for the regressor
    assert full == pytest.approx(ddp, rel=1e-3, abs=1e-4)
    folder = tmp_path / "out" / "full" / "checkpoint_step2.dcp"
    assert {p.name for p in folder.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp",
                                                  "trainer_state.pth"}
    resumed = _torchrun(tmp_path, cfg, "resumed", "run.strategy=fsdp", *common,
                        f"run.resume_ckpt_path={folder}")
    assert resumed == pytest.approx(full[2:], rel=1e-6, abs=1e-7)
    if device == "cuda":  # the options that need CUDA or only matter there
        bf16 = _torchrun(tmp_path, cfg, "bf16_offload", "run.strategy=fsdp", *common,
                         "run.fsdp_mixed_precision=bf16", "run.fsdp_cpu_offload=true")
        assert bf16 == pytest.approx(ddp, rel=5e-2)


@pytest.mark.slow
def test_cli_torchrun_two_processes_fsdp_resume(tiny_bert_dir, shapes_home, tmp_path):
    """``torchrun --nproc_per_node=2 -m lavis_plugins.cli train`` with run.strategy=fsdp on
    the CPU (gloo)."""
    _check_torchrun_fsdp(tmp_path, tiny_bert_dir, "cpu")


@pytest.mark.gpu
def test_cli_torchrun_two_gpus_fsdp(tiny_bert_dir, shapes_home, tmp_path):
    """The same on 2 GPUs (NCCL), plus bf16 mixed precision with CPU offload
    (``run_scripts/fsdp_gpu_check.sh``)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    _check_torchrun_fsdp(tmp_path, tiny_bert_dir, "cuda")
