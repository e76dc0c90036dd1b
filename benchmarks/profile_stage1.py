"""Where a stage-1 training step spends its work: CPU time and floating-point operations per
part (image encoder, image keys/values, the four Q-Former passes, the rest of the forward,
backward, AdamW) of lp_blip2_qformer and of LAVIS's Blip2Qformer, each in its own environment.

    .venv/bin/python benchmarks/profile_stage1.py                      # 5-15-word captions
    .venv/bin/python benchmarks/profile_stage1.py --captions full      # every caption 32 tokens

Same config and options as ``bench_stage1.py`` (whose step times are the speed figures). The
passes are the Q-Former calls of one forward in their order: ITC queries, ITC text, ITM (3B
image-text pairs), ITG; ours projects the image features to cross-attention keys/values once
("image K/V"), LAVIS inside every pass. FLOPs are counted by torch's FLOP counter in one step
with attention on SDPA's math backend (so that the counter sees its matrix products); they do
not depend on the machine's load and bound what doing less work can gain: the ratio of the
totals is the speed-up at equal efficiency. CPU times are medians over ``--steps`` uncounted
steps per round, each side in a fresh process, in turns.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_stage1 as bench  # noqa: E402
from _bench_common import (SIDES, alternate, captions, child_argv, median,  # noqa: E402
                           train_step)

PASSES = ("ITC queries", "ITC text", "ITM", "ITG")  # Q-Former calls of one forward, in order
PARTS = ("image encoder", "image K/V", *PASSES, "rest of forward", "backward", "AdamW")


class Sections:
    """CPU seconds and FLOPs of the wrapped calls of one step, by part. ``counter`` (a
    ``FlopCounterMode`` or None) is read before and after each call."""

    def __init__(self):
        self.counter = None
        self.seconds, self.flops, self.calls = {}, {}, 0

    def reset(self, counter=None) -> None:
        self.counter, self.seconds, self.flops, self.calls = counter, {}, {}, 0

    def _flops(self) -> int:
        return self.counter.get_total_flops() if self.counter is not None else 0

    def add(self, part: str, seconds: float, flops: int) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + seconds
        self.flops[part] = self.flops.get(part, 0) + flops

    def wrap(self, obj, name: str, part) -> None:
        """Replace ``obj.name`` (a method, or a module's forward) by a timed, counted call;
        ``part`` is a name, or a callable giving it from the call's index in the step."""
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            label = part if isinstance(part, str) else part(self)
            f0, c0 = self._flops(), time.process_time()
            out = inner(*args, **kwargs)
            self.add(label, time.process_time() - c0, self._flops() - f0)
            return out

        setattr(obj, name, timed)


def pass_name(sections: Sections) -> str:
    i = sections.calls
    sections.calls += 1
    return PASSES[i] if i < len(PASSES) else f"pass {i}"


def profile_step(model, samples, sections: Sections, counter=None) -> None:
    """One step (forward, backward, AdamW) with its parts recorded in ``sections``."""
    import torch

    sections.reset(counter)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = getattr(model, "_profile_opt", None)
    if opt is None:
        opt = model._profile_opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98),
                                                     weight_decay=0.05)
    f0, c0 = sections._flops(), time.process_time()
    loss = model(samples)["loss"]
    forward_s, forward_f = time.process_time() - c0, sections._flops() - f0
    sections.add("rest of forward", forward_s - sum(sections.seconds.values()),
                 forward_f - sum(sections.flops.values()))
    f0, c0 = sections._flops(), time.process_time()
    loss.backward()
    sections.add("backward", time.process_time() - c0, sections._flops() - f0)
    f0, c0 = sections._flops(), time.process_time()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sections.add("AdamW", time.process_time() - c0, sections._flops() - f0)


def run_impl(args) -> dict:
    """This side: FLOPs per part of one counted step, then CPU ms per part of timed steps."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = bench.build(args, Path(args.bert_dir))
    model.train()
    samples = {"image": torch.randn(args.batch, 3, 224, 224),
               "text_input": captions(args.batch, args.captions, args.max_txt_len)}
    sections = Sections()
    sections.wrap(model.visual_encoder, "forward", "image encoder")
    if hasattr(model.Qformer.bert, "image_kv"):  # ours: image keys/values outside the passes
        sections.wrap(model.Qformer.bert, "image_kv", "image K/V")
    sections.wrap(model.Qformer.bert, "forward", pass_name)
    for _ in range(args.warmup):
        train_step(model, samples, amp=False)()
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        profile_step(model, samples, sections, counter)
    flops = {k: v / 1e9 for k, v in sections.flops.items()}
    times = []
    for _ in range(args.steps):
        profile_step(model, samples, sections)
        times.append(dict(sections.seconds))
    return {"impl": args.impl, "gflop": flops, "times": times}


def main(argv=None) -> None:
    args = bench.parse_args(argv)
    if args.impl:
        print("RESULT " + json.dumps(run_impl(args)), flush=True)
        return

    def show(r, side, res):
        total = median([sum(t.values()) for t in res["times"]])
        print(f"round {r} {SIDES[side]:>16s}: median step {total * 1e3:8.1f} ms CPU", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        bert_dir = bench.make_bert(args, Path(tmp))
        results = alternate(child_argv(__file__, argv, "--bert-dir", str(bert_dir)), args, show)
    sides = list(results)
    ms = {s: {p: median([t.get(p, 0.0) for r in v for t in r["times"]]) * 1e3 for p in PARTS}
          for s, v in results.items()}
    gf = {s: v[0]["gflop"] for s, v in results.items()}
    words = {"uniform": "5-15 word", "coco": "COCO-like", "full": "full-length"}[args.captions]
    print(f"\nstage-1 step by part, Q-Former {args.layers}x{args.hidden}, tiny ViT "
          f"{args.vit_depth}x{args.vit_width}, {args.queries} queries, batch {args.batch}, "
          f"{words} captions, cpu, {args.threads or 'default'} thread(s), {args.rounds} rounds x "
          f"{args.steps} steps (CPU ms: median per part; GFLOP: one step)")
    head = "".join(f"{SIDES[s] + ' ms':>18s}{SIDES[s] + ' GFLOP':>20s}" for s in sides)
    print(f"{'part':18s}{head}")
    for part in (*PARTS, "total"):
        row = ""
        for s in sides:
            t = sum(ms[s].values()) if part == "total" else ms[s][part]
            g = sum(gf[s].values()) if part == "total" else gf[s].get(part, 0.0)
            row += f"{t:18.1f}{g:20.2f}"
        print(f"{part:18s}{row}")


if __name__ == "__main__":
    main()
