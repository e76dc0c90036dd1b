"""Time one BLIP-2 stage-1 training step (forward + backward + AdamW) of lp_blip2_qformer against
LAVIS's Blip2Qformer on the same config, batch and device, and their peak memory.

    .venv/bin/python benchmarks/bench_stage1.py                      # CPU, small config
    .venv/bin/python benchmarks/bench_stage1.py --device cuda --real-size --batch 64

Default (CPU): Q-Former hidden 256, 4 layers, 32 queries, tiny ViT (224 px, patch 14: 257 tokens,
width 256, 2 blocks), batch 16, captions of 5-15 words (``--full-captions``: every caption as long
as max_txt_len, the case where padding to the longest saves nothing). ``--real-size``: EVA ViT-g
(random weights, fp16 on CUDA) and a BERT-base-sized Q-Former (12 x 768, 30.5k vocabulary), fp16
autocast on CUDA as LAVIS's runner, both models with the same settings.

Each implementation runs in its own process, in turns (``--rounds``), so that peak memory is its
own and CPU-load noise hits both; the figure is the median step time over all rounds (on CPU also
the process CPU time, steadier than wall time on a shared machine: use ``--threads 1``). Memory: on
CUDA ``max_memory_allocated`` during the timed steps, on CPU the peak resident set size during
the timed steps minus the resident size before them (Linux ``clear_refs``), measured in a separate
run per implementation with glibc told to return freed blocks at once, so that the resident size
follows the live tensors.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import WORDS, captions, lavis_uses_our_encoder, rss_kb, train_step  # noqa: E402,E501



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--real-size", action="store_true", help="ViT-g + BERT-base Q-Former")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of each impl")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--vit-width", type=int, default=256)
    p.add_argument("--vit-depth", type=int, default=2)
    p.add_argument("--max-txt-len", type=int, default=32)
    p.add_argument("--full-captions", action="store_true",
                   help="captions that fill max_txt_len")
    p.add_argument("--impl", choices=["ours", "lavis"], help=argparse.SUPPRESS)
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


def vit_settings(args):
    from lavis_plugins.models.blip2_base import TinyVitConfig

    if args.real_size:  # fp16 weights as LAVIS's default; the CPU cannot run them
        precision = "fp16" if args.device.startswith("cuda") else "fp32"
        return dict(vit_model="eva_clip_g", vit_path="random", vit_precision=precision,
                    image_size=224)
    return dict(vit_model="tiny", vit_precision="fp32", image_size=224,
                tiny_vit=TinyVitConfig(width=args.vit_width, depth=args.vit_depth,
                                       heads=max(1, args.vit_width // 64), patch_size=14,
                                       mlp_ratio=4.0))


def build(args, bert_dir: Path):
    import torch

    from lavis_plugins.models.blip2_qformer import Blip2QformerConfig, LPBlip2Qformer

    vit = vit_settings(args)
    if args.impl == "ours":
        return LPBlip2Qformer(Blip2QformerConfig(
            bert_path=str(bert_dir), num_query_token=args.queries,
            max_txt_len=args.max_txt_len, **vit))

    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    lavis_uses_our_encoder(vit)
    # LAVIS's forward asks torch.distributed for the rank even in one process
    torch.distributed.get_rank = lambda *a, **k: 0
    torch.distributed.get_world_size = lambda *a, **k: 1
    os.chdir(bert_dir.parent)
    return Blip2Qformer(vit_model=vit["vit_model"], img_size=vit["image_size"],
                        vit_precision=vit["vit_precision"], num_query_token=args.queries,
                        max_txt_len=args.max_txt_len)






def run_impl(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build(args, Path(args.bert_dir)).to(args.device)
    model.train()
    cuda = args.device.startswith("cuda")
    samples = {"image": torch.randn(args.batch, 3, 224, 224, device=args.device),
               "text_input": captions(args.batch, args.max_txt_len if args.full_captions else None)}
    step = train_step(model, samples, amp=cuda and args.real_size)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS
            f.write("5")
        base = rss_kb("VmRSS:") * 1024
    times, cpu_times = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = torch.cuda.max_memory_allocated() if cuda else rss_kb("VmHWM:") * 1024
    return {"impl": args.impl, "times": times, "cpu_times": cpu_times,
            "peak_mb": (peak - base) / 2**20}


def run_subprocess(cmd, impl: str, env=None) -> dict:
    out = subprocess.run(cmd + ["--impl", impl], capture_output=True, text=True, env=env)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"{impl} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.impl:
        print("RESULT " + json.dumps(run_impl(args)), flush=True)
        return
    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        bert_dir = make_bert(args, Path(tmp))
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
               "--bert-dir", str(bert_dir)]
        results = {"ours": [], "lavis": []}
        for r in range(args.rounds):
            for impl in ("ours", "lavis"):
                res = run_subprocess(cmd, impl)
                results[impl].append(res)
                print(f"round {r} {impl:5s}: median step "
                      f"{statistics.median(res['times']) * 1e3:8.1f} ms wall, "
                      f"{statistics.median(res['cpu_times']) * 1e3:8.1f} ms CPU", flush=True)
        if cuda:
            peak = {k: max(r["peak_mb"] for r in v) for k, v in results.items()}
        else:
            # glibc keeps freed memory resident and reuses it, hiding a step's allocations from
            # the resident size; for the memory runs it serves every block above 64 KiB by mmap
            # and returns it when freed, so the resident size follows the live tensors (this
            # slows the steps, which is why the timing runs above do without)
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
            mem_cmd = cmd + ["--steps", "2", "--warmup", "1"]
            peak = {impl: run_subprocess(mem_cmd, impl, env)["peak_mb"] for impl in results}

    def med(key):
        return {k: statistics.median([x for r in v for x in r[key]]) for k, v in results.items()}

    t, c = med("times"), med("cpu_times")
    size = "real size (ViT-g, 12x768 Q-Former)" if args.real_size else (
        f"Q-Former {args.layers}x{args.hidden}, tiny ViT {args.vit_depth}x{args.vit_width}")
    print(f"\nstage-1 training step, {size}, {args.queries} queries, batch {args.batch}, "
          f"{'full-length' if args.full_captions else '5-15 word'} captions, {args.device}")
    print(f"{'':12s}{'ours':>12s}{'LAVIS':>12s}{'LAVIS/ours':>12s}")
    print(f"{'step (ms)':12s}{t['ours'] * 1e3:12.1f}{t['lavis'] * 1e3:12.1f}"
          f"{t['lavis'] / t['ours']:12.2f}")
    if not cuda:  # CPU time: steadier on a shared machine
        print(f"{'CPU (ms)':12s}{c['ours'] * 1e3:12.1f}{c['lavis'] * 1e3:12.1f}"
              f"{c['lavis'] / c['ours']:12.2f}")
    print(f"{'peak (MB)':12s}{peak['ours']:12.0f}{peak['lavis']:12.0f}"
          f"{peak['lavis'] / max(peak['ours'], 1e-9):12.2f}")


if __name__ == "__main__":
    main()
