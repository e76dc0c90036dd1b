"""Zero-shot video QA and captioning with the stage-2 BLIP-2 models, by frame sampling.

``lp_blip2_video_opt`` and ``lp_blip2_video_t5`` subclass ``lp_blip2_opt`` / ``lp_blip2_t5``: same
weights, same checkpoints, no new parameters. A video ``(B, C, T, H, W)`` (from the
``lp_video_eval`` processor) is read as T images: every frame goes through the frozen image
encoder, the Q-Former and the projection, giving T groups of ``Nq`` soft-prompt tokens, which are
fused by ``model.fusion``:

- ``concat`` (default; BLIP's zero-shot video transfer, InstructBLIP's video QA): all frames'
  tokens in time order, ``(B, T * Nq, H_llm)``. With ``frame_prompt`` (e.g. ``"Frame {i}:"``,
  SeViLA's cue; ``{i}`` is the 1-based frame number) that text, embedded with the LLM's own input
  embeddings, goes before each frame's group: ``[cue_1][Q_1][cue_2][Q_2]...``.
- ``mean``: the tokens averaged over frames, ``(B, Nq, H_llm)`` (the projection is affine, so this
  equals projecting the averaged Q-Former outputs).
- ``vote``: every frame is answered on its own (all B * T frames in one batch) and the answer
  given by most frames wins. Votes are counted on the VQA-normalised answer (so "two" and "2" are
  one vote); a tie goes to the answer whose first vote comes from the earliest frame, and the text
  returned is that frame's. The same rule applies to captions and to ranked answers.

Everything else (prompts, beam search, answer ranking by log-likelihood) is the image model's:
``generate``, ``predict_answers`` and ``rank_answers`` accept ``samples["video"]`` (or a 5-D
``samples["image"]``) and fall through to the image model for 4-D images. A 1-frame video gives
exactly the image model's answers and logits for every fusion (without ``frame_prompt``).
"""
from __future__ import annotations

import logging
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from lavis.common.registry import registry

from lavis_plugins.common.errors import UserError, unknown_name
from lavis_plugins.common.vqa_eval import normalize_answer
from lavis_plugins.models._blip2_llm import Blip2LLMOutput
from lavis_plugins.models._frame_selection import (
    FrameSelectionFields,
    check_aggregate,
    gather_frames,
    own_pairs,
    per_frame_scores,
    pick_frames,
    selection_texts,
    top_k_in_time_order,
)
from lavis_plugins.models._video_frames import check_video, flatten_frames
from lavis_plugins.models.blip2_opt import Blip2OPTConfig, LPBlip2OPT
from lavis_plugins.models.blip2_t5 import Blip2T5Config, LPBlip2T5
from lavis_plugins.paths import config_path

logger = logging.getLogger(__name__)

FUSIONS = ("concat", "vote", "mean")


@dataclass
class VideoFusionFields(FrameSelectionFields):
    """The video settings added to a stage-2 model's config (fusion, and frame selection:
    ``lavis_plugins/models/_frame_selection.py``)."""

    fusion: str = "concat"  # "concat" | "vote" | "mean": how the frames' tokens are combined
    # text before each frame's tokens with fusion "concat" ("{i}": 1-based frame number), e.g.
    # "Frame {i}:"; "" puts none (then a 1-frame video equals the image model exactly)
    frame_prompt: str = ""

    def validate_video(self, arch: str) -> None:
        self.validate_selection(arch)
        if self.fusion not in FUSIONS:
            raise unknown_name(f"model.fusion of {arch}", self.fusion, FUSIONS)
        if self.frame_prompt and self.fusion != "concat":
            raise UserError(f"model.frame_prompt of {arch} is set but fusion is "
                            f"{self.fusion!r}; frame cues go between concatenated frames only "
                            "(use fusion: concat, or frame_prompt: '')")
        if self.frame_prompt:
            try:
                self.frame_prompt.format(i=1)
            except (KeyError, IndexError, ValueError) as e:
                raise UserError(f"model.frame_prompt {self.frame_prompt!r} of {arch}: only "
                                "'{i}' (the frame number) may be substituted") from e


@dataclass
class Blip2VideoOPTConfig(Blip2OPTConfig, VideoFusionFields):
    """``lp_blip2_video_opt`` settings: ``lp_blip2_opt``'s plus ``fusion`` / ``frame_prompt``."""

    def validate(self, arch: str) -> None:
        super().validate(arch)
        self.validate_video(arch)


