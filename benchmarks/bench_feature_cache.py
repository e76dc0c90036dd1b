"""Stage-1 training step from cached encoder features vs the inline frozen encoder: measured at a
small size, and computed at real size (EVA ViT-g + BERT-base-sized Q-Former) from FLOP counts.

    .venv/bin/python benchmarks/bench_feature_cache.py                 # both parts, ~3 min
    .venv/bin/python benchmarks/bench_feature_cache.py --skip flops    # the timing only
    .venv/bin/python benchmarks/bench_feature_cache.py --device cuda --skip flops

Timing (default: CPU, one torch thread, batch 16, 224 px, tiny ViT 256 wide x 4 blocks, patch 14:
257 tokens; Q-Former 4 x 256): one lp_blip2_qformer model (frozen image encoder); "inline" feeds
images and runs the encoder every step, "cached" feeds the encoder's outputs as the feature cache
serves them (``image_embeds``: the same step whether the cache holds 1 or K augmented views), so
its step is Q-Former forward + backward + AdamW only. The two alternate step by step; the figure
is the median process CPU time per step (wall time on CUDA).

FLOPs (``torch.utils.flop_counter``): the frozen EVA ViT-g/14 forward at 224 px, counted on the
meta device (no memory, no weights), and one stage-1 step (ITC + ITM + ITG forward and backward)
of a BERT-base-sized Q-Former (12 x 768, 30.5k vocabulary, 32 queries) on cached ViT-g-shaped
features (257 x 1408), counted for real at batch ``--flops-batch`` (about 2 GB). Per image, the
inline step costs ViT + Q-Former, the cached step Q-Former: their ratio is the step saving at real
size. A cache of K augmented views costs K ViT forwards per image once, so over E epochs it saves
(E - K) ViT forwards per image: it pays for itself after K epochs.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--vit-width", type=int, default=256)
    p.add_argument("--vit-depth", type=int, default=4)
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--steps", type=int, default=6, help="timed steps of each, alternating")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    p.add_argument("--flops-batch", type=int, default=4)
    p.add_argument("--skip", choices=["timing", "flops"], help="run only the other part")
    return p.parse_args(argv)


def timing(args) -> None:
    import torch

    import lavis_plugins as lp
    from lavis_plugins.common.tiny_bert import make_tiny_bert

    bert = make_tiny_bert(Path(tempfile.mkdtemp()) / "bert", hidden_size=256,
                          num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    torch.manual_seed(0)
    model = lp.load_model("lp_blip2_qformer", "tiny", device=args.device, bert_path=str(bert),
                          image_size=args.image_size, num_query_token=32, embed_dim=128,
                          tiny_vit={"width": args.vit_width, "depth": args.vit_depth,
                                    "heads": max(args.vit_width // 64, 1),
                                    "patch_size": args.patch})
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device)
    texts = [f"a {c} {s} on the left of a small shape number {i}" for i, (c, s) in
             enumerate(zip(["red", "blue", "green", "yellow"] * 8, ["circle", "square"] * 16))]
    texts = (texts * (args.batch // len(texts) + 1))[: args.batch]
    with torch.no_grad():
        embeds = model.visual_encoder(images).float()  # what the cache stores (before ln_vision)
    cuda = args.device.startswith("cuda")
    batches = {"inline encoder": {"image": images, "text_input": texts},
               "cached features": {"image_embeds": embeds, "text_input": texts}}

    def step(samples) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        model(samples).loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0 if cuda else time.process_time() - c0

    for samples in batches.values():
        step(samples)  # warm-up
    times = {k: [] for k in batches}
    for i in range(args.steps):  # alternating, the order swapped every step
        for name in (list(batches) if i % 2 == 0 else list(batches)[::-1]):
            times[name].append(step(batches[name]))
    import statistics

    med = {k: statistics.median(v) for k, v in times.items()}
    unit = "ms/step" if cuda else "ms CPU/step"
    print(f"timing: device={args.device} threads={args.threads or 'default'} batch={args.batch} "
          f"image={args.image_size} vit={args.vit_width}x{args.vit_depth} patch={args.patch} "
          f"tokens={embeds.shape[1]}, {args.steps} alternating steps each")
    for name, t in med.items():
        print(f"  {name:<16} {t * 1e3:9.1f} {unit}   (steps: "
              f"{', '.join(f'{x * 1e3:.0f}' for x in times[name])})")
    print(f"  speed-up (inline / cached): {med['inline encoder'] / med['cached features']:.2f}x")


def vit_g_forward_flops(image_size: int = 224) -> float:
    """FLOPs of one image through LAVIS's EVA ViT-g/14 (``create_eva_vit_g``'s sizes), counted
    on the meta device."""
    from functools import partial

    import torch
    from lavis.models import eva_vit
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    linspace = torch.linspace
    # eva_vit reads its drop-path schedule with .item(), which meta tensors cannot answer
    torch.linspace = lambda *a, **k: linspace(*a, **{**k, "device": "cpu"})
    try:
        with torch.device("meta"):
            vit = eva_vit.VisionTransformer(
                img_size=image_size, patch_size=14, use_mean_pooling=False, embed_dim=1408,
                depth=39, num_heads=1408 // 88, mlp_ratio=4.3637, qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=1e-6))
            x = torch.empty(1, 3, image_size, image_size)
    finally:
        torch.linspace = linspace
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        vit(x)
    return float(counter.get_total_flops())


def qformer_step_flops(batch: int) -> float:
    """FLOPs per image of one stage-1 training step (forward + backward) of a BERT-base-sized
    lp_blip2_qformer on cached ViT-g-shaped features (257 tokens x 1408)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import lavis_plugins as lp
    from lavis_plugins.common.tiny_bert import make_tiny_bert

    import _bench_common as common

    words = common.WORDS + [f"w{i}" for i in range(30_300)]  # about BERT's 30.5k vocabulary
    bert = make_tiny_bert(Path(tempfile.mkdtemp()) / "bert-base-uncased", words=words,
                          hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                          intermediate_size=3072, max_position_embeddings=512)
    torch.manual_seed(0)
    # the encoder only sets the features' width: the cached step never runs it
    model = lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(bert), image_size=224,
                          num_query_token=32, tiny_vit={"width": 1408, "depth": 1, "heads": 16,
                                                       "patch_size": 14})
    model.train()
    samples = {"image_embeds": torch.randn(batch, 257, 1408),
               "text_input": common.captions(batch, "coco")}
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:  # the math backend: its products are counted
        model(samples).loss.backward()
    return float(counter.get_total_flops()) / batch


def flops(args) -> None:
    vit = vit_g_forward_flops()
    qf = qformer_step_flops(args.flops_batch)
    print(f"FLOPs at real size, per image (torch.utils.flop_counter; Q-Former step counted at "
          f"batch {args.flops_batch}, COCO-like captions):")
    print(f"  EVA ViT-g/14 forward, 224 px          {vit / 1e9:9.1f} GFLOP")
    print(f"  Q-Former stage-1 step (fwd + bwd)     {qf / 1e9:9.1f} GFLOP")
    print(f"  inline step / cached step             {(vit + qf) / qf:9.2f}x (the step saving)")
    for k in (1, 4, 8):
        print(f"  a cache of {k} view(s) per image costs {k} ViT forward(s) per image once; "
              f"over E epochs it saves (E - {k}) x {vit / 1e9:.0f} GFLOP per image")


def main(argv=None) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.skip != "timing":
        timing(args)
    if args.skip != "flops":
        flops(args)


if __name__ == "__main__":
    main()
