"""One CapFilt batch: synthetic captions (nucleus sampling), filter scores, the kept captions.

A batch's captions depend on (seed, batch index) only: the global RNG is forked and seeded for
the generation call, so the same batch gives the same captions in a resumed or distributed run.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lavis_plugins.capfilt.config import CapFiltConfig
from lavis_plugins.common.errors import UserError

WEB, SYNTHETIC = "web", "synthetic"  # where a candidate caption comes from


@dataclass
class Candidate:
    """One caption of an image with its filter scores (None: not computed)."""

    caption: str
    source: str  # WEB or SYNTHETIC
    itm: Optional[float] = None  # ITM matched probability
    itc: Optional[float] = None  # ITC cosine similarity (max over the queries)
    clip: Optional[float] = None  # CLIP image-text cosine similarity (the ranker's)

    def as_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def batch_seed(seed: int, batch: int) -> int:
    """A 63-bit seed for batch ``batch`` of a run seeded ``seed`` (stable across processes)."""
    digest = hashlib.sha256(f"capfilt:{seed}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def check_captioner(captioner, cfg: CapFiltConfig) -> None:
    """Before any work: the captioner can generate, and takes ``cfg.prompt`` if one is set."""
    if cfg.num_captions and not callable(getattr(captioner, "generate", None)):
        raise UserError(f"the captioner {type(captioner).__name__} has no generate(); choose a "
                        "captioning model in run.capfilt.captioner")
    if cfg.num_captions and cfg.prompt is not None and not hasattr(captioner, "prompt"):
        raise UserError(f"run.capfilt.prompt is set but the captioner "
                        f"{type(captioner).__name__} takes no prompt; remove it")
    if cfg.num_captions and cfg.prompt is not None and type(captioner).__module__.startswith(
            "lavis.models.blip_models"):
        # LAVIS's BLIP captioner generates after (and strips) its own ``prompt`` and would
        # ignore the one passed with the samples
        raise UserError("run.capfilt.prompt: LAVIS's blip_caption reads its prompt from its "
                        "model config; set run.capfilt.captioner.prompt instead")


@torch.no_grad()
def generate_captions(captioner, images: Tensor, cfg: CapFiltConfig, seed: int) -> List[List[str]]:
    """``cfg.num_captions`` nucleus-sampled captions for each of the B images (B, 3, H, W), in one
    ``captioner.generate`` call on B * num_captions rows, under the global RNG seeded ``seed``."""
    n = cfg.num_captions
    if n == 0:
        return [[] for _ in range(images.shape[0])]
    samples: Dict[str, Any] = {"image": images.repeat_interleave(n, dim=0)}
    if cfg.prompt is not None:
        samples["prompt"] = cfg.prompt
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        texts = captioner.generate(samples, use_nucleus_sampling=True, num_beams=1,
                                   max_length=cfg.max_len, min_length=cfg.min_len, top_p=cfg.top_p,
                                   repetition_penalty=cfg.repetition_penalty)
    if len(texts) != images.shape[0] * n:
        raise RuntimeError(f"the captioner returned {len(texts)} captions for "
                           f"{images.shape[0]} x {n} rows")
    texts = [t.strip() for t in texts]
    return [texts[i * n:(i + 1) * n] for i in range(images.shape[0])]


def candidates_of(web: Sequence[str], synthetic: Sequence[str]) -> List[Candidate]:
    """The web captions then the synthetic ones, each distinct text once (case and spaces
    ignored; a synthetic copy of a web caption counts as web), empty texts dropped."""
    out, seen = [], set()
    for source, texts in ((WEB, web), (SYNTHETIC, synthetic)):
        for t in texts:
            key = " ".join(str(t).lower().split())
            if key and key not in seen:
                seen.add(key)
                out.append(Candidate(str(t), source))
    return out


def _pair_scores(model, images: Tensor, texts: List[str], head: str) -> Tensor:
    """Any LAVIS matching model (``model(samples, match_head=...)``, e.g.
    ``blip_image_text_matching``): (M,) ITM probabilities or ITC similarities of M pairs."""
    out = model({"image": images, "text_input": texts}, match_head=head)
    if head == "itm":
        return F.softmax(out.float(), dim=-1)[:, 1]
    out = out.float()
    if out.dim() == 2 and out.shape[0] == out.shape[1] == len(texts) and len(texts) > 1:
        return out.diagonal()  # LAVIS's BLIP ITM returns the (M, M) similarity matrix
    return out.reshape(len(texts))


@torch.no_grad()
def score_pairs(model, images: Tensor, owner: Tensor, texts: List[str],
                heads: Sequence[str], ranker=None) -> Dict[str, Tensor]:
    """Filter scores of M captions ``texts`` against their images ``images[owner]``.

    images (B, 3, H, W), owner (M,) image index of each caption. Returns ``{head: (M,)}``.
    A stage-1 BLIP-2 model (``lp_blip2_qformer``) encodes each image once and reads the query
    features once per image; any other model is scored pair by pair through its
    ``match_head`` forward. The "clip" head is the ``ranker``'s (a LAVIS CLIP).
    """
    if not texts:
        return {h: torch.zeros(0) for h in heads}
    if "clip" in heads:
        from lavis_plugins.capfilt.clip_ranker import clip_scores

        rest = [h for h in heads if h != "clip"]
        out = score_pairs(model, images, owner, texts, rest) if rest else {}
        return dict(out, clip=clip_scores(ranker, images, owner, texts).cpu())
    if not all(hasattr(model, a) for a in ("encode_image", "itm_logits", "query_output",
                                           "forward_text", "tokenize")):
        if not hasattr(model, "forward"):
            raise UserError(f"filter model {type(model).__name__} has no ITM/ITC scoring")
        return {h: _pair_scores(model, images[owner], texts, h).cpu() for h in heads}
    embeds = model.encode_image(images)  # (B, N, Dv)
    tok = model.tokenize(texts)
    out: Dict[str, Tensor] = {}
    if "itm" in heads:
        logits = model.itm_logits(embeds[owner], tok.input_ids, tok.attention_mask)  # (M, 2)
        out["itm"] = F.softmax(logits.float(), dim=-1)[:, 1].cpu()
    if "itc" in heads:
        img = F.normalize(model.vision_proj(model.query_output(embeds)), dim=-1)  # (B, Nq, E)
        txt = F.normalize(model.text_proj(model.forward_text(tok)), dim=-1)  # (M, E)
        out["itc"] = torch.einsum("mqe,me->mq", img[owner], txt).max(dim=1).values.float().cpu()
    return out


def select(cands: Sequence[Candidate], cfg: CapFiltConfig) -> List[int]:
    """Indices of the kept candidates, best first: those with ITM probability >=
    ``itm_threshold`` (if set), the ``top_k`` best by ``rank_by`` (if set); ties keep the
    candidates' order (web first)."""
    idx = list(range(len(cands)))
    if cfg.itm_threshold is not None:
        idx = [i for i in idx if cands[i].itm >= cfg.itm_threshold]
    idx.sort(key=lambda i: -getattr(cands[i], cfg.rank_by))
    return idx[:cfg.top_k] if cfg.top_k is not None else idx


