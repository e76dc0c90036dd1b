"""DDP with ``run.on_bad_sample: skip``: a batch whose samples are all unreadable on one rank.

Two forked gloo processes train the runner tests' regressor. Rank 0's batches 0 and 5 and rank
1's batch 2 are wholly unreadable. Before the fix the rank with the empty batch skipped it and
the other rank waited in the gradient all-reduce (a hang; ``run_forked``'s timeout turns it into
a failure). Now that rank runs a stand-in batch with loss weight 0: every rank takes the same
optimizer steps, its gradients add nothing and its loss is not logged.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import run_forked
from test_runner import NoisyPairs, Regressor, _Cfg

BATCH, N, SEED = 4, 48, 7  # 24 samples per rank: 6 batches per epoch
BAD_BATCHES = {0: (0, 5), 1: (2,)}  # rank -> its wholly unreadable batches of epoch 0


def _bad_indices():
    from lavis_plugins.runners.sampling import EpochSampler

    bad = set()
    for rank, batches in BAD_BATCHES.items():
        order = EpochSampler(N, shuffle=True, seed=SEED, rank=rank, world_size=2,
                             equal_shards=True)._indices()
        for b in batches:
            bad.update(order[b * BATCH:(b + 1) * BATCH])
    return bad


class PartlyBad(NoisyPairs):
    def __init__(self, bad):
        super().__init__(n=N)
        self.bad = bad

    def __getitem__(self, i):
        from lavis_plugins.datasets.validation import BadSample

        if i in self.bad:
            raise BadSample(f"image {i}.jpg cannot be decoded")
        return super().__getitem__(i)


class Recording(Regressor):
    """The regressor without dropout; keeps each forward's inputs."""

    def __init__(self):
        super().__init__(dropout=0.0)
        self.inputs = []

    def forward(self, samples):
        self.inputs.append((samples["x"].detach().clone(), samples["y"].detach().clone()))
        return super().forward(samples)


def _worker(rank: int, init_file: str, root: str) -> None:
    import copy

    import torch.distributed as dist
    from lavis.tasks.base_task import BaseTask

    from lavis_plugins.runners.runner import PluginRunner

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = Recording()
    initial = copy.deepcopy(model.state_dict())
    cfg = _Cfg(max_epoch=1, init_lr=1e-2, warmup_steps=0, weight_decay=0.0,
               batch_size_train=BATCH, num_workers=0, seed=SEED, output_dir=root, device="cpu",
               train_splits=["train"], log_freq=1, distributed=True, on_bad_sample="skip",
               max_bad_fraction=0.5)
    runner = PluginRunner(cfg=cfg, task=BaseTask(), model=model,
                          datasets={"pairs": {"train": PartlyBad(_bad_indices())}}, job_id="ddp")
    grads = []  # the averaged gradients each optimizer step applies
    runner.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: grads.append(model.head.weight.grad.detach().clone()))
    runner.train()
    # this rank's own gradient of its first batch at the initial weights (DDP averages it with
    # the other rank's, which is 0 for a stand-in)
    ref = Regressor(dropout=0.0)
    ref.load_state_dict(initial)
    first = [k for k in range(len(model.inputs)) if k not in BAD_BATCHES[rank]][0]
    x, y = model.inputs[first]
    ref({"x": x, "y": y})["loss"].backward()
    torch.save({"grads": grads, "own_grad0": ref.head.weight.grad, "inputs": model.inputs,
                "step": runner.global_step,
                "params": {k: v.detach().clone() for k, v in model.state_dict().items()}},
               Path(root) / f"rank{rank}.pt")
    dist.barrier()


def test_all_bad_batch_on_one_rank_takes_the_same_steps_on_every_rank(lp, tmp_path):
    run_forked(_worker, [(r, str(tmp_path / "init"), str(tmp_path)) for r in range(2)],
               timeout=120)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    # every rank took the 6 steps, and the replicas agree
    assert r0["step"] == r1["step"] == 6
    assert len(r0["grads"]) == len(r1["grads"]) == 6
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    # the stand-in is the next good batch (trained on at its own step), at the end the last
    x0 = [x for x, _ in r0["inputs"]]
    assert len(x0) == 6 and torch.equal(x0[0], x0[1]) and torch.equal(x0[5], x0[4])
    assert torch.equal(r1["inputs"][2][0], r1["inputs"][3][0])
    # weight 0: step 0's gradient is rank 1's alone, averaged over the 2 ranks
    assert torch.allclose(r0["grads"][0], r1["own_grad0"] / 2, atol=1e-7)
    assert torch.equal(r0["grads"][0], r1["grads"][0])
    # rank 0 logs only its own batches' losses, and counts its bad samples
    log = [json.loads(l) for l in (tmp_path / "ddp" / "train_log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [1, 2, 3, 4]
    stats = [json.loads(l) for l in (tmp_path / "ddp" / "log.txt").read_text().splitlines()
             if l.startswith('{"train_')]
    assert stats[-1]["train_data_bad"] == "8" and stats[-1]["train_data_samples"] == "24"
