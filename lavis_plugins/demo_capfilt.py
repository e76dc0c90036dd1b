"""``make demo-capfilt`` / ``python -m lavis_plugins.demo_capfilt``: CapFilt measured on the
shapes data, on a CPU, in minutes.

1. ``corrupt``        a known fraction (default 40%) of the shapes training captions gets one wrong
                      word (a colour or a shape swapped for one the image does not show);
                      ``corruption.json`` records which;
2. ``stage1_noisy``   demo stage 1 (projects/demo/stage1.yaml) on the noisy captions, as shards of
                      one sample per image (its 2 captions, one drawn per epoch);
3. ``retrieval``      its retrieval R@1 (ITC alone and ITC top-k re-ranked by ITM) and ITM accuracy;
4. ``capfilt``        ``lavis-plugins capfilt`` (projects/capfilt/demo.yaml) with that model as
                      captioner and filter on the noisy captions, writing shards of the kept ones;
5. ``stage1_capfilt`` the same stage 1, same steps, on CapFilt's output; then its retrieval.

The report (``report.md``, ``metrics.json``) gives the fraction of corrupted captions removed and
of correct ones kept, and retrieval R@1 after training on the noisy data vs on CapFilt's output.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from lavis_plugins.common.errors import UserError

REPORT = "report.md"
METRICS_JSON = "metrics.json"
CORRUPT_FRACTION = 0.4  # share of training captions given one wrong word
# stage 1 reads one sample per image here (2000 a epoch): twice the demo's 5 epochs of 4000
# single-caption samples gives it the same ~620 steps
STAGE1_EPOCHS = 10
SHARD_SIZE = 500


def corrupt_captions(annotations: Sequence[Dict[str, Any]], fraction: float, seed: int = 0
                     ) -> Tuple[List[Dict[str, Any]], List[bool]]:
    """A copy of the caption records with ``fraction`` of them (chosen at random) given one
    wrong word: a colour or shape word swapped for one the caption does not name. Returns the
    records and, per record, whether it was corrupted."""
    from lavis_plugins.demo_data import COLORS, SHAPES

    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(annotations)), round(fraction * len(annotations))))
    out, flags = [], []
    for i, ann in enumerate(annotations):
        cap = ann["caption"]
        if i in chosen:
            words = cap.split()
            kinds = [k for k in (COLORS, SHAPES) if any(w in k for w in words)]
            vocab = rng.choice(kinds)
            at = rng.choice([j for j, w in enumerate(words) if w in vocab])
            words[at] = rng.choice(sorted(set(vocab) - set(words)))
            cap = " ".join(words)
        out.append(dict(ann, caption=cap))
        flags.append(i in chosen)
    return out, flags


def scene_words(caption: str) -> Tuple[frozenset, frozenset]:
    """The colour words and the shape words of a shapes caption."""
    from lavis_plugins.demo_data import COLORS, SHAPES

    words = caption.lower().split()
    return frozenset(w for w in words if w in COLORS), frozenset(w for w in words if w in SHAPES)


def filter_quality(merged: Sequence[Dict[str, Any]], corrupted: Dict[Tuple[str, str], bool],
                   clean: Optional[Dict[str, str]] = None) -> Dict[str, float]:
    """Of the web captions: the % of corrupted ones removed and of correct ones kept; the % of
    kept captions that are synthetic and (given ``clean``: a correct caption of each image) the
    % of those that name the image's colours and shapes (the words a corruption changes)."""
    from lavis_plugins.capfilt.candidates import WEB

    n = {"bad": 0, "bad_removed": 0, "good": 0, "good_kept": 0, "kept": 0, "kept_synthetic": 0,
         "synthetic_right": 0}
    for e in merged:
        kept = set(e["capfilt"]["kept"])
        for j, c in enumerate(e["capfilt"]["candidates"]):
            n["kept"] += j in kept
            if c["source"] != WEB:
                n["kept_synthetic"] += j in kept
                if j in kept and clean is not None:
                    n["synthetic_right"] += scene_words(c["caption"]) == scene_words(
                        clean[e["image"]])
                continue
            if corrupted[(e["image"], c["caption"])]:
                n["bad"] += 1
                n["bad_removed"] += j not in kept
            else:
                n["good"] += 1
                n["good_kept"] += j in kept
    return {"corrupted_removed": 100.0 * n["bad_removed"] / max(n["bad"], 1),
            "correct_kept": 100.0 * n["good_kept"] / max(n["good"], 1),
            "kept_synthetic": 100.0 * n["kept_synthetic"] / max(n["kept"], 1),
            "synthetic_right": 100.0 * n["synthetic_right"] / max(n["kept_synthetic"], 1),
            "corrupted_web": n["bad"], "correct_web": n["good"]}


