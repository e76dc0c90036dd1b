"""Time a BLIP-2 stage-2 training step and batched caption generation (greedy and beam 5) of
lp_blip2_opt against LAVIS's Blip2OPT on the same config, batch and device, with peak memory.

    .venv/bin/python benchmarks/bench_stage2.py                     # CPU, small config, 3 sides
    .venv/bin/python benchmarks/bench_stage2.py --device cuda --real-size

Default (CPU): tiny ViT (224 px, patch 14: 257 tokens, width 256, 2 blocks), Q-Former 4 x 256,
32 queries, OPT 4 x 256 (``--opt-layers`` x ``--opt-hidden``; vocabulary 512), fp32, one torch
thread. ``--real-size``: EVA ViT-g (random weights, fp16), BERT-base-sized Q-Former (12 x 768),
OPT-2.7B shapes (32 x 2560, vocabulary 50272, random weights, fp16 as LAVIS keeps it), fp16
autocast + loss scaling as LAVIS's runner; on the CPU the real shapes run in fp32 throughout
(about 20 GB of memory; use a small ``--batch``).

Training step: forward + backward + AdamW on the trainable weights (Q-Former, queries,
projection, ln_vision), batch ``--batch``, captions as ``--captions`` (see bench_stage1.py).
Generation: ``--gen-batch`` images (default 16), prompt "a photo of", ``--new-tokens`` tokens
forced for every sequence (min = max new tokens, so every side produces the same number), for
each of ``--beams`` (default greedy and 5 beams, BLIP-2's default); the figure is generated
tokens per CPU second (batch x new tokens / process CPU time of the call; wall time on CUDA).

Sides (``--sides``, see ``_bench_common``): ours; LAVIS 1.0.2 in its own environment (``make
bench-env``, transformers 4.26.1) as installed, whose vendored OPT drops its key/value cache (it
reads ``past``; transformers >= 4.26 passes ``past_key_values``) and so recomputes the whole
sequence at every token; ``lavis_kv``, the same with the cache restored; LAVIS in our environment
(transformers 4.46) with the cache restored (its beam search fails there: 4.46 expands its
already-expanded query embeddings a second time). The default runs the first, second and last;
``--sides ours,lavis_kv --skip train`` adds LAVIS at its best for generation. Each
side runs in a fresh process, in turns (``--rounds``; the order reverses every round); figures are
medians over all rounds. Memory: fresh processes per side, one for two training steps and one
for a generate call with the most beams: on CUDA ``max_memory_allocated`` above the built model,
on the CPU the peak resident size above the built model (Linux ``clear_refs`` + ``VmHWM``) and
the whole process's peak (``getrusage``).
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

from _bench_common import (  # noqa: E402
    CAPTION_KINDS, KV_RESTORED_SIDES, SIDES, PeakRss, add_common_args, alternate, captions,
    child_argv, lavis_vision_encoder, median, restore_lavis_kv_cache, run_side, sides_of, table,
    train_step)

PROMPT = "a photo of"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--real-size", action="store_true", help="ViT-g + BERT-base + OPT-2.7B shapes")
    p.add_argument("--batch", type=int, default=16, help="training batch")
    p.add_argument("--gen-batch", type=int, default=16, help="generation batch")
    p.add_argument("--new-tokens", type=int, default=20, help="tokens generated per sequence")
    p.add_argument("--beams", default="1,5", help="comma-separated beam counts to time")
    p.add_argument("--captions", choices=CAPTION_KINDS, default="uniform",
                   help="training caption lengths (see bench_stage1.py)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per round")
    p.add_argument("--gen-repeats", type=int, default=2, help="timed generate calls per round")
    p.add_argument("--warmup", type=int, default=1)
    add_common_args(p)
    p.add_argument("--skip", choices=["train", "generate"], help="time only the other one")
    p.add_argument("--opt-layers", type=int, default=4, help="small config: OPT layers")
    p.add_argument("--opt-hidden", type=int, default=256, help="small config: OPT width")
    p.add_argument("--memory-run", choices=["train", "generate"], help=argparse.SUPPRESS)
    p.add_argument("--work-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.beam_list = [int(b) for b in args.beams.split(",")]
    except ValueError:
        p.error(f"--beams {args.beams!r}: comma-separated whole numbers, e.g. 1,5")
    if not args.beam_list or min(args.beam_list) < 1:
        p.error(f"--beams {args.beams!r}: each beam count must be >= 1")
    return args


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
    """The image encoder of every side, as plain values (the LAVIS side has no lavis_plugins)."""
    if args.real_size:
        return dict(vit_model="eva_clip_g", vit_path="random", vit_precision=half(args),
                    image_size=224)
    return dict(vit_model="tiny", vit_precision="fp32", image_size=224,
                tiny_vit=dict(width=256, depth=2, heads=4, patch_size=14, mlp_ratio=4.0))


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

    lavis_vision_encoder(vit)
    if args.impl in KV_RESTORED_SIDES:
        restore_lavis_kv_cache()
    os.chdir(root)  # LAVIS loads "bert-base-uncased" from the working directory
    model = Blip2OPT(vit_model=vit["vit_model"], img_size=vit["image_size"],
                     vit_precision=vit["vit_precision"], num_query_token=32,
                     opt_model=str(root / "opt"), prompt="")
    if half(args) == "fp32" or not args.real_size:
        model = model.float()  # LAVIS loads OPT in fp16 even on CPU; compare fp32 with fp32
    return model






class Meter:
    """Peak memory above a baseline taken at ``start``: the CUDA allocator's, or the CPU's
    resident size (:class:`PeakRss`; meaningful in a fresh process only)."""

    def __init__(self, cuda: bool):
        self.cuda, self.rss = cuda, PeakRss()

    def start(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.rss.start()

    def peak_mb(self) -> float:
        import torch

        if self.cuda:
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return self.rss.above_mb()


def generate_call(args, model, beams: int):
    """One side's batched generate call: ``--new-tokens`` tokens forced for every sequence."""
    import torch

    image = torch.randn(args.gen_batch, 3, 224, 224, device=args.device)
    n = args.new_tokens
    if args.impl == "ours":
        kw = dict(min_length=n)  # ours counts new tokens
    else:  # LAVIS's min_length counts the prompt's tokens too (max_length is max_new_tokens)
        kw = dict(min_length=n + len(model.opt_tokenizer(PROMPT).input_ids))

    def gen():
        with torch.no_grad():
            return model.generate({"image": image, "prompt": PROMPT}, num_beams=beams,
                                  max_length=n, **kw)

    return gen


