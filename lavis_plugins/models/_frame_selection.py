"""Question-aware frame selection without training (the ``frame_selection`` model option).

The ``lp_video_eval`` processor samples N candidate frames (its ``n_frms``, e.g. 32); each frame
is scored against the question (for multiple choice: against the question with each option)
and the ``selection_k`` best are kept **in time order** before the frames are fused. Scorers:

- ``itc``: the stage-1 Q-Former's image-text contrastive similarity (max over the queries of the
  cosine similarity with the text's [CLS] embedding), BLIP-2's candidate-selection score;
- ``itm``: the stage-1 Q-Former's image-text matching logit (matched class, averaged over the
  queries), BLIP-2's re-ranking score;
- ``llm``: the answering LLM's log P("yes" | "yes" or "no") after the frame's soft prompt and
  ``selection_prompt`` ("Does the information in this frame help answer: {question}?"): SeViLA's
  localizer question, asked zero-shot of the answering model itself.

With several texts per video (the question with each option), ``selection_aggregate`` makes one
score per frame of a frame's scores for them: ``best`` (default) their maximum, a frame that
supports any option is informative; ``spread`` their maximum minus their mean, how far the frame
tells the options apart (a frame that shows nothing the question is about scores every option
alike). ``spread`` needs two texts or more per video. Ties keep the earlier frame.

Measured on the demo's temporal split (stage 1 trained with ``itm_negatives: mixed``; docs/
benchmarks.md): the stage-1 ITC similarity of a frame to any one text is nearly the same for
every frame of a clip (within +-0.01), so ``best`` keeps frames showing the asked-about shape
about as often as uniform sampling (27-32% vs 25%); ``spread`` over the options: 60%. The
stage-1 ITM head scores whether a text describes the *whole* frame (the demo's captions name every
shape), so a frame that shows the asked-about shape beside another one often scores *lower*
than a frame without it, for any text, and neither aggregate helps it there.

Cost: the candidates are scored from the image encoder run on frames downscaled to
``selection_grid`` patches per side (fewer patches; position embeddings interpolated,
``_vit_resolution.py``), and only the ``selection_k`` kept frames go through the encoder at full
resolution and the answering model's Q-Former. Where the model's own grid is not larger than
``selection_grid`` (or it is 0) the candidates are scored at full resolution: each frame is then
encoded once, its features (or, for ``llm``, its tokens) reused for answering. ``itc`` / ``itm``
never run the answering model's Q-Former on frames they drop; the selector's query pass computes
the queries' first self-attention once per batch (``frame_query_output``), and ``itm`` re-ranks
only ITC's ``selection_itm_pool`` x ``selection_k`` best candidates (0: scores all with ITM).
With ``selection_k`` >= the number of candidates nothing is scored: every frame is kept, exactly
as without selection. Measured cost: docs/benchmarks.md (``bench_video_qa.py --selection``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lavis_plugins.common.errors import UserError, unknown_name
from lavis_plugins.models._video_frames import flatten_frames

SCORERS = ("none", "itc", "itm", "llm")
AGGREGATES = ("best", "spread")  # per frame, over its video's texts (module docstring)
DEFAULT_SELECTION_PROMPT = "Does the information in this frame help answer: {question}?"
# sample key that carries the texts frames are scored against (one string or a list of strings
# per video); without it the questions (``text_input``) are used
SELECTION_TEXT_KEY = "selection_text"


@dataclass
class FrameSelectionFields:
    """Model settings of question-aware frame selection (module docstring)."""

    # "none" | "itc" | "itm" | "llm": how candidate frames are scored against the question
    frame_selection: str = "none"
    # frames kept of the processor's n_frms candidates (all of them when n_frms <= selection_k)
    selection_k: int = 4
    # "llm" scorer: the yes/no question asked about each frame ("{question}": the question)
    selection_prompt: str = DEFAULT_SELECTION_PROMPT
    # "itc" / "itm" scorers: a stage-1 checkpoint (lp_blip2_qformer / LAVIS blip2 .pth) whose
    # Q-Former scores the frames; it must match this model's image encoder and Q-Former sizes
    selector_checkpoint: Optional[str] = None
    # patches per side of the frames candidates are scored from: the frames are downscaled to
    # selection_grid x patch pixels (8: a quarter of the patches of a 224 px ViT/14). A model
    # whose own grid is not larger, or 0, scores at full resolution (each frame encoded once)
    selection_grid: int = 8
    # "best" | "spread": one score per frame from its scores for the video's texts (the question
    # with each option): their maximum, or maximum minus mean (needs >= 2 texts per video)
    selection_aggregate: str = "best"
    # "itm" scorer: ITC scores every candidate and ITM re-ranks only the selection_itm_pool x
    # selection_k best of them (BLIP-2's retrieval re-ranks ITC's k_test best the same way);
    # 0: ITM scores every candidate (about 1.5x the ITC work per candidate)
    selection_itm_pool: int = 2

    def validate_selection(self, arch: str) -> None:
        if self.frame_selection not in SCORERS:
            raise unknown_name(f"model.frame_selection of {arch}", self.frame_selection, SCORERS)
        if self.frame_selection == "none":
            return
        if not isinstance(self.selection_k, int) or self.selection_k < 1:
            raise UserError(f"model.selection_k of {arch} is {self.selection_k!r}; give the "
                            "number of frames to keep (an integer >= 1)")
        if self.selection_aggregate not in AGGREGATES:
            raise unknown_name(f"model.selection_aggregate of {arch}", self.selection_aggregate,
                               AGGREGATES)
        grid = self.selection_grid
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 0:
            raise UserError(f"model.selection_grid of {arch} is {grid!r}; give the patches per "
                            "side at which candidate frames are scored (an integer >= 1), or 0 "
                            "to score them at full resolution")
        pool = self.selection_itm_pool
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 0:
            raise UserError(f"model.selection_itm_pool of {arch} is {pool!r}; give how many times "
                            "selection_k frames ITM re-ranks of ITC's best (an integer >= 1), "
                            "or 0 to score every candidate with ITM")
        if self.frame_selection in ("itc", "itm") and not self.selector_checkpoint:
            raise UserError(f"model.frame_selection {self.frame_selection!r} of {arch} scores "
                            "frames with a stage-1 Q-Former: set model.selector_checkpoint to a "
                            "stage-1 .pth (lp_blip2_qformer / LAVIS blip2), or use "
                            "frame_selection: llm")
        if self.frame_selection == "llm":
            try:
                self.selection_prompt.format(question="q")
            except (KeyError, IndexError, ValueError) as e:
                raise UserError(f"model.selection_prompt {self.selection_prompt!r} of {arch}: "
                                "only '{question}' may be substituted") from e


def scoring_side(side: int, grid: int, patch: int) -> int:
    """Side (pixels) of the frames candidates are scored from: ``grid`` patches of ``patch``
    pixels, or the frames' own ``side`` when that is not larger (or ``grid`` is 0)."""
    return side if grid == 0 or grid * patch >= side else grid * patch


