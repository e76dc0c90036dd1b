"""Why ITM re-ranking does not beat ITC alone on the demo, measured: one demo stage-1 checkpoint,
the shapes retrieval split (200 images, 800 captions), ITC's k_test candidates per image and per
text, and R@1 of several ways to score them.

    python benchmarks/itm_rerank_shapes.py --run demo_output/<run> [--split test] [--k 16]

``--run`` is a ``make demo`` output folder (or ``run_demo(out, stages=("stage1", "retrieval"))``):
its ``tiny-bert/`` and ``stage1/checkpoint_latest.pth`` are read. Rows: ITC alone; LAVIS's rule
(``compute_sim_matrix``: ITM matched logit + ITC cosine, what ``lp_retrieval`` computes); ITM
alone (matched logit, and log-odds l1 - l0); log-odds + ITC logit (cosine / the model's
temperature, the scale ITC was trained at). Also the ranges of both scores over the candidates
and the ITM head's balanced accuracy on them. ~1 min CPU.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def candidate_scores(run: Path, split: str, k: int) -> Dict[str, np.ndarray]:
    """ITC cosine ``S`` (Ni, Nt), ITM logits ``L0``/``L1`` (NaN outside the candidates),
    ground truth ``truth`` (Ni, Nt) and the model's ITC temperature ``temp``."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    from lavis_plugins.api import load_model
    from lavis_plugins.paths import config_path
    from lavis_plugins.tasks.retrieval import encode_texts

    model = load_model("lp_blip2_qformer", "tiny", is_eval=True, bert_path=str(run / "tiny-bert"),
                       image_size=64, cross_attention_freq=1, load_finetuned=True,
                       finetuned=str(run / "stage1" / "checkpoint_latest.pth"))
    cfg = OmegaConf.load(config_path("datasets/lp_shapes/defaults_retrieval.yaml"))
    ds = registry.get_builder_class("lp_shapes_retrieval")(
        cfg.datasets.lp_shapes_retrieval).build_datasets()[split]
    ni, nt = len(ds.image), len(ds.text)
    with torch.no_grad():
        ids, atts, text_feats = encode_texts(model, list(ds.text))
        query, embeds = model.forward_image(torch.stack([ds[i]["image"] for i in range(ni)]))
        image_feats = F.normalize(model.vision_proj(query), dim=-1)  # (Ni, Nq, E)
        sims = torch.einsum("iqe,te->itq", image_feats, text_feats).max(-1).values  # (Ni, Nt)
        pairs = {i: set(r) for i, r in enumerate(sims.topk(k, 1).indices.tolist())}
        for t, row in enumerate(sims.t().topk(k, 1).indices.tolist()):
            for i in row:
                pairs[i].add(t)
        l0 = torch.full((ni, nt), float("nan"))
        l1 = l0.clone()
        for i in range(ni):
            ts = torch.tensor(sorted(pairs[i]))
            logits = model.itm_logits(embeds[i:i + 1].expand(len(ts), -1, -1), ids[ts], atts[ts])
            l0[i, ts], l1[i, ts] = logits[:, 0], logits[:, 1]
    truth = np.zeros((ni, nt), bool)
    for i, ts in ds.img2txt.items():
        truth[i, ts] = True
    return {"S": sims.numpy(), "L0": l0.numpy(), "L1": l1.numpy(), "truth": truth,
            "temp": float(model.temp)}


def recall_at_1(sims: np.ndarray, score: np.ndarray, truth: np.ndarray, k: int
                ) -> Tuple[float, float]:
    """(text->image, image->text) R@1 (%) when ``score`` re-ranks each query's ITC top k."""
    top_t, top_i = np.argsort(-sims, 1)[:, :k], np.argsort(-sims.T, 1)[:, :k]
    i2t = np.mean([truth[i, top_t[i][np.argmax(score[i, top_t[i]])]] for i in range(len(sims))])
    t2i = np.mean([truth[top_i[t][np.argmax(score[top_i[t], t])], t] for t in range(sims.shape[1])])
    return round(100 * float(t2i), 2), round(100 * float(i2t), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, type=Path, help="a demo output folder")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--k", type=int, default=16, help="ITC candidates (the demo's k_test)")
    args = p.parse_args()
    torch.set_num_threads(1)
    d = candidate_scores(args.run, args.split, args.k)
    s, l0, l1, truth = d["S"], d["L0"], d["L1"], d["truth"]
    rules: Dict[str, Callable[[], np.ndarray]] = {
        "ITC alone": lambda: s,
        "LAVIS: ITM matched logit + ITC cosine": lambda: l1 + s,
        "ITM matched logit alone": lambda: l1,
        "ITM log-odds alone": lambda: l1 - l0,
        "ITM log-odds + ITC cosine / temp": lambda: l1 - l0 + s / d["temp"],
    }
    print(f"| rule ({args.split}, k={args.k}) | text->image R@1 | image->text R@1 |")
    print("|---|---:|---:|")
    for name, rule in rules.items():
        t2i, i2t = recall_at_1(s, rule(), truth, args.k)
        print(f"| {name} | {t2i:.2f} | {i2t:.2f} |")
    seen = ~np.isnan(l1)
    odds = (l1 - l0)[seen]
    acc = 50 * ((odds[truth[seen]] > 0).mean() + (odds[~truth[seen]] <= 0).mean())
    print(f"\ncandidates: ITC cosine {s[seen].min():.3f}..{s[seen].max():.3f}, ITM matched logit "
          f"{l1[seen].min():.2f}..{l1[seen].max():.2f}; ITM balanced accuracy {acc:.1f}%; "
          f"ITC temperature {d['temp']:.4f}")


if __name__ == "__main__":
    main()
