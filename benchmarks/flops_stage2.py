"""Count the floating-point work of one BLIP-2 stage-2 training step of lp_blip2_opt and of
LAVIS's Blip2OPT with torch's FLOP counter: the forward per top-level module, then forward,
backward and step totals (the counter's attribution of backward work to modules is not reliable
when a model calls a child module without its parent, so the backward is a total).

    .venv/bin/python benchmarks/flops_stage2.py                       # small config, seconds
    .venv/bin/python benchmarks/flops_stage2.py --real-size --batch 2 # ViT-g + OPT-2.7B shapes

Same configs and options as ``bench_stage2.py``. The ratio of the totals bounds the speed-up that
doing less work can give at equal precision; the rest can only come from doing the same work
faster (fused kernels, less memory traffic), which a GPU run of ``bench_stage2.py`` measures.
Attention runs on SDPA's math backend here so that the counter sees its matrix products.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_stage2 as bench  # noqa: E402
from _bench_common import captions  # noqa: E402

PARTS = ("visual_encoder", "ln_vision", "Qformer", "opt_proj", "opt_model")


def count(args) -> dict:
    """GFLOP of one training step of ``args.impl``, per top-level module and in total."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = bench.build(args, Path(args.work_dir)).to(args.device)
    model.train()
    samples = {"image": torch.randn(args.batch, 3, 224, 224, device=args.device),
               "text_input": captions(args.batch)}
    counter, backward = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH):
        with counter:
            loss = model(samples)["loss"]
        with backward:  # its attribution to modules is unreliable: only the total is kept
            loss.backward()
    per_module = counter.get_flop_counts()  # fully qualified module name -> {op: flops}
    root = type(model).__name__
    out = {}
    for part in PARTS:
        # the outermost modules run under this part (a model may call a child, e.g.
        # Qformer.bert, without its parent's forward); their counts include their children's
        under = [k for k in per_module if k.startswith(f"{root}.{part}.") or k == f"{root}.{part}"]
        tops = [k for k in under if not any(k.startswith(o + ".") for o in under)]
        out[part] = sum(sum(per_module[k].values()) for k in tops) / 1e9
    out["forward"] = counter.get_total_flops() / 1e9
    out["backward"] = backward.get_total_flops() / 1e9
    out["total"] = out["forward"] + out["backward"]
    return out


def main(argv=None) -> None:
    args = bench.parse_args(argv)
    if args.impl:
        print("RESULT " + json.dumps(count(args)), flush=True)
        return
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        bench.make_folders(args, Path(tmp))
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
               "--work-dir", tmp]
        for impl in ("ours", "lavis"):  # own processes: at real size each needs ~20 GB
            proc = subprocess.run(cmd + ["--impl", impl], capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                sys.exit(f"{impl} failed:\n{proc.stderr[-3000:]}")
            res[impl] = json.loads(line[-1][len("RESULT "):])
    size = "real size (ViT-g, Q-Former 12x768, OPT-2.7B shapes)" if args.real_size else \
        f"small (tiny ViT 2x256, Q-Former 4x256, OPT {args.opt_layers}x{args.opt_hidden})"
    print(f"\nstage-2 training step, batch {args.batch}, {size}; forward by module, then "
          f"totals")
    print(f"{'GFLOP':16s}{'ours':>12s}{'LAVIS':>12s}{'LAVIS/ours':>12s}")
    for part in (*PARTS, "forward", "backward", "total"):
        o, r = res["ours"][part], res["lavis"][part]
        print(f"{part:16s}{o:12.1f}{r:12.1f}{(r / o if o else float('nan')):12.2f}")


if __name__ == "__main__":
    main()
