"""How stage 1 draws its ITM negatives: the share of ITC-hard negatives per step.

BLIP-2 (and LAVIS) draws each image's negative text and each text's negative image from the
softmaxed ITC similarities ("hard"). ``Blip2QformerConfig.itm_negatives`` can mix those sampling
weights with uniform ones: the weights become ``share * hard + (1 - share) * uniform``, so a
negative is a hard one with probability ``share``:

- ``hard``: share 1 (BLIP-2's; the weights are left untouched, for LAVIS parity);
- ``mixed``: share 1/2; ``random``: share 0;
- ``curriculum``: share 0 (random) at the start, rising linearly to 1 over
  ``itm_curriculum_epochs`` epochs, then 1. A tiny Q-Former trained from scratch learns no ITM on
  hard negatives alone (ITC sharpens first and every hard negative is one word from its
  positive), and one trained on mixed ones ranks ITC's hard candidates poorly; the curriculum
  gives it the coarse signal first and the fine one after. (Measured on the demo, it learns a
  better ITM head than ``mixed`` but does not make ITM re-ranking beat ITC alone on every seed:
  docs/capfilt_demo.md. Starting at 1/2 (mixed) learned less.)

``Blip2QformerConfig.itm_negatives_per_positive`` (N, default 1: BLIP-2's) draws N negative texts
per image and N negative images per text, without replacement from those weights
(:func:`draw_negatives`), so the ITM pass reads (1 + 2N) B pairs. :func:`itm_loss` weighs each
negative by 1/N: the positives keep BLIP-2's weight (1 of 3 parts of the loss) and the loss keeps
its scale beside ITC and ITG; more negatives per positive average out more of the noise of drawing
them, not a shift of the matched / not-matched prior.

``Blip2QformerConfig.itm_loss_weight`` (default 1: BLIP-2's) multiplies ``loss_itm`` in the
stage-1 loss; :func:`check_itm_options` checks every ITM setting.

The training position comes from the ``epoch``, ``iters`` and ``num_iters_per_epoch`` the runner
adds to every training batch (Python ints: reading them is no host sync). A batch without them
(a direct ``forward`` call, evaluation) is treated as past the curriculum: hard negatives.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lavis_plugins.common.errors import UserError

ITM_NEGATIVES = ("hard", "mixed", "random", "curriculum")
# the share of hard negatives of the fixed modes, and the curriculum's starting share
FIXED_SHARE = {"mixed": 0.5, "random": 0.0}
CURRICULUM_START = FIXED_SHARE["random"]


def check_itm_options(cfg: Any) -> None:
    """The ITM settings of ``Blip2QformerConfig`` (``itm_negatives``, ``itm_curriculum_epochs``,
    ``itm_negatives_per_positive``, ``itm_loss_weight``); a bad one is a ``UserError`` naming
    the key and what it must be."""
    if cfg.itm_negatives not in ITM_NEGATIVES:
        raise UserError(f"lp_blip2_qformer: itm_negatives = {cfg.itm_negatives!r}: choose "
                        f"one of {list(ITM_NEGATIVES)}")
    v = cfg.itm_curriculum_epochs
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise UserError(f"lp_blip2_qformer: itm_curriculum_epochs = {v!r}: it must be a "
                        "number of epochs > 0")
    v = cfg.itm_negatives_per_positive
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise UserError(f"lp_blip2_qformer: itm_negatives_per_positive = {v!r}: it must be "
                        "an integer >= 1 (1: BLIP-2's one negative per positive)")
    v = cfg.itm_loss_weight
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
        raise UserError(f"lp_blip2_qformer: itm_loss_weight = {v!r}: it must be a finite "
                        "number > 0 (1: BLIP-2's equal weights of ITC, ITM and ITG)")


def hard_share(mode: str, samples: Mapping[str, Any], curriculum_epochs: float,
               device: torch.device) -> Optional[Tensor]:
    """The 0-dim share of hard negatives for this batch, or None for ``hard`` (weights unchanged).

    ``curriculum_epochs``: epochs over which ``curriculum`` moves from random to hard (> 0)."""
    if mode == "hard":
        return None
    if mode in FIXED_SHARE:
        share = FIXED_SHARE[mode]
    else:  # curriculum
        epoch, it, n = (samples.get(k) for k in ("epoch", "iters", "num_iters_per_epoch"))
        progress = 1.0
        if epoch is not None and it is not None and n:
            progress = min(1.0, (int(epoch) + int(it) / int(n)) / curriculum_epochs)
        share = CURRICULUM_START + (1.0 - CURRICULUM_START) * progress
    return torch.full((), share, device=device)  # a fill, not a copy from the host


def mix_weights(weights: Tensor, share: Tensor) -> Tensor:
    """Sampling weights (B, W*B) -> ``share * weights + (1 - share) * uniform`` (rows still sum
    to ~1): a negative is drawn from the ITC weights with probability ``share``, else uniformly."""
    uniform = torch.full_like(weights, 1.0 / weights.shape[1])
    share = share.to(weights.dtype)
    # this order of operations gives "mixed" the bits of its first version (0.5 w + 0.5 u)
    return share * weights + (1 - share) * uniform


def draw_negatives(weights: Tensor, n: int) -> Tensor:
    """Sampling weights (B, W*B) with a zero at each row's positive -> the indices (n*B,) of ``n``
    negatives per row, drawn without replacement (so a row's negatives are distinct); index
    ``j*B + i`` is row i's j-th negative (the order the ITM pass lays its rows out in).

    ``n`` 1 draws exactly what BLIP-2's ``multinomial(weights, 1)`` draws (the same call)."""
    return torch.multinomial(weights, n).t().reshape(-1)


def itm_loss(logits: Tensor, b: int, n: int) -> Tuple[Tensor, Tensor]:
    """ITM logits ((1 + 2n) B, 2) of B positives then 2nB negatives -> (loss, accuracy), 0-dim.

    Cross-entropy with each negative weighted 1/n (n 1: BLIP-2's plain mean over 3B rows)."""
    # 1 for the B matched rows, 0 for the negatives; made on the device (no host copy)
    labels = (torch.arange(logits.shape[0], device=logits.device) < b).long()
    acc = (logits.detach().argmax(1) == labels).float().mean()
    if n == 1:
        return F.cross_entropy(logits, labels), acc
    per_row = F.cross_entropy(logits, labels, reduction="none")
    weight = torch.where(labels.bool(), 1.0, 1.0 / n)
    return (per_row * weight).sum() / (3 * b), acc