@dataclass
class Blip2VideoT5Config(Blip2T5Config, VideoFusionFields):
    """``lp_blip2_video_t5`` settings: ``lp_blip2_t5``'s plus ``fusion`` / ``frame_prompt``."""

    def validate(self, arch: str) -> None:
        super().validate(arch)
        self.validate_video(arch)


def majority_vote(answers: Sequence[str]) -> str:
    """The answer most frames gave (counted after VQA normalisation); ties go to the answer whose
    first vote is earliest, and the earliest frame's text of the winner is returned."""
    if not answers:
        raise ValueError("majority_vote needs at least one answer")
    keys = [normalize_answer(a) for a in answers]
    counts = Counter(keys)
    best = max(counts.values())
    winner = next(k for k in keys if counts[k] == best)  # first in frame order among the tied
    return answers[keys.index(winner)]


class VideoFusionMixin:
    """Frames -> soft visual prompt, and per-frame voting, on top of a ``Blip2LLMBase`` model."""

    SELECTION_CHUNK = 128  # (frame, text) pairs per LLM call when the LLM scores frames
    # (B, k) indices of the frames the last selection kept (None before any)
    last_frame_selection: Optional[torch.Tensor] = None

    @property
    def fusion(self) -> str:
        return self.cfg.fusion

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def video_input(samples: Dict[str, Any]) -> Optional[torch.Tensor]:
        """``samples["video"]`` or a 5-D ``samples["image"]``, checked: (B, C, T, H, W); None
        when the batch holds images (B, C, H, W)."""
        video = samples.get("video")
        if video is None:
            image = samples.get("image")
            if image is None or image.dim() != 5:
                return None
            video = image
        return check_video(video)

    def _as_images(self, samples: Dict[str, Any], video: torch.Tensor) -> Dict[str, Any]:
        """The batch with the video under ``image`` (the stage-2 methods read ``image``)."""
        out = {k: v for k, v in samples.items() if k != "video"}
        out["image"] = video
        return out

    def _per_frame(self, samples: Dict[str, Any], video: torch.Tensor) -> Dict[str, Any]:
        """A batch of B * T single images: each frame, with its video's text fields repeated."""
        t = video.shape[2]
        out: Dict[str, Any] = {"image": flatten_frames(video)}
        for key in ("text_input", "prompt"):
            if key in samples:
                value = samples[key]
                if isinstance(value, str):
                    out[key] = value
                else:
                    out[key] = [v for v in value for _ in range(t)]
        return out

    # ------------------------------------------------------------------ visual prompt
    def visual_prompt(self, image: torch.Tensor, texts: Optional[Sequence[str]] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W) as the image model; videos (B, 3, T, H, W) -> fused prompt:
        ``concat`` (B, k*Nq [+ cue tokens], H_llm), ``mean`` (B, Nq, H_llm); mask all ones.
        ``texts`` (B) as the image model's; every frame of a video reads its video's text.
        k = T, or ``selection_k`` with ``frame_selection`` (the kept frames, in time order)."""
        given = self.__dict__.get("_given_visual")
        if given is not None:  # LLM frame scoring: the frames' tokens are already computed
            return given
        if image.dim() != 5:
            return super().visual_prompt(image, texts)
        if self.fusion == "vote":
            raise UserError("fusion 'vote' answers each frame separately and has no single "
                            "visual prompt for a video (training / logits need fusion concat or "
                            "mean)")
        if self.cfg.frame_selection == "none":
            return self.fuse(self.frame_tokens(image, texts))
        return self.fuse(self.selected_tokens(image, texts))

    def frame_tokens(self, video: torch.Tensor, texts: Optional[Sequence[str]] = None,
                     raw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every frame's soft prompt (B, T, Nq, H_llm). ``raw``: the frames' image-encoder output
        (B * T, N, Dv) when already computed (else the encoder runs on ``video``)."""
        b, _, t = video.shape[:3]
        if texts is not None and not isinstance(texts, str):
            texts = [x for x in texts for _ in range(t)]  # video-major, as the frames
        if raw is None:
            raw = self.vit_features(flatten_frames(video))  # (B*T, N, Dv)
        tokens, _ = self.prompt_from_features(self.norm_vit_features(raw), texts)
        return tokens.reshape(b, t, *tokens.shape[1:])

    def selected_tokens(self, video: torch.Tensor, texts: Optional[Sequence[str]] = None
                        ) -> torch.Tensor:
        """The kept frames' soft prompts (B, k, Nq, H_llm), in time order: scored by
        ``choose_frames``, then only the kept frames go through what scoring did not already
        compute at full resolution (encoder, Q-Former)."""
        index, tokens, raw = self.choose_frames(video, texts)
        if tokens is not None:  # llm at full resolution: every frame's tokens are made
            return gather_frames(tokens, index)
        b, t = video.shape[0], video.shape[2]
        if raw is None and index.shape[1] == t:  # every frame kept (k >= T): nothing to gather
            return self.frame_tokens(video, texts)
        kept = pick_frames(video, index)  # (B, C, k, H, W)
        if raw is not None:  # full-resolution features of every frame: reuse the kept ones
            raw = gather_frames(raw.reshape(b, t, *raw.shape[1:]), index).flatten(0, 1)
        return self.frame_tokens(kept, texts, raw)

    def fuse(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Frames' tokens (B, T, Nq, H) -> the soft prompt of ``fusion`` and its mask."""
        b, t = tokens.shape[:2]
        if self.fusion == "mean":
            fused = tokens.float().mean(dim=1).to(tokens.dtype)  # (B, Nq, H)
        else:
            groups = []
            for i in range(t):
                if self.cfg.frame_prompt:
                    cue = self.frame_cue(i, tokens.device).to(tokens.dtype)  # (L_i, H)
                    groups.append(cue.unsqueeze(0).expand(b, -1, -1))
                groups.append(tokens[:, i])
            fused = torch.cat(groups, dim=1)  # (B, T*Nq + cues, H)
        atts = torch.ones(fused.shape[:-1], dtype=torch.long, device=fused.device)
        return fused, atts

    # ------------------------------------------------------------------ frame selection
    @contextmanager
    def _selection_batch(self, samples: Dict[str, Any], video: torch.Tensor) -> Iterator[None]:
        """The texts this batch's frames are scored against, for ``visual_prompt`` (the prompts
        it receives hold the question inside a template)."""
        if self.cfg.frame_selection == "none":
            yield
            return
        self.__dict__["_selection_texts"] = selection_texts(samples, video.shape[0])
        try:
            yield
        finally:
            self.__dict__["_selection_texts"] = None

    def choose_frames(self, video: torch.Tensor, texts: Optional[Sequence[str]] = None
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Indices (B, k) of the frames of ``video`` (B, C, T, H, W) to keep, in time order, by
        ``frame_selection``, scored at ``selection_grid`` patches per side; and what scoring
        computed at full resolution that answering can reuse: every frame's tokens
        (B, T, Nq, H_llm) (``llm``) or image-encoder output (B * T, N, Dv) (``itc`` / ``itm``
        with a shared encoder), else None. The scored texts are the batch's questions (or
        ``selection_text``), else ``texts``. The choice is kept in ``last_frame_selection``."""
        from lavis_plugins.models._frame_selection import candidate_frames, scoring_side
        from lavis_plugins.models._vit_resolution import patch_size

        b, _, t, side = video.shape[:4]
        if self.cfg.selection_k >= t:  # every frame kept: nothing to score
            index = torch.arange(t, device=video.device).expand(b, t)
            self.last_frame_selection = index
            return index, None, None
        batch_texts = self.__dict__.get("_selection_texts")
        if batch_texts is None:
            batch_texts = selection_texts({"prompt": texts}, b)
        check_aggregate(batch_texts, self.cfg.selection_aggregate)
        grid = self.cfg.selection_grid
        small = side if grid == 0 else scoring_side(side, grid, patch_size(self.visual_encoder))
        frames = candidate_frames(video, small)  # (B*T, C, s, s)
        full = small == side
        method = self.cfg.frame_selection
        if method == "llm":
            tokens = self.frame_tokens(video, texts, self.vit_features(frames))
            scores = self.llm_frame_scores(tokens, batch_texts)
            reuse: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (
                tokens if full else None, None)
        else:  # the stage-1 selector's Q-Former; the answering model's Q-Former is not run
            selector = self.frame_selector()
            if self.__dict__["_selector_shares_vit"]:
                raw = self.vit_features(frames)
                embeds = selector.norm_vit_features(raw)
                reuse = (None, raw if full else None)
            else:
                embeds = selector.encode_image(frames)
                reuse = (None, None)
            scores = selector.frame_text_scores(embeds.reshape(b, t, *embeds.shape[1:]),
                                                batch_texts, method,
                                                self.cfg.selection_aggregate,
                                                self.cfg.selection_itm_pool * self.cfg.selection_k)
        index = top_k_in_time_order(scores, self.cfg.selection_k)
        self.last_frame_selection = index  # (B, k): for inspection; no host sync here
        return (index, *reuse)

    def llm_frame_scores(self, tokens: torch.Tensor, texts: Sequence[Sequence[str]]
                         ) -> torch.Tensor:
        """(B, T) log P("yes" | "yes" or "no") of the LLM asked ``selection_prompt`` about each
        frame alone (its Nq tokens), aggregated over the video's texts by
        ``selection_aggregate``. tokens (B, T, Nq, H)."""
        b, t = tokens.shape[:2]
        frames = tokens.reshape(b * t, *tokens.shape[2:])
        rows, _ = own_pairs(texts, t, frames.device)
        # pair p asks about text p // t (own_pairs' order), built on the host: no device sync
        prompts = [self.cfg.selection_prompt.format(question=x) for ts in texts for x in ts
                   for _ in range(t)]
        yes, no = (self._candidate_tokens([w])[0][0] for w in ("yes", "no"))
        scores = []
        for s in range(0, rows.shape[0], self.SELECTION_CHUNK):
            vis = frames[rows[s:s + self.SELECTION_CHUNK]]
            atts = torch.ones(vis.shape[:-1], dtype=torch.long, device=vis.device)
            self.__dict__["_given_visual"] = (vis, atts)
            try:
                first = self._score_prefix(vis, prompts[s:s + self.SELECTION_CHUNK])["first"]
            finally:
                self.__dict__["_given_visual"] = None
            pair = first[:, [yes, no]]  # (P, 2) log-probs of the two answers
            scores.append(pair[:, 0] - torch.logsumexp(pair, dim=1))
        return per_frame_scores(torch.cat(scores), rows, b, t, self.cfg.selection_aggregate)

    def frame_selector(self):
        """The stage-1 model (``lp_blip2_video_qformer``) of ``selector_checkpoint`` that scores
        frames for ``itc`` / ``itm``: built on first use, kept out of this model's state dict
        and checkpoints, on this model's device."""
        from lavis_plugins.models._frame_selection import build_frame_selector

        selector = self.__dict__.get("_frame_selector")
        if selector is None:
            selector, shares = build_frame_selector(self)
            self.__dict__["_frame_selector"] = selector
            self.__dict__["_selector_shares_vit"] = shares
        if selector.query_tokens.device != self.query_tokens.device:
            selector.to(self.query_tokens.device)
        return selector

    def _selected_video(self, samples: Dict[str, Any], video: torch.Tensor) -> torch.Tensor:
        """``fusion: vote`` with selection: the video (B, C, k, H, W) of the kept frames (they
        are encoded again when answered, frame by frame)."""
        if self.cfg.frame_selection == "none":
            return video
        index = self.choose_frames(video, samples.get("text_input"))[0]
        return pick_frames(video, index)

    def frame_cue(self, index: int, device: torch.device) -> torch.Tensor:
        """LLM input embeddings (L, H) of ``frame_prompt`` for frame ``index`` (0-based)."""
        text = self.cfg.frame_prompt.format(i=index + 1)
        ids = self.llm_tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            raise UserError(f"model.frame_prompt {self.cfg.frame_prompt!r} tokenizes to nothing")
        return self._embed(torch.tensor(ids, device=device))

    # ------------------------------------------------------------------ training / logits
    def forward(self, samples: Dict[str, Any], **kwargs: Any) -> Blip2LLMOutput:
        """The image model's LM loss with the fused video prompt (``samples["video"]``)."""
        video = self.video_input(samples)
        if video is None:
            return super().forward(samples, **kwargs)
        with self._selection_batch(samples, video):
            return super().forward(self._as_images(samples, video), **kwargs)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(self, samples: Dict[str, Any], **kwargs: Any) -> List[str]:
        """Captions / prompted text for videos (arguments as the image model's ``generate``);
        ``vote`` returns the majority caption (needs ``num_captions`` 1)."""
        video = self.video_input(samples)
        if video is None:
            return super().generate(samples, **kwargs)
        with self._selection_batch(samples, video):
            if self.fusion != "vote":
                return super().generate(self._as_images(samples, video), **kwargs)
            if kwargs.get("num_captions", 1) != 1:
                raise UserError("fusion 'vote' returns one caption per video; use num_captions 1")
            video = self._selected_video(samples, video)
        per_frame = super().generate(self._per_frame(samples, video), **kwargs)
        return self._vote(per_frame, video.shape[2])

    @torch.no_grad()
    def predict_answers(self, samples: Dict[str, Any], **kwargs: Any) -> List[str]:
        """Answers to ``samples["text_input"]`` about ``samples["video"]``; ``inference_method``
        "generate" or "rank" (arguments as the image model's ``predict_answers``)."""
        video = self.video_input(samples)
        if video is None:
            return super().predict_answers(samples, **kwargs)
        with self._selection_batch(samples, video):
            if self.fusion != "vote":
                return super().predict_answers(self._as_images(samples, video), **kwargs)
            video = self._selected_video(samples, video)
        per_frame = super().predict_answers(self._per_frame(samples, video), **kwargs)
        return self._vote(per_frame, video.shape[2])

    @torch.no_grad()
    def rank_answers(self, samples: Dict[str, Any], answer_list: Optional[List[str]],
                     num_ans_candidates: int = 128, prompt: Optional[str] = None) -> List[str]:
        """The most likely answer from ``answer_list`` for each video (LLM log-likelihood)."""
        video = self.video_input(samples)
        if video is None:
            return super().rank_answers(samples, answer_list, num_ans_candidates, prompt)
        with self._selection_batch(samples, video):
            if self.fusion != "vote":
                return super().rank_answers(self._as_images(samples, video), answer_list,
                                            num_ans_candidates, prompt)
            video = self._selected_video(samples, video)
        per_frame = super().rank_answers(self._per_frame(samples, video), answer_list,
                                         num_ans_candidates, prompt)
        return self._vote(per_frame, video.shape[2])

    @torch.no_grad()
    def score_candidates(self, samples: Dict[str, Any], candidates: List[str],
                         prompt: Optional[str] = None) -> torch.Tensor:
        """(B, C) log-likelihood of each candidate per video (``concat`` / ``mean`` only)."""
        video = self.video_input(samples)
        if video is None:
            return super().score_candidates(samples, candidates, prompt)
        with self._selection_batch(samples, video):
            return super().score_candidates(self._as_images(samples, video), candidates, prompt)

    @staticmethod
    def _vote(per_frame: Sequence[str], frames: int) -> List[str]:
        """B * T answers (video-major) -> B majority answers."""
        return [majority_vote(per_frame[i:i + frames]) for i in range(0, len(per_frame), frames)]


def _video_types(image_types: Dict[str, str], family: str) -> Dict[str, str]:
    return {t: config_path(f"models/lp_blip2_video_{family}_{t}.yaml") for t in image_types}


@registry.register_model("lp_blip2_video_opt")
class LPBlip2VideoOPT(VideoFusionMixin, LPBlip2OPT):
    """``lp_blip2_opt`` answering about videos by frame sampling (see the module docstring).

    Model types: those of ``lp_blip2_opt`` (same weights), each YAML with the video processors.
    """

    PRETRAINED_MODEL_CONFIG_DICT = _video_types(LPBlip2OPT.PRETRAINED_MODEL_CONFIG_DICT, "opt")
    CONFIG_CLASS = Blip2VideoOPTConfig
    OTHER_ARCH_HINT = "lp_blip2_video_t5 for FlanT5"


@registry.register_model("lp_blip2_video_t5")
class LPBlip2VideoT5(VideoFusionMixin, LPBlip2T5):
    """``lp_blip2_t5`` answering about videos by frame sampling (see the module docstring).

    Model types: those of ``lp_blip2_t5`` (same weights), each YAML with the video processors.
    """

    PRETRAINED_MODEL_CONFIG_DICT = _video_types(LPBlip2T5.PRETRAINED_MODEL_CONFIG_DICT, "t5")
    CONFIG_CLASS = Blip2VideoT5Config
    OTHER_ARCH_HINT = "lp_blip2_video_opt for OPT"
    # how many times the image model's encoder length (FlanT5's 512-token training length) a
    # video input may take: 16 frames x 32 queries alone fill 512 tokens. T5's relative position
    # buckets have no maximum (distances beyond 128 share a bucket), so longer inputs are
    # well-defined; how well the frozen LLM reads them is what the experiments measure.
    VIDEO_CONTEXT_FACTOR = 4

    @property
    def context_length(self) -> int:
        return self.VIDEO_CONTEXT_FACTOR * super().context_length