def process_batch(captioner, filter_model, images: Tensor, web: Sequence[Sequence[str]],
                  cfg: CapFiltConfig, seed: int,
                  text_processor: Optional[Callable[[str], str]] = None,
                  ranker=None) -> List[Dict[str, Any]]:
    """Generate, score and select for B images with their web captions ``web`` (B lists).

    Returns one record per image: ``{"candidates": [Candidate dicts], "kept": [indices]}``.
    ``text_processor`` (the dataset's caption cleaner) is applied to the texts that are scored,
    not to the texts that are written. ``ranker``: the CLIP of the "clip" score.
    """
    synthetic = generate_captions(captioner, images, cfg, seed)
    cands = [candidates_of(w, s) for w, s in zip(web, synthetic)]
    owner = torch.tensor([i for i, c in enumerate(cands) for _ in c], dtype=torch.long,
                         device=images.device)
    texts = [c.caption for cs in cands for c in cs]
    if text_processor is not None:
        texts = [text_processor(t) for t in texts]
    scores = score_pairs(filter_model, images, owner, texts, cfg.scores, ranker)
    flat = [c for cs in cands for c in cs]
    for head, values in scores.items():
        for c, v in zip(flat, values.tolist()):
            setattr(c, head, round(float(v), 6))
    return [{"candidates": [c.as_dict() for c in cs], "kept": select(cs, cfg)} for cs in cands]