def _stage1(out: Path, job: str, bert: Path, shards: Path, extra: Sequence[str]):
    from lavis_plugins import cli
    from lavis_plugins.demo import demo_yaml, final_checkpoint

    opts = [f"run.output_dir={out}", f"model.bert_path={bert}",
            f"datasets.lp_webdataset_caption.build_info.shards={shards}",
            f"run.max_epoch={STAGE1_EPOCHS}", *extra]
    runner, _ = cli.run(str(demo_yaml("stage1.yaml")), opts, evaluate_only=False, job_id=job)
    return final_checkpoint(Path(runner.output_dir))


def _retrieval(out: Path, job: str, bert: Path, ckpt: Path) -> Dict[str, float]:
    from lavis_plugins import cli
    from lavis_plugins.demo import demo_yaml

    opts = [f"run.output_dir={out}", f"model.bert_path={bert}", f"model.finetuned={ckpt}",
            "model.load_finetuned=True"]
    _, result = cli.run(str(demo_yaml("retrieval_eval.yaml")), opts, evaluate_only=True,
                        job_id=job)
    return {k: float(v) for k, v in (result.get("test") or {}).items()
            if isinstance(v, (int, float))}


def run_demo_capfilt(out: Path, fraction: float = CORRUPT_FRACTION, force: bool = False,
                     stage1_options: Sequence[str] = (), capfilt_options: Sequence[str] = (),
                     threads: Optional[int] = 1) -> Tuple[Path, Dict[str, Any]]:
    """Run the experiment into ``out``; return the report's path and the measured figures."""
    import torch

    from lavis_plugins import cli
    from lavis_plugins.cli.make_shards import make_shards
    from lavis_plugins.demo import make_demo_bert, prepare_output
    from lavis_plugins.demo_data import ensure_shapes_dataset

    if not 0 < fraction < 1:
        raise UserError(f"--fraction {fraction}: must be between 0 and 1")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    t0 = time.time()
    try:
        out = Path(out).expanduser().absolute()
        prepare_output(out, force)
        data = ensure_shapes_dataset()
        images = data / "images"
        bert = make_demo_bert(out / "tiny-bert")
        clean = json.loads((data / "annotations" / "caption_train.json").read_text())
        noisy, flags = corrupt_captions(clean, fraction)
        (out / "caption_train_noisy.json").write_text(json.dumps(noisy))
        (out / "corruption.json").write_text(json.dumps(
            [{"image": a["image"], "caption": a["caption"], "corrupted": f}
             for a, f in zip(noisy, flags)]))
        make_shards(out / "caption_train_noisy.json", images, out / "shards_noisy", SHARD_SIZE,
                    group_by_image=True, force=True, progress=False)
        times: Dict[str, float] = {}

        def timed(key, fn, *args):
            t = time.time()
            res = fn(*args)
            times[key] = time.time() - t
            print(f"[demo-capfilt] {key} done in {times[key]:.0f} s", flush=True)
            return res

        ckpt_noisy = timed("stage1_noisy", _stage1, out, "stage1_noisy", bert,
                           out / "shards_noisy", stage1_options)
        r_noisy = timed("retrieval_noisy", _retrieval, out, "retrieval_noisy", bert, ckpt_noisy)
        capfilt_out = out / "capfilt"
        noisy_file = out / "caption_train_noisy.json"
        opts = [f"model.bert_path={bert}", f"model.finetuned={ckpt_noisy}",
                f"datasets.lp_capfilt_input.build_info.annotations={noisy_file}",
                f"datasets.lp_capfilt_input.build_info.images.storage={images}",
                f"run.output_dir={out / 'logs'}", f"run.capfilt.output={capfilt_out}",
                f"run.capfilt.shards={out / 'shards_capfilt'}",
                f"run.capfilt.shard_size={SHARD_SIZE}", *capfilt_options]
        from lavis_plugins.paths import resource_dir

        timed("capfilt", cli.run, str(resource_dir("projects") / "capfilt" / "demo.yaml"), opts,
              True, "capfilt")
        merged = json.loads((capfilt_out / "capfilt.json").read_text())
        table = {(a["image"], a["caption"]): f for a, f in zip(noisy, flags)}
        quality = filter_quality(merged, table, {a["image"]: a["caption"] for a in clean})
        summary = json.loads((capfilt_out / "report" / "summary.json").read_text())
        ckpt_cf = timed("stage1_capfilt", _stage1, out, "stage1_capfilt", bert,
                        out / "shards_capfilt", stage1_options)
        r_cf = timed("retrieval_capfilt", _retrieval, out, "retrieval_capfilt", bert, ckpt_cf)
    finally:
        torch.set_num_threads(previous)
    figures = {"fraction": fraction, "filter": quality, "capfilt_summary": summary,
               "retrieval": {"noisy": r_noisy, "capfilt": r_cf}, "seconds": times,
               "total_seconds": time.time() - t0}
    (out / METRICS_JSON).write_text(json.dumps(figures, indent=1) + "\n")
    report = write_report(out, figures)
    print("\n" + report.read_text(), flush=True)
    return report, figures


