"""Stage-1 training step with cached encoder features vs the inline frozen encoder.

    .venv/bin/python benchmarks/bench_feature_cache.py [--vit-width 512 --vit-depth 6] [--device cuda]

Both runs use the same lp_blip2_qformer model (frozen image encoder); "inline" feeds images and
runs the encoder every step, "cached" feeds the encoder's outputs as the feature cache serves them
(``image_embeds``), so the step is Q-Former forward + backward + AdamW only. Prints the median
step time of each and the ratio. The encoder's share grows with its size: at real size the frozen
ViT-g forward is ~20x the Q-Former's FLOPs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--vit-width", type=int, default=256)
    p.add_argument("--vit-depth", type=int, default=4)
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import tempfile

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
    texts = texts[: args.batch]
    with torch.no_grad():
        embeds = model.visual_encoder(images).float()  # what the cache stores (before ln_vision)

    def step(samples):
        opt.zero_grad(set_to_none=True)
        model(samples).loss.backward()
        opt.step()

    def timed(samples):
        step(samples)  # warm-up
        out = []
        for _ in range(args.steps):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(samples)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    inline = timed({"image": images, "text_input": texts})
    cached = timed({"image_embeds": embeds, "text_input": texts})
    print(f"device={args.device} batch={args.batch} image={args.image_size} "
          f"vit={args.vit_width}x{args.vit_depth} patch={args.patch} "
          f"tokens={embeds.shape[1]}")
    print(f"{'inline encoder':<16} {inline * 1e3:9.1f} ms/step")
    print(f"{'cached features':<16} {cached * 1e3:9.1f} ms/step")
    print(f"speed-up (inline / cached): {inline / cached:.2f}x")


if __name__ == "__main__":
    main()
