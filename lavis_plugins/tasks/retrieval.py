"""Image-text retrieval with the stage-1 BLIP-2 model: ``lp_retrieval``.

BLIP-2's inference (and LAVIS's ``compute_sim_matrix``): ITC similarity (max over the queries)
for every image-text pair; for each image its ``k_test`` best texts and for each text its
``k_test`` best images are re-ranked by ``ITM + ITC``; other pairs score -100. Recall@1/5/10
both ways are LAVIS's ``RetrievalTask`` metrics.

Differences from LAVIS, same scores: each image's cross-attention keys/values are computed once
for all the texts it is paired with (LAVIS copies the image k times), and a pair in both top-k
lists is scored once. Distributed: each process encodes the images its loader gives it (under
``lp_runner`` a share of them, under LAVIS's runner all: duplicates are resolved) and scores the
pairs of the images it owns; ITC features are gathered and the score matrices summed across
processes. ``run.k_test`` (default 128) sets k.

Beside LAVIS's metrics it reports what the re-ranking is compared with: R@1 of ITC alone
(``itc_txt_r1``, ``itc_img_r1``) and the ITM head's balanced accuracy on the re-ranked pairs
(``itm_acc``).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from lavis.common.registry import registry
from lavis.tasks.retrieval import RetrievalTask
from torch import Tensor

from lavis_plugins.common import dist
from lavis_plugins.common.errors import UserError

logger = logging.getLogger(__name__)

DEFAULT_K_TEST = 128  # ITC candidates re-ranked by ITM, per image and per text (BLIP-2's k)
NOT_RERANKED = -100.0  # score of a pair outside both top-k lists (as LAVIS)
_TEXT_BATCH = 256  # captions per text-encoder pass
_ITM_BATCH = 256  # texts per ITM pass (all against one image)


@torch.no_grad()
def encode_texts(model, texts: List[str]) -> Tuple[Tensor, Tensor, Tensor]:
    """All captions -> input ids (Nt, T), attention mask (Nt, T), ITC features (Nt, E)."""
    tokens = model.tokenize(texts)
    feats = []
    for s in range(0, len(texts), _TEXT_BATCH):
        part = type(tokens)({k: v[s:s + _TEXT_BATCH] for k, v in tokens.items()})
        feats.append(F.normalize(model.text_proj(model.forward_text(part)), dim=-1))
    return tokens.input_ids, tokens.attention_mask, torch.cat(feats)


@torch.no_grad()
def compute_retrieval_scores(model, data_loader, k_test: int = DEFAULT_K_TEST,
                             details: Optional[Dict[str, np.ndarray]] = None
                             ) -> Tuple[np.ndarray, np.ndarray]:
    """``(score_i2t (Ni, Nt), score_t2i (Nt, Ni))`` on every process.

    ``details``, if given, receives ``itc`` (Ni, Nt) the ITC similarities alone, ``itm_match``
    (Ni, Nt) the ITM head's decision (1: matched, 0: not, -1: pair not re-ranked).

    ``data_loader.dataset`` has ``text`` (all captions) and ``image`` (one entry per image) and
    yields ``{"image": (B, 3, H, W), "index": (B,)}``. ``model`` is ``lp_blip2_qformer`` (or has
    its ``tokenize``, ``forward_text``, ``forward_image``, ``text_proj``, ``vision_proj``,
    ``itm_logits``, ``Qformer``).
    """
    if k_test < 1:
        raise UserError(f"run.k_test must be at least 1, got {k_test}")
    dataset = data_loader.dataset
    texts = list(dataset.text)
    num_images = len(dataset.image)
    if not texts or not num_images:
        raise UserError("retrieval evaluation needs at least one image and one caption")
    text_ids, text_atts, text_feats = encode_texts(model, texts)

    # this process's images: ITC features (kept for the gather) and image-encoder features
    local: Dict[int, Tensor] = {}
    local_feats: Dict[int, Tensor] = {}
    for samples in data_loader:
        query, image_embeds = model.forward_image(samples["image"].to(model.device))
        feats = F.normalize(model.vision_proj(query), dim=-1)  # (B, Nq, E)
        for i, idx in enumerate(samples["index"].tolist()):
            local[int(idx)] = image_embeds[i].cpu()  # as LAVIS: wait on the CPU
            local_feats[int(idx)] = feats[i].cpu()

    # every process gets every image's ITC features; an image's owner is the lowest rank with it
    owner: Dict[int, int] = {}
    image_feats: Optional[Tensor] = None
    for rank, part in enumerate(dist.all_gather_object(local_feats)):
        for idx, f in part.items():
            if idx not in owner:
                owner[idx] = rank
                if image_feats is None:
                    image_feats = f.new_zeros(num_images, *f.shape)
                image_feats[idx] = f
    missing = sorted(set(range(num_images)) - set(owner))
    if missing:
        raise UserError(f"retrieval: {len(missing)} images were never loaded (e.g. indices "
                        f"{missing[:5]}); the loader must cover dataset.image")
    image_feats = image_feats.to(model.device)
    sims = torch.stack([(f @ text_feats.t()).max(dim=0).values for f in image_feats])  # (Ni, Nt)

    # the pairs to re-rank: each image's top-k texts, each text's top-k images
    k_t, k_i = min(k_test, len(texts)), min(k_test, num_images)
    top_texts = sims.topk(k_t, dim=1).indices  # (Ni, k_t)
    top_images = sims.t().topk(k_i, dim=1).indices  # (Nt, k_i)
    pairs: Dict[int, set] = {i: set(row) for i, row in enumerate(top_texts.tolist())}
    for t, row in enumerate(top_images.tolist()):
        for i in row:
            pairs[i].add(t)

    # this process scores the pairs of the images it owns; the sums over processes hold every
    # scored pair once
    rank = dist.get_rank()
    itm = torch.zeros(num_images, len(texts), device=model.device)
    count = torch.zeros_like(itm)
    match = torch.zeros_like(itm)  # 1 where the ITM head calls the pair a match
    for i in sorted(i for i, r in owner.items() if r == rank):
        ts = torch.tensor(sorted(pairs[i]), device=model.device)
        embeds = local[i].to(model.device)[None]  # (1, N, Dv)
        kv = model.Qformer.bert.image_kv(embeds)
        for s in range(0, len(ts), _ITM_BATCH):
            t = ts[s:s + _ITM_BATCH]
            # all these texts attend to one image: its keys/values serve them together
            logits = model.itm_logits(embeds, text_ids[t], text_atts[t],
                                      image_kv=kv._replace(repeats=len(t)))
            itm[i, t] = logits[:, 1].float()
            match[i, t] = (logits[:, 1] > logits[:, 0]).float()
            count[i, t] = 1
    if dist.get_world_size() > 1:
        torch_dist.all_reduce(itm)
        torch_dist.all_reduce(count)
        torch_dist.all_reduce(match)
    if details is not None:
        details["itc"] = sims.cpu().numpy()
        details["itm_match"] = torch.where(count > 0, match, -1.0).cpu().numpy()
    score = itm + sims
    i2t = torch.full_like(sims, NOT_RERANKED)
    rows = torch.arange(num_images, device=sims.device)[:, None]
    i2t[rows, top_texts] = score[rows, top_texts]
    t2i = torch.full_like(sims.t(), NOT_RERANKED)
    cols = torch.arange(len(texts), device=sims.device)[:, None]
    t2i[cols, top_images] = score.t()[cols, top_images]
    if not (count[rows, top_texts] == 1).all() or not (count.t()[cols, top_images] == 1).all():
        raise RuntimeError("retrieval: a top-k pair was scored by no process or by several")
    return i2t.cpu().numpy(), t2i.cpu().numpy()


def itc_metrics(details: Dict[str, np.ndarray], txt2img, img2txt, k_test: int
                ) -> Dict[str, float]:
    """What ITM re-ranking is compared with: R@1 both ways of ITC similarity alone
    (``itc_txt_r1``, ``itc_img_r1``), and the ITM head's balanced accuracy on the re-ranked
    pairs, the ITC top-k's hard candidates (``itm_acc``, %: the mean of its accuracy on matched
    and on non-matched pairs; chance 50)."""
    itc, match = details["itc"], details["itm_match"]
    txt_r1 = np.mean([int(itc[i].argmax()) in set(img2txt[i]) for i in range(itc.shape[0])])
    img_r1 = np.mean([int(itc[:, t].argmax()) == txt2img[t] for t in range(itc.shape[1])])
    truth = np.zeros_like(match, dtype=bool)
    for i in range(truth.shape[0]):
        truth[i, list(img2txt[i])] = True
    scored = match >= 0
    per_class = [float((match[scored & truth] == 1).mean()) if (scored & truth).any() else 0.0,
                 float((match[scored & ~truth] == 0).mean()) if (scored & ~truth).any() else 0.0]
    return {"itc_txt_r1": 100.0 * float(txt_r1), "itc_img_r1": 100.0 * float(img_r1),
            "itm_acc": 100.0 * float(np.mean(per_class))}


def write_retrieval_topk(cfg, split_name: str, epoch, score_i2t, score_t2i, items: List[str],
                         texts: List[str], img2txt, txt2img, item: str = "image") -> str:
    """Write ``<split>[_epoch<e>]_retrieval_topk.json`` into the run's result folder: for each
    image (video) its ``run.topk_save`` (10) best captions, for each caption its best images, with
    scores and whether each is a ground-truth pair. ``score_i2t`` (Ni, Nt), ``score_t2i``
    (Nt, Ni); ``items``/``texts`` name the rows and columns. Returns the file's path."""
    from lavis_plugins.runners.reporting import result_file_name, topk_rows

    k = int((cfg or {}).get("topk_save", 10))
    out = {f"{item}_to_text": topk_rows(score_i2t, k, items, img2txt, f"{item}_index",
                                         "text_index", target_text=texts),
           f"text_to_{item}": topk_rows(score_t2i, k, texts, txt2img, "text_index",
                                         f"{item}_index")}
    path = os.path.join(registry.get_path("result_dir"),
                        result_file_name(split_name, epoch, "retrieval_topk.json"))
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    logger.info("retrieval top-%d per query written to %s", k, path)
    return path


