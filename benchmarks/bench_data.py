"""Images per second one dataloader worker delivers (decode + ``blip2_image_train`` transform +
collate): shards through ``lp_webdataset_caption`` vs the JSON + image folder path (LAVIS's
``CaptionDataset``) vs LAVIS's own LAION webdataset pipeline (``LaionDataset``) on the same
images. Each path runs as it trains: a ``DataLoader`` with one worker process delivering batches
of 16 to this process; the figure is images per CPU second of both processes together (the
worker's time is read from ``getrusage(RUSAGE_CHILDREN)`` once it has exited), because the
machine is shared and wall time is noisy. Rounds alternate the three paths.

    .venv/bin/python benchmarks/bench_data.py --images 512 --rounds 3
    .venv/bin/python benchmarks/bench_data.py --images 256 --size 768   # larger web images
    .venv/bin/python benchmarks/bench_data.py --in-process               # no worker process

Also prints how many workers one GPU's stage-1 step needs: ~50 images/s (A100, the paper's
compute) and 450 images/s (H100 target).
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(root: Path, n: int, size: int) -> Path:
    """``n`` JPEGs (smooth random colour fields, ~web-photo sized) and a LAVIS caption file."""
    from PIL import Image

    from _bench_common import captions

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    caps = captions(n)
    anns = []
    for i in range(n):
        small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        (root / "img" / f"{i}.jpg").write_bytes(buf.getvalue())
        anns.append({"image": f"{i}.jpg", "caption": caps[i], "image_id": i})
    (root / "ann.json").write_text(json.dumps(anns))
    return root


def cpu_seconds() -> float:
    """CPU time of this process and of its exited (waited-for) children."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def timed(fn, n: int) -> float:
    """Images per CPU second of ``fn`` delivering ``n`` images (its workers included)."""
    t = cpu_seconds()
    fn()
    return n / max(cpu_seconds() - t, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--size", type=int, default=384, help="side of the stored JPEGs")
    ap.add_argument("--image-size", type=int, default=224, help="blip2_image_train output size")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--in-process", action="store_true",
                    help="run each path in this process instead of one worker process")
    args = ap.parse_args()

    import torch
    from torch.utils.data import DataLoader
    from lavis.datasets.datasets.caption_datasets import CaptionDataset
    from lavis.datasets.datasets.laion_dataset import LaionDataset
    from lavis.processors.blip_processors import Blip2ImageTrainProcessor, BlipCaptionProcessor

    from lavis_plugins.cli.make_shards import make_shards, shard_pattern
    from lavis_plugins.datasets.shard_plan import expand_shard_spec, load_shard_set
    from lavis_plugins.datasets.webdataset_caption import ShardCaptionDataset

    torch.set_num_threads(args.threads)
    n = args.images
    vis = Blip2ImageTrainProcessor(image_size=args.image_size)
    txt = BlipCaptionProcessor()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_images(Path(tmp), n, args.size)
        make_shards(root / "ann.json", root / "img", root / "shards", 128, progress=False)
        shard_set = load_shard_set(expand_shard_spec(str(root / "shards"), "bench"), "bench")
        workers = 0 if args.in_process else 1
        ours = ShardCaptionDataset(shard_set, vis, txt, shuffle_buffer=128)
        ours.configure(seed=0, rank=0, world_size=1, batch_size=16, num_workers=workers)
        folder = CaptionDataset(vis, txt, str(root / "img"), [str(root / "ann.json")])
        lavis = LaionDataset(vis, txt, shard_pattern(root / "shards", "train",
                                                     len(shard_set.paths)))
        batches = n // 16

        def deliver(dataset, **kw) -> int:
            """Images in ``batches`` batches through a DataLoader (its worker exits at the end)."""
            loader = DataLoader(dataset, num_workers=workers, **kw)
            got = sum(len(b["text_input"]) for b in itertools.islice(loader, batches))
            return got  # the iterator is gone here: its worker has been joined

        # ours yields whole batches; the other two are batched by the DataLoader
        def run_ours():
            assert deliver(ours, batch_size=None) == batches * 16

        def run_folder():
            assert deliver(folder, batch_size=16, shuffle=False) == batches * 16

        def run_lavis():  # resampled shards: an endless stream, cut after the same images
            assert deliver(lavis.inner_dataset, batch_size=16) == batches * 16

        paths = {"shards (ours)": run_ours, "JSON + folder": run_folder,
                 "LAVIS LaionDataset": run_lavis}
        rates = {k: [] for k in paths}
        for r in range(args.rounds):
            for name, fn in paths.items():  # alternate, so drifts in machine load hit all three
                rates[name].append(timed(fn, (n // 16) * 16))
    med = {k: float(np.median(v)) for k, v in rates.items()}
    where = "in this process" if args.in_process else "one worker process + this process"
    print(f"{n} JPEGs {args.size}px -> blip2_image_train {args.image_size}px, "
          f"{args.rounds} rounds, {args.threads} torch thread(s), {where}; "
          "images per CPU second (median):")
    for k, v in med.items():
        print(f"  {k:20s} {v:8.1f}  ({', '.join(f'{x:.1f}' for x in rates[k])})")
    ref = med["LAVIS LaionDataset"]
    print(f"ratio ours / LAVIS LaionDataset: {med['shards (ours)'] / ref:.2f}x; "
          f"ours / JSON + folder: {med['shards (ours)'] / med['JSON + folder']:.2f}x")
    per_core = med["shards (ours)"]
    for label, need in (("A100 stage 1 (~50 img/s)", 50), ("H100 target (450 img/s)", 450)):
        print(f"workers (cores) needed for {label}: {int(np.ceil(need / per_core))}")
    print(f"8 workers at this per-core rate: {8 * per_core:.0f} images/s (goal >= 300)")


if __name__ == "__main__":
    main()
