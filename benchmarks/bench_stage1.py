"""Time one BLIP-2 stage-1 training step (forward + backward + AdamW) of lp_blip2_qformer against
LAVIS's Blip2Qformer on the same config, batch and device, and their peak memory.

    .venv/bin/python benchmarks/bench_stage1.py                      # CPU, small config, 3 sides
    .venv/bin/python benchmarks/bench_stage1.py --captions coco      # COCO-like caption lengths
    .venv/bin/python benchmarks/bench_stage1.py --device cuda --real-size --batch 64

Default (CPU): Q-Former hidden 256, 4 layers, 32 queries, tiny ViT (224 px, patch 14: 257 tokens,
width 256, 2 blocks), batch 16, one torch thread. ``--captions``: ``uniform`` 5-15 words,
``coco`` lengths drawn from ``caption_lengths_coco.json`` (long-tailed, see its "source"),
``full`` every caption as long as max_txt_len (the case where padding to the longest saves
nothing). ``--real-size``: EVA ViT-g (random weights, fp16 on CUDA) and a BERT-base-sized Q-Former
(12 x 768, 30.5k vocabulary), fp16 autocast on CUDA as LAVIS's runner, same settings on all sides.

Sides (``--sides``): ours; LAVIS 1.0.2 in its own environment (``make bench-env``, transformers
4.26.1); LAVIS in our environment (transformers 4.46). Each side runs in a fresh process, in
turns (``--rounds``; the order reverses every round), so that load drift hits all sides; the
figure is the median step over all rounds, in process CPU time on the CPU (steadier than wall
time on a shared machine) and wall time on CUDA. Memory: one more fresh process per side, no
warm-up: on CUDA ``max_memory_allocated`` above the built model, on the CPU the peak resident
size above the built model (the step's activations, gradients and AdamW state; Linux
``clear_refs`` + ``VmHWM``) and the whole process's peak (``getrusage``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import (CAPTION_KINDS, SIDES, WORDS, PeakRss, add_common_args,  # noqa: E402
                           alternate, captions, child_argv, lavis_single_process,
                           lavis_vision_encoder, median, run_side, sides_of, table, train_step)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--real-size", action="store_true", help="ViT-g + BERT-base Q-Former")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=1)
    add_common_args(p)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--vit-width", type=int, default=256)
    p.add_argument("--vit-depth", type=int, default=2)
    p.add_argument("--max-txt-len", type=int, default=32)
    p.add_argument("--captions", choices=CAPTION_KINDS, default="uniform",
                   help="caption lengths: 5-15 words, COCO-like, or all max_txt_len")
    p.add_argument("--full-captions", action="store_const", const="full", dest="captions",
                   help="the same as --captions full")
    p.add_argument("--memory-run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bert-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_bert(args, root: Path) -> Path:
    from lavis_plugins.common.tiny_bert import make_tiny_bert

    # the captions' words are whole tokens, as in BERT's vocabulary
    if args.real_size:  # BERT-base sizes, vocabulary padded to about BERT's 30.5k
        hidden, layers, heads, words = 768, 12, 12, WORDS + [f"w{i}" for i in range(30_300)]
    else:
        hidden, layers, heads, words = args.hidden, args.layers, max(1, args.hidden // 64), WORDS
    # LAVIS loads the literal name "bert-base-uncased" from the working directory
    return make_tiny_bert(root / "bert-base-uncased", words=words, hidden_size=hidden,
                          num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=4 * hidden, max_position_embeddings=512)


def vit_settings(args) -> dict:
    """The image encoder of every side, as plain values (the LAVIS side has no lavis_plugins)."""
    if args.real_size:  # fp16 weights as LAVIS's default; the CPU cannot run them
        precision = "fp16" if args.device.startswith("cuda") else "fp32"
        return dict(vit_model="eva_clip_g", vit_path="random", vit_precision=precision,
                    image_size=224)
    return dict(vit_model="tiny", vit_precision="fp32", image_size=224,
                tiny_vit=dict(width=args.vit_width, depth=args.vit_depth,
                              heads=max(1, args.vit_width // 64), patch_size=14, mlp_ratio=4.0))


def build(args, bert_dir: Path):
    """The side's model (``ours``: lp_blip2_qformer; else LAVIS's Blip2Qformer)."""
    vit = vit_settings(args)
    if args.impl == "ours":
        from lavis_plugins.models.blip2_qformer import Blip2QformerConfig, LPBlip2Qformer

        return LPBlip2Qformer(Blip2QformerConfig(
            bert_path=str(bert_dir), num_query_token=args.queries,
            max_txt_len=args.max_txt_len, **vit))

    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    lavis_vision_encoder(vit)
    lavis_single_process()
    os.chdir(bert_dir.parent)  # LAVIS loads "bert-base-uncased" from the working directory
    return Blip2Qformer(vit_model=vit["vit_model"], img_size=vit["image_size"],
                        vit_precision=vit["vit_precision"], num_query_token=args.queries,
                        max_txt_len=args.max_txt_len)






def run_impl(args) -> dict:
    """One side in this process: timed steps, or (``--memory-run``) the memory of two steps."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args, Path(args.bert_dir)).to(args.device)
    model.train()
    cuda = args.device.startswith("cuda")
    samples = {"image": torch.randn(args.batch, 3, 224, 224, device=args.device),
               "text_input": captions(args.batch, args.captions, args.max_txt_len)}
    step = train_step(model, samples, amp=cuda and args.real_size)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if args.memory_run:  # a fresh process: nothing of an earlier step is resident
        meter = PeakRss()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            meter.start()
        for _ in range(2):
            step()
        sync()
        above = ((torch.cuda.max_memory_allocated() - base) / 2**20 if cuda
                 else meter.above_mb())
        return {"impl": args.impl, "peak_mb": above, "process_mb": PeakRss.process_mb()}
    for _ in range(args.warmup):
        step()
    sync()
    times, cpu_times = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return {"impl": args.impl, "times": times, "cpu_times": cpu_times}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.impl:
        print("RESULT " + json.dumps(run_impl(args)), flush=True)
        return
    sides = sides_of(args)
    cuda = args.device.startswith("cuda")
    key = "times" if cuda else "cpu_times"

    def show(r, side, res):
        print(f"round {r} {SIDES[side]:>16s}: median step {median(res['times']) * 1e3:8.1f} ms "
              f"wall, {median(res['cpu_times']) * 1e3:8.1f} ms CPU", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        bert_dir = make_bert(args, Path(tmp))
        cmd = child_argv(__file__, argv, "--bert-dir", str(bert_dir))
        results = alternate(cmd, args, show)
        memory = {s: run_side(cmd + ["--memory-run"], s, args) for s in sides}

    t = {s: median([x for r in v for x in r[key]]) for s, v in results.items()}
    size = "real size (ViT-g, 12x768 Q-Former)" if args.real_size else (
        f"Q-Former {args.layers}x{args.hidden}, tiny ViT {args.vit_depth}x{args.vit_width}")
    words = {"uniform": "5-15 word", "coco": "COCO-like", "full": "full-length"}[args.captions]
    rows = [[f"step ({'ms' if cuda else 'ms CPU'})"] + [f"{t[s] * 1e3:.1f}" for s in sides],
            ["peak above model (MB)"] + [f"{memory[s]['peak_mb']:.0f}" for s in sides]]
    if not cuda:
        rows.append(["process peak RSS (MB)"] + [f"{memory[s]['process_mb']:.0f}" for s in sides])
    if "ours" in sides:
        rows.append(["speed-up of ours"]
                    + [f"{t[s] / t['ours']:.2f}x" if s != "ours" else "" for s in sides])
    print("\n" + table(f"stage-1 training step, {size}, {args.queries} queries, batch "
                       f"{args.batch}, {words} captions, {args.device}, {args.threads or 'default'}"
                       f" thread(s), {args.rounds} rounds x {args.steps} steps", rows, sides))


if __name__ == "__main__":
    main()