@registry.register_task("lp_retrieval")
class LPRetrievalTask(RetrievalTask):
    """Image-text retrieval evaluation (R@1/5/10 both ways): ITC top-k re-ranked by ITM."""

    @classmethod
    def setup_task(cls, cfg=None, **kwargs) -> "LPRetrievalTask":
        return cls(cfg=cfg.run_cfg if cfg is not None else {})

    def evaluation(self, model, data_loader, **kwargs) -> Optional[Dict[str, Any]]:
        k_test = int((self.cfg or {}).get("k_test", DEFAULT_K_TEST))
        model = getattr(model, "module", model)  # DDP-wrapped or not
        details: Dict[str, np.ndarray] = {}
        score_i2t, score_t2i = compute_retrieval_scores(model, data_loader, k_test, details)
        if not dist.is_main_process():
            return None
        dataset = data_loader.dataset
        metrics = self._report_metrics(score_i2t, score_t2i, dataset.txt2img, dataset.img2txt)
        metrics.update(itc_metrics(details, dataset.txt2img, dataset.img2txt, k_test))
        logger.info("retrieval (k_test=%d): %s", k_test, metrics)
        self._last = (score_i2t, score_t2i, dataset)  # after_evaluation writes the top-k file
        return metrics

    def after_evaluation(self, val_result, split_name=None, epoch=None, **kwargs):
        """Writes ``<split>[_epoch<e>]_retrieval_topk.json``: for each image its ``run.topk_save``
        (10) best captions, for each caption its best images, with scores and whether each is a
        ground-truth pair."""
        last, self._last = getattr(self, "_last", None), None
        if val_result is None or last is None or not dist.is_main_process():
            return val_result
        score_i2t, score_t2i, dataset = last
        images = [str(getattr(dataset, "image", [None] * len(score_i2t))[i])
                  for i in range(len(score_i2t))]
        write_retrieval_topk(self.cfg, split_name, epoch, score_i2t, score_t2i, images,
                             list(dataset.text), dataset.img2txt, dataset.txt2img)
        return val_result
