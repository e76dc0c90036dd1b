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
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lavis.common.registry import registry

from lavis_plugins.common.errors import UserError, unknown_name
from lavis_plugins.common.vqa_eval import normalize_answer
from lavis_plugins.models._blip2_llm import Blip2LLMOutput
from lavis_plugins.models._video_frames import check_video, flatten_frames
from lavis_plugins.models.blip2_opt import Blip2OPTConfig, LPBlip2OPT
from lavis_plugins.models.blip2_t5 import Blip2T5Config, LPBlip2T5
from lavis_plugins.paths import config_path

logger = logging.getLogger(__name__)

FUSIONS = ("concat", "vote", "mean")


@dataclass
class VideoFusionFields:
    """The video settings added to a stage-2 model's config."""

    fusion: str = "concat"  # "concat" | "vote" | "mean": how the frames' tokens are combined
    # text before each frame's tokens with fusion "concat" ("{i}": 1-based frame number), e.g.
    # "Frame {i}:"; "" puts none (then a 1-frame video equals the image model exactly)
    frame_prompt: str = ""

    def validate_video(self, arch: str) -> None:
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
        ``concat`` (B, T*Nq [+ cue tokens], H_llm), ``mean`` (B, Nq, H_llm); mask all ones.
        ``texts`` (B) as the image model's; every frame of a video reads its video's text."""
        if image.dim() != 5:
            return super().visual_prompt(image, texts)
        if self.fusion == "vote":
            raise UserError("fusion 'vote' answers each frame separately and has no single "
                            "visual prompt for a video (training / logits need fusion concat or "
                            "mean)")
        b, _, t = image.shape[:3]
        if texts is not None and not isinstance(texts, str):
            texts = [x for x in texts for _ in range(t)]  # video-major, as the frames
        tokens, _ = super().visual_prompt(flatten_frames(image), texts)  # (B*T, Nq, H)
        tokens = tokens.reshape(b, t, *tokens.shape[1:])  # (B, T, Nq, H)
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
        return super().forward(samples if video is None else self._as_images(samples, video),
                               **kwargs)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(self, samples: Dict[str, Any], **kwargs: Any) -> List[str]:
        """Captions / prompted text for videos (arguments as the image model's ``generate``);
        ``vote`` returns the majority caption (needs ``num_captions`` 1)."""
        video = self.video_input(samples)
        if video is None:
            return super().generate(samples, **kwargs)
        if self.fusion != "vote":
            return super().generate(self._as_images(samples, video), **kwargs)
        if kwargs.get("num_captions", 1) != 1:
            raise UserError("fusion 'vote' returns one caption per video; use num_captions 1")
        per_frame = super().generate(self._per_frame(samples, video), **kwargs)
        return self._vote(per_frame, video.shape[2])

    @torch.no_grad()
    def predict_answers(self, samples: Dict[str, Any], **kwargs: Any) -> List[str]:
        """Answers to ``samples["text_input"]`` about ``samples["video"]``; ``inference_method``
        "generate" or "rank" (arguments as the image model's ``predict_answers``)."""
        video = self.video_input(samples)
        if video is None:
            return super().predict_answers(samples, **kwargs)
        if self.fusion != "vote":
            return super().predict_answers(self._as_images(samples, video), **kwargs)
        per_frame = super().predict_answers(self._per_frame(samples, video), **kwargs)
        return self._vote(per_frame, video.shape[2])

    @torch.no_grad()
    def rank_answers(self, samples: Dict[str, Any], answer_list: Optional[List[str]],
                     num_ans_candidates: int = 128, prompt: Optional[str] = None) -> List[str]:
        """The most likely answer from ``answer_list`` for each video (LLM log-likelihood)."""
        video = self.video_input(samples)
        if video is None:
            return super().rank_answers(samples, answer_list, num_ans_candidates, prompt)
        if self.fusion != "vote":
            return super().rank_answers(self._as_images(samples, video), answer_list,
                                        num_ans_candidates, prompt)
        per_frame = super().rank_answers(self._per_frame(samples, video), answer_list,
                                         num_ans_candidates, prompt)
        return self._vote(per_frame, video.shape[2])

    @torch.no_grad()
    def score_candidates(self, samples: Dict[str, Any], candidates: List[str],
                         prompt: Optional[str] = None) -> torch.Tensor:
        """(B, C) log-likelihood of each candidate per video (``concat`` / ``mean`` only)."""
        video = self.video_input(samples)
        if video is not None:
            samples = self._as_images(samples, video)
        return super().score_candidates(samples, candidates, prompt)

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