def candidate_frames(video: Tensor, side: int) -> Tensor:
    """Every frame of ``video`` (B, C, T, S, S) at ``side`` pixels, video-major
    (B * T, C, side, side) as ``flatten_frames``: bilinear with antialiasing (a plain bilinear
    halving skips pixels: thin shapes could vanish); the frames as they are when ``side`` = S.

    The resize reads the (B, C * T, S, S) view of the video (each plane is resized on its own,
    so the result is the same) and only the small frames are reordered: reordering the
    full-resolution frames first copied 32 frames of 224 px for nothing (13 ms per video on CPU).
    """
    if video.shape[-1] == side and video.shape[-2] == side:
        return flatten_frames(video)
    b, c, t, h, w = video.shape
    small = F.interpolate(video.reshape(b, c * t, h, w), size=(side, side), mode="bilinear",
                          antialias=True, align_corners=False)
    return flatten_frames(small.reshape(b, c, t, side, side))


def pick_frames(video: Tensor, index: Tensor) -> Tensor:
    """Frames ``index`` (B, k) of each video of ``video`` (B, C, T, H, W) -> (B, C, k, H, W).
    Copies only the kept frames (``gather_frames`` on the video would build a (B, k, C, H, W)
    int64 index first)."""
    return torch.stack([v.index_select(1, i) for v, i in zip(video, index)])


def top_k_in_time_order(scores: Tensor, k: int) -> Tensor:
    """Indices (B, min(k, T)) of the best-scoring frames of each video, in time order.

    scores (B, T). A stable sort keeps the earlier frame among equal scores, so the choice does
    not depend on the device's top-k implementation.
    """
    k = min(int(k), scores.shape[1])
    best = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return best.sort(dim=1).values


def gather_frames(x: Tensor, index: Tensor) -> Tensor:
    """Frames ``index`` (B, k) of each video of ``x`` (B, T, ...) -> (B, k, ...)."""
    shape = index.shape + (1,) * (x.dim() - 2)
    return x.gather(1, index.reshape(shape).expand(*index.shape, *x.shape[2:]))