def format_tables(f: Dict[str, Any]) -> str:
    """The report's two tables in markdown (also in the README)."""
    q, r = f["filter"], f["retrieval"]
    lines = [f"| CapFilt on {100 * f['fraction']:.0f}% corrupted captions | % |", "|---|---:|",
             f"| corrupted web captions removed (of {q['corrupted_web']}) | "
             f"{q['corrupted_removed']:.1f} |",
             f"| correct web captions kept (of {q['correct_web']}) | {q['correct_kept']:.1f} |",
             f"| kept captions that are synthetic | {q['kept_synthetic']:.1f} |",
             f"| kept synthetic captions naming the image's colours and shapes | "
             f"{q.get('synthetic_right', float('nan')):.1f} |", "",
             "| stage-1 model trained on | text->image R@1 (ITM re-rank) | image->text R@1 "
             "(ITM re-rank) | text->image R@1 (ITC) | image->text R@1 (ITC) | ITM accuracy |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, key in (("noisy captions", "noisy"), ("CapFilt output", "capfilt")):
        m = r[key]
        lines.append(f"| {name} | {m['img_r1']:.2f} | {m['txt_r1']:.2f} | "
                     f"{m.get('itc_img_r1', float('nan')):.2f} | "
                     f"{m.get('itc_txt_r1', float('nan')):.2f} | "
                     f"{m.get('itm_acc', float('nan')):.1f} |")
    return "\n".join(lines)


def write_report(out: Path, f: Dict[str, Any]) -> Path:
    s = f["capfilt_summary"]
    md = ["# CapFilt on the shapes demo", "",
          f"Run {datetime.now():%Y-%m-%d %H:%M} on {os.cpu_count()} CPU core(s), "
          f"{f['total_seconds'] / 60:.1f} min. Captioner and filter: the stage-1 model trained "
          "on the noisy captions (its ITG decoder and its ITM/ITC heads). Retrieval: the shapes "
          "test split (200 images, chance R@1 0.5%); both stage-1 runs take the same steps. "
          "ITM accuracy: balanced, on the re-ranked ITC top-k pairs (chance 50%).", "",
          format_tables(f), "",
          f"CapFilt kept {s['web_kept']} of {s['web_captions']} web captions and "
          f"{s['synthetic_kept']} of {s['synthetic_captions']} synthetic ones; the web captions "
          f"of {s['images_web_replaced']} images were all replaced. Its report: "
          "capfilt/report/report.md.", "",
          "Times: " + ", ".join(f"{k} {v:.0f} s" for k, v in f["seconds"].items()), ""]
    path = out / REPORT
    path.write_text("\n".join(md))
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lavis_plugins.demo_capfilt",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None,
                   help="output folder (default: ./demo_output/capfilt-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--fraction", type=float, default=CORRUPT_FRACTION,
                   help=f"share of training captions to corrupt (default {CORRUPT_FRACTION})")
    p.add_argument("--force", action="store_true", help="replace a finished run in --out")
    args = p.parse_args(argv)
    from lavis_plugins.demo import out_folder, run_reporting_errors

    return run_reporting_errors("demo-capfilt", lambda: run_demo_capfilt(
        out_folder(args.out, "capfilt-"), args.fraction, args.force))

if __name__ == "__main__":
    sys.exit(main())
