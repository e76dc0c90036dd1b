"""Zero-shot image classification with the stage-1 model: ``lp_zeroshot_classification``.

CLIP's recipe on BLIP-2's ITC features: each class's weight is the average of the normalised
text features (``text_proj`` of [CLS]) of every prompt template filled with its name,
renormalised (prompt ensembling); an image's score for a class is the best cosine similarity
over its query features (BLIP-2's ITC takes the max over the queries). Optionally the top
``itm_rerank_k`` classes of each image are re-ranked by ITC + the ITM matched logit pooled over
the class's templates by the ``template_pooling`` rule, as BLIP-2 re-ranks retrieval candidates.

``template_pooling: max`` scores each template on its own and keeps a class's best template
instead (``mean``: CLIP's averaged embedding, the default). ITM re-ranking follows the same
rule: the class's best template's ITM logit under ``max``, the templates' mean under ``mean``,
so templates that describe other images of the class do not pull it down. Templates that
name what varies between images of one class (size, position: "a small {}", "a large {} on the
left") describe each image with only some of them; the averaged embedding then sits between
contradicting descriptions, and a well-trained ITC classifies with it at chance. Measured on
the shapes demo (18 colour+shape classes, 85 images; a width-64 stage 1 retrieving 54-67% R@1):
the demo's 9 templates averaged 7.1-10.6% top-1, "a small {}" + "a large {}" averaged
4.7-7.1%, either alone 40-56% (docs/capfilt_demo.md).

``run:`` keys: ``templates`` (a set name of :mod:`zeroshot_templates` or a list; default
"imagenet80"), ``template_pooling`` ("mean" | "max", for ITC and ITM), ``itm_rerank_k`` (0: off),
``confusion_max_classes`` (no confusion-matrix PNG above this many classes; default 100).
Data: any dataset whose samples carry ``image``, ``label`` and ``index`` and which has
``classnames`` (``lp_imagefolder``).

Reports top-1 and top-5 accuracy (%; top-k with k = min(5, classes)), the mean per-class
accuracy and each class's accuracy; writes ``<split>_zeroshot[_<epoch>].jsonl`` (one line per
image: path, label, top-5 classes and scores), ``..._confusion.png`` and ``..._metrics.json``
into the run's result folder. Distributed: each process scores its shard of the images; the
main process merges and reports.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from lavis.tasks.base_task import BaseTask
from torch import Tensor

from lavis_plugins.common import dist
from lavis_plugins.common.errors import UserError
from lavis_plugins.tasks.retrieval import encode_texts
from lavis_plugins.tasks.zeroshot_templates import resolve_templates

logger = logging.getLogger(__name__)

TOP_K = 5  # classes kept per image in the results file; top-k accuracy reported
BELOW_RERANKED = -1e4  # added to classes outside the ITM re-ranked top-k: they stay below
TEMPLATE_POOLING = ("mean", "max")


@dataclass
class ZeroShotSettings:
    """The task's ``run:`` keys (each default written here only)."""

    templates: Any = "imagenet80"  # template-set name or list of templates with one {}
    # "mean": CLIP's prompt ensemble (one averaged embedding per class); "max": each class's
    # best-matching template (templates naming attributes that vary within a class); ITM
    # re-ranking pools its per-template logits by the same rule
    template_pooling: str = "mean"
    itm_rerank_k: int = 0  # re-rank each image's top-k classes by ITC + ITM; 0: ITC only
    confusion_max_classes: int = 100  # no confusion-matrix PNG above this many classes

    @classmethod
    def from_run_cfg(cls, run: Mapping[str, Any]) -> "ZeroShotSettings":
        s = cls(**{k: run[k] for k in ("templates", "template_pooling", "itm_rerank_k",
                                       "confusion_max_classes")
                   if k in run and run[k] is not None})
        if s.template_pooling not in TEMPLATE_POOLING:
            raise UserError(f"run.template_pooling must be one of {', '.join(TEMPLATE_POOLING)}, "
                            f"got {s.template_pooling!r}")
        s.templates = resolve_templates(
            list(s.templates) if not isinstance(s.templates, str) else s.templates)
        for key in ("itm_rerank_k", "confusion_max_classes"):
            value = getattr(s, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"run.{key} must be a whole number >= 0, got {value!r}")
        return s