def selection_texts(samples: Dict[str, Any], batch: int) -> List[List[str]]:
    """For each of the ``batch`` videos the texts its frames are scored against:
    ``samples["selection_text"]`` when given, else the question (``text_input``), else the
    prompt. Each entry is a string or a list of strings."""
    for key in (SELECTION_TEXT_KEY, "text_input", "prompt"):
        value = samples.get(key)
        if value is not None:
            break
    else:
        raise UserError("frame selection scores frames against the question, but the batch has "
                        "no text_input (or selection_text / prompt)")
    values: Sequence[Any] = [value] * batch if isinstance(value, str) else list(value)
    if len(values) != batch:
        raise UserError(f"samples[{key!r}] has {len(values)} entries for {batch} videos")
    out = []
    for v in values:
        texts = [v] if isinstance(v, str) else list(v)
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise UserError(f"samples[{key!r}] holds an empty text or a non-string ({v!r}); frame "
                            "selection needs the question text of every video")
        out.append(texts)
    return out


def per_frame_scores(scores: Tensor, rows: Tensor, batch: int, frames: int,
                     aggregate: str = "best") -> Tensor:
    """(B, T) one score per frame from the scores (P,) of its (frame, text) pairs, whose frame
    rows (P,) index the video-major (B * T) frames (``own_pairs``): the maximum over the pairs
    (``best``), or the maximum minus the mean (``spread``; module docstring)."""
    if aggregate not in AGGREGATES:
        raise unknown_name("frame score aggregate", aggregate, AGGREGATES)
    scores = scores.float()
    best = torch.full((batch * frames,), float("-inf"), device=scores.device)
    best = best.scatter_reduce(0, rows, scores, reduce="amax")
    if aggregate == "spread":
        mean = torch.zeros(batch * frames, device=scores.device)
        best = best - mean.scatter_reduce(0, rows, scores, reduce="mean", include_self=False)
    return best.reshape(batch, frames)


def check_aggregate(texts: Sequence[Sequence[str]], aggregate: str) -> None:
    """``spread`` compares a frame's scores for several texts: refuse a video with one."""
    if aggregate == "spread" and any(len(ts) < 2 for ts in texts):
        raise UserError("model.selection_aggregate 'spread' compares each frame's scores for "
                        "several texts (the question with each option), but a video has only "
                        "one; use it for multiple choice (run.select_with_options: True), or "
                        "selection_aggregate: best")


def own_pairs(texts: Sequence[Sequence[str]], frames: int, device: torch.device
              ) -> "tuple[Tensor, Tensor]":
    """The (frame, text) pairs of each video with its own texts: frame rows (P,) into the
    video-major (B * T) frames and text columns (P,) into the flattened texts; P = T * total
    texts."""
    rows, cols, col = [], [], 0
    for v, ts in enumerate(texts):
        for _ in ts:
            rows.append(torch.arange(v * frames, (v + 1) * frames))
            cols.append(torch.full((frames,), col))
            col += 1
    return torch.cat(rows).to(device), torch.cat(cols).to(device)


def build_frame_selector(model: Any) -> "tuple[Any, bool]":
    """The stage-1 ``lp_blip2_video_qformer`` of ``model.cfg.selector_checkpoint``, built with
    ``model``'s image encoder and Q-Former settings, in eval mode; and whether it shares
    ``model``'s image encoder (same weights: the frames are then encoded once for both)."""
    import os

    from lavis_plugins.models.blip2_qformer import Blip2QformerConfig
    from lavis_plugins.models.blip2_video_qformer import LPBlip2VideoQformer

    from lavis_plugins.common.safe_load import load_weights, state_dict_of

    cfg = model.cfg
    path = os.path.expanduser(str(cfg.selector_checkpoint))
    if not os.path.isfile(path):
        raise UserError(f"model.selector_checkpoint {path!r} is not a file; give a local stage-1 "
                        "checkpoint (.pth)")
    what = "model.selector_checkpoint"
    state = state_dict_of(load_weights(path, what), path, what)  # weights-only: runs no code
    if "vision_proj.weight" not in state or "query_tokens" not in state:
        raise UserError(f"model.selector_checkpoint {path!r} is not a stage-1 checkpoint (no "
                        "vision_proj / query_tokens): frame_selection itc/itm needs the stage-1 "
                        "Q-Former's ITC/ITM heads")
    sel_cfg = Blip2QformerConfig(
        bert_path=cfg.bert_path, vit_model=cfg.vit_model, vit_path=cfg.vit_path,
        image_size=cfg.image_size, vit_precision=cfg.vit_precision, tiny_vit=cfg.tiny_vit,
        num_query_token=int(state["query_tokens"].shape[1]),
        cross_attention_freq=cfg.cross_attention_freq,
        embed_dim=int(state["vision_proj.weight"].shape[0]))
    selector = LPBlip2VideoQformer(sel_cfg)
    selector.load_checked_state(state, path)  # the state read above: the file is read once
    selector.eval().requires_grad_(False)
    mine, theirs = model.visual_encoder.state_dict(), selector.visual_encoder.state_dict()
    shares = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k].to(mine[k]))
                                                  for k in mine)
    if shares:  # one encoder in memory, one pass per frame
        selector.visual_encoder = model.visual_encoder
    return selector, shares