def run_impl(args) -> dict:
    """One side in this process: timed training steps and generate calls, or (``--memory-run``)
    the memory of two training steps or of one generate call."""
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

    def timed(fn, n: int):
        """Wall and process CPU seconds of ``n`` calls of ``fn``, each."""
        times, cpu_times = [], []
        for _ in range(n):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        return times, cpu_times

    out = {"impl": args.impl}
    if args.memory_run == "generate":
        model.eval()
        gen = generate_call(args, model, max(args.beam_list))
        meter.start()
        try:
            gen()
        except Exception as e:  # noqa: BLE001 - LAVIS's beam search under transformers 4.46
            return {**out, "gen_error": f"{type(e).__name__}: {str(e)[:200]}"}
        sync()
        return {**out, "peak_mb": meter.peak_mb(), "process_mb": PeakRss.process_mb()}
    model.train()
    samples = {"image": torch.randn(args.batch, 3, 224, 224, device=args.device),
               "text_input": captions(args.batch, args.captions)}
    step = train_step(model, samples, amp=cuda and args.real_size)
    if args.memory_run == "train":
        meter.start()
        for _ in range(2):
            step()
        sync()
        return {**out, "peak_mb": meter.peak_mb(), "process_mb": PeakRss.process_mb()}
    if args.skip != "train":
        for _ in range(args.warmup):
            step()
        out["train_times"], out["train_cpu_times"] = timed(step, args.steps)
    del step  # its optimizer state
    if args.skip != "generate":
        model.eval()
        for beams in args.beam_list:
            gen = generate_call(args, model, beams)
            try:
                gen()  # warm-up
            except Exception as e:  # noqa: BLE001 - LAVIS's beam search under transformers 4.46
                out[f"gen_error_{beams}"] = f"{type(e).__name__}: {str(e)[:200]}"
                continue
            out[f"gen_times_{beams}"], out[f"gen_cpu_times_{beams}"] = timed(gen, args.gen_repeats)
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.impl:
        print("RESULT " + json.dumps(run_impl(args)), flush=True)
        return
    sides = sides_of(args)

    def show(r, side, res):
        msg = [f"round {r} {SIDES[side]:>16s}:"]
        if "train_times" in res:
            msg.append(f"step {median(res['train_times']) * 1e3:8.1f} ms wall"
                       f" {median(res['train_cpu_times']) * 1e3:8.1f} ms CPU")
        for b in args.beam_list:
            if f"gen_times_{b}" in res:
                msg.append(f"| beams {b}: generate {median(res[f'gen_times_{b}']):6.2f} s wall"
                           f" {median(res[f'gen_cpu_times_{b}']):6.2f} s CPU")
            elif f"gen_error_{b}" in res:
                msg.append(f"| beams {b}: fails ({res[f'gen_error_{b}'][:80]})")
        print(" ".join(msg), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        make_folders(args, Path(tmp))
        cmd = child_argv(__file__, argv, "--work-dir", tmp)
        results = alternate(cmd, args, show)
        memory = {}
        for phase in ("train", "generate"):
            if args.skip != phase:
                memory[phase] = {s: run_side(cmd + ["--memory-run", phase], s, args)
                                 for s in sides}
    report(args, sides, results, memory)


def report(args, sides, results, memory) -> None:
    cuda = args.device.startswith("cuda")
    wall_or_cpu = "" if cuda else "cpu_"

    def med(side, key):
        xs = [x for r in results[side] for x in r.get(key, [])]
        return median(xs) if xs else None

    def speedups(values, higher_is_faster):
        if "ours" not in sides or values["ours"] is None:
            return []
        cells = []
        for s in sides:
            v = values[s]
            cells.append("" if s == "ours" or v is None else
                         f"{(values['ours'] / v if higher_is_faster else v / values['ours']):.2f}x")
        return [["  speed-up of ours"] + cells]

    def mem_rows(phase):
        m = memory.get(phase, {})
        rows = [["  peak above model (MB)"] + [
            f"{m[s]['peak_mb']:.0f}" if "peak_mb" in m.get(s, {}) else "fails" for s in sides]]
        if not cuda:
            rows.append(["  process peak RSS (MB)"] + [
                f"{m[s]['process_mb']:.0f}" if "process_mb" in m.get(s, {}) else "fails"
                for s in sides])
        return rows

    rows = []
    if args.skip != "train":
        t = {s: med(s, f"train_{wall_or_cpu}times") for s in sides}
        rows.append([f"train step b{args.batch} ({'ms' if cuda else 'ms CPU'})"]
                    + [f"{t[s] * 1e3:.1f}" for s in sides])
        rows += speedups(t, higher_is_faster=False) + mem_rows("train")
    if args.skip != "generate":
        n = args.gen_batch * args.new_tokens
        for b in args.beam_list:
            g = {s: (None if med(s, f"gen_{wall_or_cpu}times_{b}") is None
                     else n / med(s, f"gen_{wall_or_cpu}times_{b}")) for s in sides}
            rows.append([f"generate b{args.gen_batch} beams {b} "
                         f"(tok/{'s' if cuda else 'CPU s'})"]
                        + [f"{g[s]:.1f}" if g[s] is not None else "fails" for s in sides])
            rows += speedups(g, higher_is_faster=True)
        rows += [[f"generate, beams {max(args.beam_list)}:"] + [""] * len(sides)]
        rows += mem_rows("generate")
    size = (f"real size: EVA ViT-g, Q-Former 12x768, OPT-2.7B shapes, {half(args)}"
            if args.real_size
            else f"small: tiny ViT 2x256, Q-Former 4x256, OPT {args.opt_layers}x"
                 f"{args.opt_hidden}, fp32")
    print("\n" + table(f"stage 2, {size}, 32 queries, {args.captions} captions, {args.device}, "
                       f"{args.threads or 'default'} thread(s), {args.rounds} rounds", rows, sides))


if __name__ == "__main__":
    main()
