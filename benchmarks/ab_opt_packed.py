"""lp_blip2_opt's training step with OPT run without its padding rows (``models/_opt_packed.py``)
against the same model with transformers' whole decoder, alternated step by step in one process
(the same weights, batch and allocator state, so the difference is the change alone; between
processes the same code varies more on a shared CPU).

    .venv/bin/python benchmarks/ab_opt_packed.py                 # small config, 6 steps each
    .venv/bin/python benchmarks/ab_opt_packed.py --captions coco --steps 10

Model and batch as ``bench_stage2.py`` (its options are accepted: ``--batch``, ``--captions``,
``--threads``, ``--opt-layers``, ...); the padded steps switch ``supports_packing`` off. Each
timed step follows one untimed step of the same path; process CPU time, median.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_stage2 as bench  # noqa: E402
from _bench_common import captions, train_step  # noqa: E402


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    steps = 6
    if "--steps" in argv:  # bench_stage2's --steps means timed steps per round: here per path
        i = argv.index("--steps")
        steps = int(argv[i + 1])
        del argv[i:i + 2]
    args = bench.parse_args(["--impl", "ours", *argv])

    import torch

    import lavis_plugins.models.blip2_opt as blip2_opt

    torch.set_num_threads(args.threads or torch.get_num_threads())
    root = Path(tempfile.mkdtemp())
    bench.make_folders(args, root)
    torch.manual_seed(0)
    model = bench.build(args, root).to(args.device)
    model.train()
    samples = {"image": torch.randn(args.batch, 3, 224, 224, device=args.device),
               "text_input": captions(args.batch, args.captions)}  # as bench_stage2
    step = train_step(model, samples, amp=False)
    packed = blip2_opt.supports_packing
    times = {"packed": [], "padded": []}
    for _ in range(steps):
        for path in times:
            blip2_opt.supports_packing = packed if path == "packed" else (lambda d: False)
            step()
            c = time.process_time()
            step()
            times[path].append(time.process_time() - c)
    blip2_opt.supports_packing = packed
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"stage-2 step, {args.captions} captions, batch {args.batch}, {steps} steps each "
          f"(ms CPU, median): packed {med['packed']:.1f}, padded {med['padded']:.1f}, "
          f"padded / packed {med['padded'] / med['packed']:.3f}x")


if __name__ == "__main__":
    main()
