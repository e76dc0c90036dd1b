"""BLIP-2 stage 2 with any decoder-only LLM: ``lp_blip2_causal``.

The OPT model (:mod:`lavis_plugins.models.blip2_opt`) generalised to whatever
``AutoModelForCausalLM`` loads from a local folder (LLaMA / Vicuna, Mistral, Qwen2, OPT, ...):
the soft visual prompt goes in front of the text embeddings, the frozen LLM is trained through
with the LM loss on the text. What differs between families is handled here, once:

- end of text: each target ends with the tokenizer's EOS token and generation stops there (as
  LAVIS's ``blip2_vicuna_instruct``); OPT's BLIP-2 convention ("\\n") stays in ``lp_blip2_opt``;
- padding: prompts are left-padded after the visual prompt and position ids count only kept
  tokens (families other than OPT take positions from ``position_ids``, not from the mask);
- a tokenizer without a pad token (LLaMA's) pads with its unk (else EOS) token: padding is
  always masked, so the choice has no effect on results, and the vocabulary is not resized;
- BOS: whatever the tokenizer adds (LLaMA ``<s>``, OPT ``</s>``, Qwen2 none);
- an answer after its question is tokenised on its own, after a space for byte-level BPE
  tokenizers; SentencePiece ones (LLaMA) mark the word start themselves (as LAVIS's recipe).

State-dict names are those of LAVIS's ``blip2_vicuna_instruct``: ``llm_model.*``, ``llm_proj.*``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Dict, Optional

import torch
from lavis.common.registry import registry
from torch import nn

from lavis_plugins.common.errors import UserError
from lavis_plugins.models._blip2_llm import Blip2LLMConfig
from lavis_plugins.models.blip2_opt import LPBlip2OPT
from lavis_plugins.paths import config_path

logger = logging.getLogger(__name__)


@dataclass
class Blip2CausalConfig(Blip2LLMConfig):
    """``lp_blip2_causal`` settings: the shared ones plus the LLM folder."""

    # local folder of a decoder-only LLM (config.json, weights, tokenizer) that
    # AutoModelForCausalLM loads; also accepted as ``llm_path``. "tiny": a tiny random LLaMA
    llm_model: Optional[str] = None
    llm_dtype: str = "fp16"

    ALIASES: ClassVar[Dict[str, str]] = {"llm_path": "llm_model"}


@registry.register_model("lp_blip2_causal")
class LPBlip2Causal(LPBlip2OPT):
    """BLIP-2 with any frozen decoder-only LLM (``AutoModelForCausalLM``).

    Model types: ``tiny`` (a tiny random LLaMA; tests and demos). Other LLMs: any type with
    ``llm_model`` set to their folder, e.g. ``load_model("lp_blip2_causal", "tiny",
    llm_model="/weights/vicuna-7b-v1.1", vit_model="eva_clip_g", ...)``.
    """

    PRETRAINED_MODEL_CONFIG_DICT = {"tiny": config_path("models/lp_blip2_causal_tiny.yaml")}
    CONFIG_CLASS = Blip2CausalConfig
    PROJ_NAME = "llm_proj"
    LLM_NAME = "llm_model"
    LLM_CLASS = "AutoModelForCausalLM"
    LLM_MODEL_TYPE = ""  # any decoder-only family (checked in _check_llm_config)
    LLM_LABEL = "a decoder-only LLM"
    OTHER_ARCH_HINT = "lp_blip2_t5 for encoder-decoder LLMs"
    TOKENIZER_NAME = "llm_tokenizer"
    llm_tokenizer = None  # an instance attribute here (shadows the base class's property)
    TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

    def make_tiny_llm(self, folder: Path) -> None:
        from lavis_plugins.common.tiny_llm import make_tiny_llama

        make_tiny_llama(folder)

    def _llm_from_folder(self, llm_cls: type, folder: str, dtype: torch.dtype) -> nn.Module:
        from transformers import AutoConfig

        self._check_llm_config(AutoConfig.from_pretrained(folder), folder)
        return llm_cls.from_pretrained(folder, torch_dtype=dtype)

    @staticmethod
    def _check_llm_config(config, source: str) -> None:
        if getattr(config, "is_encoder_decoder", False):
            raise UserError(f"{source} holds an encoder-decoder LLM ({config.model_type}); "
                            "lp_blip2_causal needs a decoder-only one (use lp_blip2_t5 for T5)")

    def _load_tokenizer(self, folder: str) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(folder)
        if tok.eos_token_id is None:
            raise UserError(f"the tokenizer in {folder} has no EOS token, which ends every "
                            "target and stops generation; set eos_token in its "
                            "tokenizer_config.json")
        if tok.pad_token_id is None:
            # always masked: any id works; unk keeps EOS distinguishable in the inputs
            tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
            logger.info("%s: the tokenizer has no pad token; padding with %r", folder,
                        tok.pad_token)
        # SentencePiece tokenizers (LLaMA, Mistral) mark a word start themselves: an answer
        # tokenised on its own then already begins a new word, as LAVIS's
        # blip2_vicuna_instruct tokenises it; byte-level BPE ones (OPT, Qwen2) need the space
        first = tok.convert_ids_to_tokens(tok("a", add_special_tokens=False).input_ids)[:1]
        self._marks_word_start = bool(first) and first[0].startswith("\u2581")
        self.llm_tokenizer = tok
        self.END_TEXT = tok.eos_token
        self.eos_token_id = tok.eos_token_id
        self.prompt_length = len(tok(self.prompt).input_ids)

    def _separator(self, before: str, after: str) -> str:
        return "" if self._marks_word_start else super()._separator(before, after)

    def _positions(self, mask: torch.Tensor, new: Optional[int] = None) -> Optional[torch.Tensor]:
        if self.llm.config.model_type == "opt":  # OPT derives them from the mask itself
            return None
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos if new is None else pos[:, -new:]

    def _as_cache(self, past):
        if self.llm.config.model_type == "opt":
            return past
        from transformers import DynamicCache  # other families take no tuples without a cache

        return DynamicCache.from_legacy_cache(past)
