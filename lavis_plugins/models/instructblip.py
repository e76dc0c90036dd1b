"""InstructBLIP (Dai et al. 2023): BLIP-2 whose Q-Former also reads the instruction.

``lp_instructblip_t5`` (FlanT5, LAVIS's ``blip2_t5_instruct``) and ``lp_instructblip_causal``
(any decoder-only LLM, LAVIS's ``blip2_vicuna_instruct``) are the stage-2 models with the
question-aware Q-Former always on (``qformer_text_input``: the instruction goes through the
Q-Former together with the queries, and to the LLM after the visual prompt). They load

- LAVIS ``blip2_t5_instruct`` / ``blip2_vicuna_instruct`` ``.pth`` files as they are (same
  state-dict names: ``Qformer.*`` with its text branch, ``t5_proj`` / ``llm_proj``,
  ``t5_model`` / ``llm_model``);
- transformers ``InstructBlipForConditionalGeneration`` and
  ``InstructBlipVideoForConditionalGeneration`` folders, self-sufficient like BLIP-2 folders
  (sizes from config.json; the Q-Former's tokenizer from ``qformer_tokenizer/``).

``lp_instructblip_video_t5`` / ``lp_instructblip_video_causal`` add the video models' frame
fusion (``concat`` / ``mean`` / ``vote``), every frame's Q-Former reading the question.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Tuple

from lavis.common.registry import registry

from lavis_plugins.common.errors import UserError
from lavis_plugins.models.blip2_causal import Blip2CausalConfig, LPBlip2Causal
from lavis_plugins.models.blip2_t5 import Blip2T5Config, LPBlip2T5
from lavis_plugins.models.blip2_video import LPBlip2VideoT5, VideoFusionFields, VideoFusionMixin
from lavis_plugins.models.hf_format import INSTRUCTBLIP_MODEL_TYPES
from lavis_plugins.paths import config_path


class _InstructMixin:
    """What both InstructBLIP models add to their BLIP-2 class."""

    HF_MODEL_TYPES: ClassVar[Tuple[str, ...]] = INSTRUCTBLIP_MODEL_TYPES

    @staticmethod
    def _check_instruct(cfg, arch: str) -> None:
        if not cfg.qformer_text_input:
            raise UserError(f"model.qformer_text_input of {arch} is false: InstructBLIP's "
                            "Q-Former reads the instruction; use lp_blip2_t5 / lp_blip2_causal "
                            "for a BLIP-2 without it")


@dataclass
class InstructBlipT5Config(Blip2T5Config):
    """``lp_instructblip_t5`` settings: those of ``lp_blip2_t5``, the Q-Former reading text."""

    qformer_text_input: bool = True

    def validate(self, arch: str) -> None:
        super().validate(arch)
        _InstructMixin._check_instruct(self, arch)


@dataclass
class InstructBlipCausalConfig(Blip2CausalConfig):
    """``lp_instructblip_causal`` settings: those of ``lp_blip2_causal``, the Q-Former reading
    text."""

    qformer_text_input: bool = True

    def validate(self, arch: str) -> None:
        super().validate(arch)
        _InstructMixin._check_instruct(self, arch)


@registry.register_model("lp_instructblip_t5")
class LPInstructBlipT5(_InstructMixin, LPBlip2T5):
    """InstructBLIP with a frozen FlanT5. Model types: ``tiny`` (tests and demos); other sizes
    load from a transformers folder (``checkpoint=``) or with ``t5_model`` and a LAVIS file."""

    PRETRAINED_MODEL_CONFIG_DICT = {"tiny": config_path("models/lp_instructblip_t5_tiny.yaml")}
    CONFIG_CLASS = InstructBlipT5Config


@registry.register_model("lp_instructblip_causal")
class LPInstructBlipCausal(_InstructMixin, LPBlip2Causal):
    """InstructBLIP with a frozen decoder-only LLM (Vicuna in the paper). Model types: ``tiny``
    (a tiny LLaMA); other sizes from a transformers folder or ``llm_model`` + a LAVIS file."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        "tiny": config_path("models/lp_instructblip_causal_tiny.yaml")}
    CONFIG_CLASS = InstructBlipCausalConfig


# ------------------------------------------------------------------ video (frame sampling)
# InstructBLIP's video QA: each frame through the Q-Former, which reads the video's question,
# the frames' query tokens fused by the video models' ``fusion`` (``concat``: transformers'
# InstructBlipVideoForConditionalGeneration, any number of frames)
@dataclass
class InstructBlipVideoT5Config(InstructBlipT5Config, VideoFusionFields):
    def validate(self, arch: str) -> None:
        super().validate(arch)
        self.validate_video(arch)


@dataclass
class InstructBlipVideoCausalConfig(InstructBlipCausalConfig, VideoFusionFields):
    def validate(self, arch: str) -> None:
        super().validate(arch)
        self.validate_video(arch)


@registry.register_model("lp_instructblip_video_t5")
class LPInstructBlipVideoT5(VideoFusionMixin, LPInstructBlipT5):
    """``lp_instructblip_t5`` answering about videos by frame sampling
    (:mod:`lavis_plugins.models.blip2_video`). Model types: ``tiny``."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        "tiny": config_path("models/lp_instructblip_video_t5_tiny.yaml")}
    CONFIG_CLASS = InstructBlipVideoT5Config

    @property
    def context_length(self) -> int:
        """Room for T frames' tokens, as ``lp_blip2_video_t5`` has."""
        return LPBlip2VideoT5.VIDEO_CONTEXT_FACTOR * LPBlip2T5.context_length.fget(self)


@registry.register_model("lp_instructblip_video_causal")
class LPInstructBlipVideoCausal(VideoFusionMixin, LPInstructBlipCausal):
    """``lp_instructblip_causal`` answering about videos by frame sampling. Model types:
    ``tiny``."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        "tiny": config_path("models/lp_instructblip_video_causal_tiny.yaml")}
    CONFIG_CLASS = InstructBlipVideoCausalConfig