@torch.no_grad()
def class_weights(model, classnames: Sequence[str], templates: Sequence[str],
                  pooling: str = "mean"):
    """Zero-shot classifier: ``mean``: (C, E) normalised mean of each class's normalised prompt
    features; ``max``: (C, T, E) every prompt's normalised features. Plus the prompts' token ids
    and masks (C*T, L), class-major, for ITM re-ranking."""
    if not classnames:
        raise UserError("zero-shot classification needs at least one class")
    prompts = [t.format(c) for c in classnames for t in templates]
    ids, atts, feats = encode_texts(model, prompts)  # feats (C*T, E), each normalised
    feats = feats.view(len(classnames), len(templates), -1)
    weights = feats if pooling == "max" else F.normalize(feats.mean(1), dim=-1)
    return weights, ids, atts


@torch.no_grad()
def itc_class_scores(image_feats: Tensor, weights: Tensor) -> Tensor:
    """(B, Nq, E) normalised query features x class weights -> (B, C) cosine scores, the max
    over the queries (and, for (C, T, E) weights, over each class's templates)."""
    if weights.dim() == 3:
        return torch.einsum("bqe,cte->bcqt", image_feats, weights).flatten(2).max(dim=2).values
    return torch.einsum("bqe,ce->bqc", image_feats, weights).max(dim=1).values


@torch.no_grad()
def itm_rerank(model, image_embeds: Tensor, scores: Tensor, ids: Tensor, atts: Tensor,
               n_templates: int, k: int, pooling: str) -> Tensor:
    """Scores (B, C) with each image's top-``k`` classes re-scored ITC + the ITM matched logit
    pooled over the class's ``n_templates`` prompts (ids/atts (C*T, L)) by ``pooling`` ("mean"
    or "max", as the ITC scores were); the other classes keep their order below them.
    ``image_embeds``: the images' encoder features (B, N, Dv)."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices  # (B, k)
    out = scores + BELOW_RERANKED
    offsets = torch.arange(n_templates, device=scores.device)
    for b in range(scores.shape[0]):
        rows = (top[b, :, None] * n_templates + offsets).flatten()  # (k*T,) prompts
        embeds = image_embeds[b:b + 1]
        kv = model.Qformer.bert.image_kv(embeds)  # one image, shared by all its prompts
        itm = model.itm_logits(embeds, ids[rows], atts[rows],
                               image_kv=kv._replace(repeats=len(rows)))[:, 1].float()
        per_template = itm.view(k, n_templates)  # (k, T)
        pooled = per_template.max(1).values if pooling == "max" else per_template.mean(1)
        out[b, top[b]] = scores[b, top[b]] + pooled
    return out


@torch.no_grad()
def classify(model, images: Tensor, weights: Tensor, rerank: Optional[dict] = None) -> Tensor:
    """(B, 3, H, W) images -> (B, C) class scores of the zero-shot classifier ``weights``.

    ``rerank``: ``{"ids", "atts", "n_templates", "k", "pooling"}`` to re-rank the top k classes
    by ITM (its logits pooled over each class's templates by ``pooling``: "mean" | "max")."""
    query, image_embeds = model.forward_image(images)  # (B, Nq, D), (B, N, Dv)
    scores = itc_class_scores(F.normalize(model.vision_proj(query), dim=-1), weights)
    if rerank and rerank["k"] > 0:
        scores = itm_rerank(model, image_embeds, scores, rerank["ids"], rerank["atts"],
                            rerank["n_templates"], rerank["k"], rerank["pooling"])
    return scores


def classification_metrics(labels: np.ndarray, topk: np.ndarray,
                           classnames: Sequence[str]) -> Dict[str, Any]:
    """top1 / top5 / mean per-class accuracy (%) and each class's top-1 accuracy, from labels
    (N,) and each image's best classes (N, k), best first."""
    hit1 = topk[:, 0] == labels
    per_class = {}
    for c, name in enumerate(classnames):
        mask = labels == c
        if mask.any():
            per_class[name] = float(100.0 * hit1[mask].mean())
    return {"top1": float(100.0 * hit1.mean()),
            "top5": float(100.0 * (topk[:, :TOP_K] == labels[:, None]).any(1).mean()),
            "mean_per_class": float(np.mean(list(per_class.values()))),
            "per_class": per_class, "num_images": int(len(labels)),
            "num_classes": len(classnames)}


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, n: int) -> np.ndarray:
    """(n, n) counts: row = true class, column = predicted class."""
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (labels, preds), 1)
    return m


