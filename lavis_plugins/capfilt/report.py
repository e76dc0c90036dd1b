"""CapFilt's report: kept/replaced counts, a histogram of filter scores, an example grid.

Written into ``<output>/report/``: ``summary.json``, ``report.md``, ``scores_hist.png`` (the
web and synthetic captions' scores, kept and dropped) and ``examples.png`` (images with their
web and synthetic captions, scores, and which were kept).
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from lavis_plugins.capfilt.candidates import SYNTHETIC, WEB
from lavis_plugins.capfilt.config import SCORE_HEADS

ImageLoader = Callable[[int, Mapping[str, Any]], Any]  # (input index, merged entry) -> PIL image

REPORT_DIR = "report"


def summarise(merged: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Counts over the merged entries (``capfilt.json``)."""
    c = {"images": len(merged), "images_without_caption": 0, "web_captions": 0, "web_kept": 0,
         "synthetic_captions": 0, "synthetic_kept": 0, "images_web_replaced": 0,
         "bad_samples": 0}
    for e in merged:
        if "bad" in e["capfilt"]:  # unreadable: not processed
            c["bad_samples"] += 1
            continue
        cands, kept = e["capfilt"]["candidates"], set(e["capfilt"]["kept"])
        web = [i for i, x in enumerate(cands) if x["source"] == WEB]
        syn = [i for i, x in enumerate(cands) if x["source"] == SYNTHETIC]
        c["web_captions"] += len(web)
        c["web_kept"] += len(kept & set(web))
        c["synthetic_captions"] += len(syn)
        c["synthetic_kept"] += len(kept & set(syn))
        c["images_without_caption"] += not kept
        c["images_web_replaced"] += bool(kept) and not kept & set(web)
    c["web_removed"] = c["web_captions"] - c["web_kept"]
    c["kept_per_image"] = round((c["web_kept"] + c["synthetic_kept"]) / max(len(merged), 1), 3)
    return c


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_histogram(merged: Sequence[Mapping[str, Any]], path: Path) -> Optional[Path]:
    """One panel per computed score: web / synthetic captions, kept / dropped, stacked."""
    heads = [h for h in SCORE_HEADS if any(h in c for e in merged
                                               for c in e["capfilt"]["candidates"])]
    if not heads:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(heads), figsize=(5 * len(heads), 3.4), squeeze=False)
    for ax, head in zip(axes[0], heads):
        groups: Dict[str, List[float]] = {}
        for e in merged:
            kept = set(e["capfilt"]["kept"])
            for i, c in enumerate(e["capfilt"]["candidates"]):
                if head in c:
                    key = f"{c['source']} {'kept' if i in kept else 'dropped'}"
                    groups.setdefault(key, []).append(c[head])
        names = sorted(groups)
        ax.hist([groups[k] for k in names], bins=30, stacked=True, label=names)
        ax.set_xlabel({"itm": "ITM matched probability", "itc": "ITC similarity",
                       "clip": "CLIP similarity"}[head])
        ax.set_ylabel("captions")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_examples(merged: Sequence[Mapping[str, Any]], load_image: ImageLoader, path: Path,
                  k: int) -> Optional[Path]:
    """``k`` images (spread over the input), each beside its candidates with scores; kept ones
    marked ``*``. ``load_image(index, entry)``: the PIL image of input image ``index``."""
    good = [i for i, e in enumerate(merged) if "bad" not in e["capfilt"]]
    if k <= 0 or not good:
        return None
    plt = _plt()
    step = max(len(good) // k, 1)
    picked = good[::step][:k]
    fig, axes = plt.subplots(len(picked), 2, figsize=(10, 2.2 * len(picked)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 4]})
    for (ax_img, ax_txt), i in zip(axes, picked):
        e = merged[i]
        ax_img.imshow(load_image(i, e))
        ax_img.axis("off")
        kept = set(e["capfilt"]["kept"])
        lines = []
        for i, c in enumerate(e["capfilt"]["candidates"]):
            scores = " ".join(f"{h}={c[h]:.2f}" for h in SCORE_HEADS if h in c)
            mark = "*" if i in kept else " "
            text = textwrap.shorten(c["caption"], 70)
            lines.append(f"{mark} [{c['source'][:3]}] {scores}  {text}")
        ax_txt.text(0, 1, "\n".join(lines[:12]), va="top", family="monospace", fontsize=6.5)
        ax_txt.axis("off")
    fig.suptitle("CapFilt examples (* kept; web = original caption, syn = synthetic)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, merged: Sequence[Mapping[str, Any]], summary: Mapping[str, Any],
                 load_image: ImageLoader, examples: int) -> Path:
    """Write ``report/`` (see the module doc); return ``report.md``'s path. ``load_image``: see
    :func:`plot_examples`."""
    folder = out / REPORT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(dict(summary), indent=1) + "\n")
    hist = plot_histogram(merged, folder / "scores_hist.png")
    grid = plot_examples(merged, load_image, folder / "examples.png", examples)
    s = summary
    md = ["# CapFilt report", "",
          f"{s['images']} images; web captions kept {s['web_kept']} of {s['web_captions']} "
          f"(removed {s['web_removed']}); synthetic captions kept {s['synthetic_kept']} of "
          f"{s['synthetic_captions']}; images whose web captions were all replaced by synthetic "
          f"ones: {s['images_web_replaced']}; images left without a caption: "
          f"{s['images_without_caption']}; captions kept per image: {s['kept_per_image']}; "
          f"unreadable samples skipped: {s['bad_samples']}.", ""]
    for title, img in (("Filter scores", hist), ("Examples", grid)):
        if img is not None:
            md += [f"## {title}", "", f"![{title}]({img.name})", ""]
    path = folder / "report.md"
    path.write_text("\n".join(md))
    return path
