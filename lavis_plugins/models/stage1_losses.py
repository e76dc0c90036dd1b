"""Optional stage-1 loss terms from the vision-language survey, as plain functions of what
``lp_blip2_qformer`` already computes (its options ``cyclip`` and ``momentum_distill``).

- CyCLIP (Goel et al. 2022): cyclic consistency between the image and text spaces. Cross-modal:
  the image-text similarity matrix should be symmetric, <I_j, T_k> = <I_k, T_j>; in-modal:
  image-image similarities should equal text-text ones, <I_j, I_k> = <T_j, T_k>. Each term is the
  sum of squared differences over the pairs divided by the batch size (CyCLIP's normalisation),
  on cosine similarities (no temperature).
- ALBEF (Li et al. 2021) momentum distillation: the contrastive and language-model targets are
  mixed with a momentum (EMA) model's soft predictions, ``(1 - alpha) * hard + alpha * soft``.
  Cross-entropy is linear in its targets, so the loss is ``(1 - alpha) * plain + alpha *
  CE(soft)``: alpha = 0 is the plain loss exactly.

BLIP-2 specifics: an image is Nq query features; its image-text similarity is the max over the
queries (as ITC), and its image-image similarity the mean over queries of the cosine between the
same query of both images (queries are learned slots, so query q of one image corresponds to
query q of another; the diagonal is 1, as the text-text one). Under a process group each rank
computes the rows of its own images/texts against the global batch, and divides by its local
batch: DDP's average over ranks then equals the single-process loss over the global batch.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # label of a position without a target (cross_entropy's default ignore_index)


def cyclip_losses(cos_i2t: Tensor, cos_t2i: Tensor, image_feats: Tensor,
                  image_feats_all: Tensor, text_feat: Tensor, text_feat_all: Tensor
                  ) -> Tuple[Tensor, Tensor]:
    """CyCLIP's (in-modal, cross-modal) cyclic consistency terms of this rank's rows.

    cos_i2t (B, W*B): local images vs all texts, cos_t2i (B, W*B): local texts vs all images
    (cosine, max over queries); image_feats (B, Nq, E) / image_feats_all (W*B, Nq, E) and
    text_feat (B, E) / text_feat_all (W*B, E): normalised features of this rank / all ranks.
    """
    b = text_feat.shape[0]
    # cross-modal: cos_i2t[j, k] = <I_j, T_k>, cos_t2i[j, k] = <I_k, T_j>
    cross = (cos_i2t - cos_t2i).square().sum() / b
    sim_ii = torch.einsum("bqe,nqe->bn", image_feats, image_feats_all) / image_feats.shape[1]
    sim_tt = text_feat @ text_feat_all.t()  # (B, W*B)
    inmodal = (sim_ii - sim_tt).square().sum() / b
    return inmodal, cross


def distill_cross_entropy(logits: Tensor, target: Tensor, soft: Tensor, alpha: Tensor,
                          label_smoothing: float, keep: Optional[Tensor] = None) -> Tensor:
    """``(1 - alpha) * CE(logits, target) + alpha * CE(logits, soft)`` (both with BLIP-2's label
    smoothing): ALBEF's loss on targets ``(1 - alpha) * one_hot + alpha * soft``.

    logits (N, C), target (N,) class indices, soft (N, C) probabilities (no gradient), alpha a
    0-dim tensor (a tensor, so the ramp needs no host sync); ``keep`` (N,) bool: average over
    these rows only (``target`` is ``IGNORE`` at the others)."""
    if keep is None:
        hard = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
        distilled = F.cross_entropy(logits, soft, label_smoothing=label_smoothing)
        return (1 - alpha) * hard + alpha * distilled
    hard = F.cross_entropy(logits, target, label_smoothing=label_smoothing, ignore_index=IGNORE)
    # probability targets take no ignore_index: a masked mean of the per-row losses
    rows = F.cross_entropy(logits, soft, label_smoothing=label_smoothing, reduction="none")
    distilled = (rows * keep).sum() / keep.sum()
    return (1 - alpha) * hard + alpha * distilled