def plot_confusion(matrix: np.ndarray, classnames: Sequence[str], path: Path,
                   title: str) -> Path:
    """Row-normalised confusion matrix as a PNG (counts written in cells when few classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classnames)
    rows = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    side = min(3 + 0.35 * n, 30)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(classnames, rotation=90, fontsize=7)
    ax.set_yticklabels(classnames, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if rows[i, j] > 0.5 else "black")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@registry.register_task("lp_zeroshot_classification")
class ZeroShotClassificationTask(BaseTask):
    """Zero-shot classification of an image dataset by prompt-ensembled ITC (+ optional ITM)."""

    def __init__(self, settings: ZeroShotSettings) -> None:
        super().__init__()
        self.settings = settings

    @classmethod
    def setup_task(cls, cfg=None, **kwargs) -> "ZeroShotClassificationTask":
        return cls(ZeroShotSettings.from_run_cfg(cfg.run_cfg if cfg is not None else {}))

    def evaluation(self, model, data_loader, **kwargs) -> Optional[Dict[str, Any]]:
        """Score this process's images; on the main process return every image's record."""
        model = getattr(model, "module", model)  # DDP-wrapped or not
        dataset = data_loader.dataset
        classnames = getattr(dataset, "classnames", None)
        if not classnames:
            raise UserError(f"{type(dataset).__name__} has no classnames; zero-shot "
                            "classification needs a classification dataset (lp_imagefolder)")
        templates = self.settings.templates
        weights, ids, atts = class_weights(model, classnames, templates,
                                           self.settings.template_pooling)
        rerank = {"ids": ids, "atts": atts, "n_templates": len(templates),
                  "k": self.settings.itm_rerank_k, "pooling": self.settings.template_pooling}
        k = min(TOP_K, len(classnames))
        local = []
        for samples in data_loader:
            scores = classify(model, samples["image"].to(model.device), weights, rerank)
            top = scores.topk(k, dim=1)
            local += [{"index": int(i), "label": int(y), "topk": t, "scores": s}
                      for i, y, t, s in zip(samples["index"].tolist(), samples["label"].tolist(),
                                            top.indices.tolist(), top.values.tolist())]
        merged = [r for part in dist.all_gather_object(local) for r in part]
        if not dist.is_main_process():
            return None
        merged.sort(key=lambda r: r["index"])
        paths = [p for p, _ in getattr(dataset, "samples", [])]
        for r in merged:
            if paths:
                r["image"] = paths[r["index"]]
        return {"records": merged, "classnames": list(classnames)}

    def after_evaluation(self, val_result: Dict[str, Any], split_name: str, epoch: Any,
                         **kwargs) -> Dict[str, Any]:
        """Metrics of the merged records; write the results file, metrics and confusion PNG."""
        records, classnames = val_result["records"], val_result["classnames"]
        if not records:
            raise UserError(f"split {split_name!r} has no images to classify")
        labels = np.array([r["label"] for r in records])
        topk = np.array([r["topk"] for r in records])
        metrics = classification_metrics(labels, topk, classnames)
        metrics["agg_metrics"] = metrics["top1"]
        result_dir = Path(registry.get_path("result_dir"))
        stem = f"{split_name}_zeroshot" + (f"_{epoch}" if epoch is not None else "")
        with open(result_dir / f"{stem}.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps({"image": r.get("image", r["index"]),
                                    "label": classnames[r["label"]],
                                    "top5": [classnames[c] for c in r["topk"]],
                                    "scores": [round(s, 5) for s in r["scores"]],
                                    "correct": r["topk"][0] == r["label"]}) + "\n")
        (result_dir / f"{stem}_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        if len(classnames) <= self.settings.confusion_max_classes:
            plot_confusion(confusion_matrix(labels, topk[:, 0], len(classnames)), classnames,
                           result_dir / f"{stem}_confusion.png",
                           f"zero-shot {split_name}: top-1 {metrics['top1']:.1f}%")
        logger.info("zero-shot classification %s: top1 %.2f top5 %.2f mean per class %.2f",
                    split_name, metrics["top1"], metrics["top5"], metrics["mean_per_class"])
        return metrics
