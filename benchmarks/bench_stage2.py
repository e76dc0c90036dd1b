"""Time a BLIP-2 stage-2 training step and batched caption generation of lp_blip2_opt against
LAVIS's Blip2OPT on the same config, batch and device, with their peak memory.

    .venv/bin/python benchmarks/bench_stage2.py                     # CPU, small config
    .venv/bin/python benchmarks/bench_stage2.py --device cuda --real-size

Default (CPU): tiny ViT (224 px, patch 14: 257 tokens, width 256, 2 blocks), Q-Former 4 x 256,
32 queries, OPT 4 x 256 (``--opt-layers`` x ``--opt-hidden``; vocabulary 512), fp32. ``--real-size``: EVA ViT-g (random weights,
fp16), BERT-base-sized Q-Former (12 x 768), OPT-2.7B shapes (32 x 2560, vocabulary 50272, random
weights, fp16 as LAVIS keeps it), fp16 autocast + loss scaling as LAVIS's runner; on the CPU the
real shapes run in fp32 throughout (about 20 GB of memory; use a small ``--batch``).

Training step: forward + backward + AdamW on the trainable weights (Q-Former, queries,
projection, ln_vision), batch ``--batch`` of 5-15 word captions. Generation: ``--gen-batch``
images (default 16), prompt "a photo of", ``--new-tokens`` tokens forced for every sequence
(min = max new tokens, so both produce the same number), ``--num-beams`` beams; the figure is
generated tokens per second (batch x new tokens / time). LAVIS's Blip2OPT beam search fails under
transformers >= 4.3x (its query embeddings are expanded for the beams twice), so compare greedy.

Each implementation runs in its own process, in turns (``--rounds``), so that peak memory is its
own and load noise hits both; the figures are medians over all rounds. On the CPU the training
step is timed in process CPU time (wall time is printed per round too), which other jobs on a
shared machine disturb far less than wall time; use ``--threads 1`` there. Memory: on CUDA
``max_memory_allocated`` above the model's resident weights during the timed work, on CPU the peak
resident set size during it minus the size before (Linux ``clear_refs``).
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

from _bench_common import captions, lavis_uses_our_encoder, rss_kb, train_step  # noqa: E402

PROMPT = "a photo of"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--real-size", action="store_true", help="ViT-g + BERT-base + OPT-2.7B shapes")
    p.add_argument("--batch", type=int, default=16, help="training batch")
    p.add_argument("--gen-batch", type=int, default=16, help="generation batch")
    p.add_argument("--new-tokens", type=int, default=20, help="tokens generated per sequence")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed training steps per round")
    p.add_argument("--gen-repeats", type=int, default=2, help="timed generate calls per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of each impl")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--skip", choices=["train", "generate"], help="time only the other one")
    p.add_argument("--opt-layers", type=int, default=4, help="small config: OPT layers")
    p.add_argument("--opt-hidden", type=int, default=256, help="small config: OPT width")
    p.add_argument("--impl", choices=["ours", "lavis"], help=argparse.SUPPRESS)
    p.add_argument("--work-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def sizes(args) -> dict:
    if args.real_size:
        return dict(bert=dict(hidden=768, layers=12, words=30_300),
                    opt=dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                             ffn_dim=10240, max_position_embeddings=2048, vocab_size=50272))
    return dict(bert=dict(hidden=256, layers=4, words=0),
                opt=dict(hidden_size=args.opt_hidden, num_hidden_layers=args.opt_layers,
                         num_attention_heads=args.opt_hidden // 32, ffn_dim=4 * args.opt_hidden,
                         max_position_embeddings=512, vocab_size=512))


def make_folders(args, root: Path) -> None:
    """bert-base-uncased (LAVIS loads that literal name) and an OPT folder of the chosen size."""
    import torch

    from lavis_plugins.common.tiny_bert import make_tiny_bert
    from lavis_plugins.common.tiny_llm import make_tiny_opt

    s = sizes(args)
    b = s["bert"]
    make_tiny_bert(root / "bert-base-uncased", words=[f"w{i}" for i in range(b["words"])],
                   hidden_size=b["hidden"], num_hidden_layers=b["layers"],
                   num_attention_heads=b["hidden"] // 64, intermediate_size=4 * b["hidden"],
                   max_position_embeddings=512)
    # the tokenizer, and the weights of the small config (replaced below at real size)
    o = sizes(parse_args([])).get("opt") if args.real_size else s["opt"]
    opt_dir = make_tiny_opt(root / "opt", hidden_size=o["hidden_size"],
                            num_hidden_layers=o["num_hidden_layers"],
                            num_attention_heads=o["num_attention_heads"], ffn_dim=o["ffn_dim"],
                            max_position_embeddings=o["max_position_embeddings"])
    if args.real_size:
        from transformers import OPTConfig, OPTForCausalLM

        o = dict(s["opt"])
        config = OPTConfig(word_embed_proj_dim=o["hidden_size"], pad_token_id=1,
                           bos_token_id=2, eos_token_id=2, **o)
        with torch.device(args.device):  # random init of 2.7B weights is quick on the GPU
            model = OPTForCausalLM._from_config(config, torch_dtype=torch.float16)
        for old in [*opt_dir.glob("pytorch_model*"), *opt_dir.glob("model*.safetensors*")]:
            old.unlink()  # the small config's weights
        model.save_pretrained(opt_dir)  # model*.safetensors, fp16, with its config
        del model


def half(args) -> str:
    """The frozen parts' precision at real size: fp16 on a GPU (as LAVIS runs them), fp32 on
    the CPU, which has no fast fp16 (a CPU run of the real shapes needs about 20 GB)."""
    return "fp16" if args.device.startswith("cuda") else "fp32"


def vit_settings(args) -> dict:
    from lavis_plugins.models.blip2_base import TinyVitConfig

    if args.real_size:
        return dict(vit_model="eva_clip_g", vit_path="random", vit_precision=half(args),
                    image_size=224)
    return dict(vit_model="tiny", vit_precision="fp32", image_size=224,
                tiny_vit=TinyVitConfig(width=256, depth=2, heads=4, patch_size=14, mlp_ratio=4.0))


def build(args, root: Path):
    vit = vit_settings(args)
    llm_dtype = half(args) if args.real_size else "fp32"
    if args.impl == "ours":
        from lavis_plugins.models.blip2_opt import Blip2OPTConfig, LPBlip2OPT

        cfg = Blip2OPTConfig(bert_path=str(root / "bert-base-uncased"),
                             opt_model=str(root / "opt"), llm_dtype=llm_dtype, prompt="",
                             num_query_token=32, **vit)
        return LPBlip2OPT(cfg)

    from lavis.models.blip2_models.blip2_opt import Blip2OPT

    lavis_uses_our_encoder(vit)
    os.chdir(root)  # LAVIS loads "bert-base-uncased" from the working directory
    model = Blip2OPT(vit_model=vit["vit_model"], img_size=vit["image_size"],
                     vit_precision=vit["vit_precision"], num_query_token=32,
                     opt_model=str(root / "opt"), prompt="")
    if half(args) == "fp32" or not args.real_size:
        model = model.float()  # LAVIS loads OPT in fp16 even on CPU; compare fp32 with fp32
    return model






class Meter:
    """Peak memory above a baseline taken at ``start`` (CUDA allocator or CPU RSS)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def start(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS
                f.write("5")
            self.base = rss_kb("VmRSS:") * 1024

    def peak_mb(self) -> float:
        import torch

        peak = torch.cuda.max_memory_allocated() if self.cuda else rss_kb("VmHWM:") * 1024
        return (peak - self.base) / 2**20


def run_impl(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    root = Path(args.work_dir)
    model = build(args, root).to(args.device)
    cuda = args.device.startswith("cuda")
    meter = Meter(cuda)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    out = {"impl": args.impl}
    if args.skip != "train":
        model.train()
        samples = {"image": torch.randn(args.batch, 3, 224, 224, device=args.device),
                   "text_input": captions(args.batch)}
        step = train_step(model, samples, amp=cuda and args.real_size)

        for _ in range(args.warmup):
            step()
        sync()
        meter.start()
        times, cpu_times = [], []
        for _ in range(args.steps):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            sync()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        out.update(train_times=times, train_cpu_times=cpu_times, train_peak_mb=meter.peak_mb())
        del step  # its optimizer state
    if args.skip != "generate":
        model.eval()
        image = torch.randn(args.gen_batch, 3, 224, 224, device=args.device)
        n = args.new_tokens
        if args.impl == "ours":
            kw = dict(min_length=n)  # ours counts new tokens
        else:  # LAVIS's min_length counts the prompt's tokens too
            kw = dict(min_length=n + len(model.opt_tokenizer(PROMPT).input_ids))

        def gen():
            with torch.no_grad():
                return model.generate({"image": image, "prompt": PROMPT},
                                      num_beams=args.num_beams, max_length=n, **kw)

        gen()
        sync()
        meter.start()
        times = []
        for _ in range(args.gen_repeats):
            t0 = time.perf_counter()
            gen()
            sync()
            times.append(time.perf_counter() - t0)
        out.update(gen_times=times, gen_peak_mb=meter.peak_mb(),
                   tokens_per_call=args.gen_batch * n)
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.impl:
        print("RESULT " + json.dumps(run_impl(args)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        make_folders(args, Path(tmp))
        base_cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                    "--work-dir", tmp]
        results = {"ours": [], "lavis": []}
        for r in range(args.rounds):
            for impl in ("ours", "lavis"):
                proc = subprocess.run(base_cmd + ["--impl", impl], capture_output=True, text=True)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    sys.exit(f"{impl} failed:\n{proc.stderr[-3000:]}")
                res = json.loads(line[-1][len("RESULT "):])
                results[impl].append(res)
                msg = [f"round {r} {impl:5s}:"]
                if "train_times" in res:
                    msg.append(f"step {statistics.median(res['train_times']) * 1e3:8.1f} ms wall"
                               f" {statistics.median(res['train_cpu_times']) * 1e3:8.1f} ms CPU")
                if "gen_times" in res:
                    msg.append(f"generate {statistics.median(res['gen_times']):7.2f} s")
                print(" ".join(msg), flush=True)
    report(args, results)


def report(args, results) -> None:
    def med(impl, key):
        return statistics.median([x for r in results[impl] for x in r[key]])

    def peak(impl, key):
        return max(r[key] for r in results[impl])

    size = (f"real size: EVA ViT-g, Q-Former 12x768, OPT-2.7B shapes, {half(args)}"
            if args.real_size
            else f"small: tiny ViT 2x256, Q-Former 4x256, OPT {args.opt_layers}x"
                 f"{args.opt_hidden}, fp32")
    print(f"\nstage 2, {size}, 32 queries, {args.device}")
    print(f"{'':28s}{'ours':>12s}{'LAVIS':>12s}{'ours speed-up':>15s}")
    if args.skip != "train":
        # on the CPU, process time: a shared machine's load inflates wall time unevenly
        key = "train_times" if args.device.startswith("cuda") else "train_cpu_times"
        t = {k: med(k, key) for k in results}
        m = {k: peak(k, "train_peak_mb") for k in results}
        unit = 'ms' if args.device.startswith('cuda') else 'ms CPU'
        print(f"{f'train step, batch {args.batch} ({unit})':28s}{t['ours'] * 1e3:12.1f}"
              f"{t['lavis'] * 1e3:12.1f}{t['lavis'] / t['ours']:15.2f}")
        print(f"{'  peak memory (MB)':28s}{m['ours']:12.0f}{m['lavis']:12.0f}"
              f"{m['lavis'] / max(m['ours'], 1e-9):15.2f}")
    if args.skip != "generate":
        n = args.gen_batch * args.new_tokens
        g = {k: n / med(k, "gen_times") for k in results}
        m = {k: peak(k, "gen_peak_mb") for k in results}
        label = f"generate b{args.gen_batch} beams {args.num_beams} (tok/s)"
        print(f"{label:28s}{g['ours']:12.1f}{g['lavis']:12.1f}{g['ours'] / g['lavis']:15.2f}")
        print(f"{'  peak memory (MB)':28s}{m['ours']:12.0f}{m['lavis']:12.0f}"
              f"{m['lavis'] / max(m['ours'], 1e-9):15.2f}")


if __name__ == "__main__":
    main()
