"""BLIP-2 stage 2 with an encoder-decoder LLM (FlanT5): ``lp_blip2_t5``.

The projected query outputs are prepended to the encoder's input embeddings; the frozen T5
(transformers' ``T5ForConditionalGeneration``) is trained as a prefix LM: the encoder reads the
visual prompt and a text prefix, the decoder is scored on the continuation. Same state-dict names
as LAVIS's ``blip2_t5``, so its checkpoints load as they are.

Training text (``prefix_lm_mode``):
- ``text_input`` / ``text_output`` pairs (VQA, instructions): encoder gets ``text_input``, the
  decoder is scored on ``text_output`` (LAVIS's recipe; LAVIS's ``Blip2T5`` accepts only this).
- plain captions (``text_input`` only, BLIP-2's pre-training data): each caption is split at a
  word boundary drawn uniformly from its word positions (``k`` in ``[0, n_words - 1]``; ``k = 0``
  leaves the prefix empty, which is plain captioning). The encoder gets ``prompt`` + the first
  ``k`` words, the decoder the remaining words. ``k`` comes from torch's global RNG, so a run's
  seed fixes the splits and the runner's checkpoint restores them on resume.

Differences from LAVIS's ``Blip2T5`` (numerics equal, tests/test_stage2_parity.py): transformers'
T5 instead of a vendored copy; fp32 on CPU (LAVIS casts T5 to bf16 everywhere); ``min_length``
counts new tokens; caption splitting; answer ranking.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from torch import nn

from lavis_plugins.common.errors import UserError
from lavis_plugins.models._blip2_llm import (
    Blip2LLMBase,
    Blip2LLMConfig,
    Blip2LLMOutput,
    as_text_list,
    join_prompt,
)
from lavis_plugins.models.text_tokens import to_device
from lavis_plugins.paths import config_path

logger = logging.getLogger(__name__)

PREFIX_LM_MODES = ("auto", "split", "pair")


@dataclass
class Blip2T5Config(Blip2LLMConfig):
    """``lp_blip2_t5`` settings: the shared ones plus the T5 folder and the prefix-LM mode."""

    # local FlanT5 folder (config.json, weights, tokenizer); also accepted as ``llm_path``. Not
    # needed when the checkpoint is a transformers Blip2 folder, which holds its own T5.
    t5_model: Optional[str] = "google/flan-t5-xl"
    llm_dtype: str = "bf16"  # BLIP-2 keeps FlanT5 in bf16 (fp16 overflows in T5)
    # activation of T5's gated feed-forward. FlanT5's own config says tanh-approximated
    # "gelu_new"; LAVIS (which trained the released weights) and transformers' BLIP-2 use exact
    # "gelu". null keeps the folder's.
    t5_dense_act_fn: Optional[str] = "gelu"
    # training text: "pair" needs text_output; "split" splits every text_input caption into
    # prefix/continuation; "auto" uses pairs when the batch has text_output, else splits
    prefix_lm_mode: str = "auto"

    ALIASES: ClassVar[Dict[str, str]] = {"llm_path": "t5_model"}

    def validate(self, arch: str) -> None:
        super().validate(arch)
        if self.prefix_lm_mode not in PREFIX_LM_MODES:
            raise UserError(f"model.prefix_lm_mode of {arch} is {self.prefix_lm_mode!r}; choose "
                            f"one of {list(PREFIX_LM_MODES)}")


@registry.register_model("lp_blip2_t5")
class LPBlip2T5(Blip2LLMBase):
    """BLIP-2 with a frozen FlanT5.

    Model types: ``pretrain_flant5xl``, ``pretrain_flant5xxl`` (stage-2 pre-trained),
    ``caption_coco_flant5xl`` (COCO caption fine-tuned, 364 px), ``tiny`` (tests and demos).
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        "pretrain_flant5xl": config_path("models/lp_blip2_t5_pretrain_flant5xl.yaml"),
        "pretrain_flant5xxl": config_path("models/lp_blip2_t5_pretrain_flant5xxl.yaml"),
        "caption_coco_flant5xl": config_path("models/lp_blip2_t5_caption_coco_flant5xl.yaml"),
        "tiny": config_path("models/lp_blip2_t5_tiny.yaml"),
    }
    CONFIG_CLASS = Blip2T5Config
    PROJ_NAME = "t5_proj"
    LLM_NAME = "t5_model"
    LLM_CLASS = "T5ForConditionalGeneration"
    LLM_MODEL_TYPE = "t5"
    LLM_LABEL = "T5"
    OTHER_ARCH_HINT = "lp_blip2_opt for OPT"
    TOKENIZER_CLASS = "T5TokenizerFast"
    TOKENIZER_NAME = "t5_tokenizer"
    TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
    VQA_PROMPT = "Question: {} Short answer:"  # BLIP-2's zero-shot VQA prompt for FlanT5
    # LAVIS's Blip2T5.predict_answers default (prompt=""): the bare question. The paper's prompt
    # is one option away: run.prompt in the YAMLs, or predict_answers(..., prompt=VQA_PROMPT)
    PREDICT_PROMPT = ""

    # ------------------------------------------------------------------ construction
    def make_tiny_llm(self, folder: Path) -> None:
        from lavis_plugins.common.tiny_llm import make_tiny_t5

        make_tiny_t5(folder)

    def _llm_from_folder(self, llm_cls: type, folder: str, dtype: torch.dtype) -> nn.Module:
        from transformers import T5Config

        config = T5Config.from_pretrained(folder)
        if self.cfg.t5_dense_act_fn:
            config.dense_act_fn = self.cfg.t5_dense_act_fn
        return llm_cls.from_pretrained(folder, config=config, torch_dtype=dtype)

    @property
    def context_length(self) -> int:
        """Encoder tokens accepted: the tokenizer's ``model_max_length`` (512 for FlanT5; T5's
        relative positions have no hard limit, but it was trained up to this)."""
        n = self.t5_tokenizer.model_max_length
        return int(n) if n and n < 1_000_000 else 512

    # ------------------------------------------------------------------ training
    def forward(self, samples: Dict[str, Any], return_logits: bool = False) -> Blip2LLMOutput:
        """Prefix-LM loss (see the module docstring for how text becomes prefix/target).

        Args:
            samples: ``image`` (B, 3, H, W), ``text_input`` (B strings), optionally
                ``text_output`` (B strings).
            return_logits: also return the decoder logits (B, L, V) and targets (B, L).
        """
        enc_texts, dec_texts = self.prefix_lm_texts(samples)
        # (B, Nq, H), (B, Nq); a question-aware Q-Former reads the encoder's text
        inputs_t5, atts_t5 = self.visual_prompt(samples["image"], enc_texts)
        tok, device = self.t5_tokenizer, inputs_t5.device
        enc = to_device(tok(enc_texts, padding="longest", truncation=True,
                            max_length=self.max_txt_len, return_tensors="pt"), device)
        dec = to_device(tok(dec_texts, padding="longest", truncation=True,
                            max_length=self.max_txt_len, return_tensors="pt"), device)
        targets = dec.input_ids.masked_fill(dec.input_ids == tok.pad_token_id, -100)  # (B, L)
        with self.autocast():
            embeds = torch.cat([inputs_t5, self._embed(enc.input_ids)], dim=1)
            out = self.t5_model(
                inputs_embeds=embeds, attention_mask=torch.cat([atts_t5, enc.attention_mask], 1),
                decoder_attention_mask=dec.attention_mask, labels=targets, return_dict=True,
                use_cache=False)  # no cache to build in training (and no graph break)
        loss = out.loss.float()
        return Blip2LLMOutput(loss=loss, loss_lm=loss,
                              logits=out.logits.float() if return_logits else None,
                              targets=targets if return_logits else None)

    def prefix_lm_texts(self, samples: Dict[str, Any]) -> Tuple[List[str], List[str]]:
        """(encoder texts, decoder targets) of a training batch."""
        texts = as_text_list(samples.get("text_input"), "text_input")
        mode = self.cfg.prefix_lm_mode
        has_pairs = samples.get("text_output") is not None
        if mode == "pair" or (mode == "auto" and has_pairs):
            if not has_pairs:
                raise UserError(
                    "lp_blip2_t5 (prefix_lm_mode: pair) needs samples['text_output'], the text "
                    "the decoder is trained to produce, and this batch has none. Use a dataset "
                    "that yields text_output (or the lp_vqa task, which builds it from VQA "
                    "answers), or set model.prefix_lm_mode: auto / split to train on captions "
                    "split into prefix and continuation.")
            outs = as_text_list(samples["text_output"], "text_output")
            if len(outs) != len(texts):
                raise UserError(f"{len(texts)} text_input but {len(outs)} text_output")
            return texts, outs
        pairs = [self.split_caption(t) for t in texts]
        return [join_prompt(self.prompt, p) for p, _ in pairs], [s for _, s in pairs]

    @staticmethod
    def split_caption(caption: str) -> Tuple[str, str]:
        """Split at a uniformly drawn word boundary ``k`` in [0, n_words - 1]: the first ``k``
        words (maybe none) and the rest (never empty unless the caption is)."""
        words = caption.split()
        if len(words) <= 1:
            return "", caption.strip()
        k = int(torch.randint(0, len(words), ()))
        return " ".join(words[:k]), " ".join(words[k:])

    # ------------------------------------------------------------------ generation
    def _llm_inputs(self, inputs_t5: torch.Tensor, atts_t5: torch.Tensor,
                    prompts: Sequence[str], max_new_tokens: int = 0
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``[visual prompt][prompt tokens]`` embeddings (B, Nq + P, H) and mask (B, Nq + P)
        for the encoder (``max_new_tokens`` is not counted: the decoder generates them)."""
        enc = self.t5_tokenizer(list(prompts), padding="longest",
                                return_tensors="pt").to(inputs_t5.device)
        total = inputs_t5.shape[1] + enc.input_ids.shape[1]
        if total > self.context_length:
            raise UserError(
                f"prompt too long: {enc.input_ids.shape[1]} prompt tokens + {inputs_t5.shape[1]} "
                f"visual tokens = {total} exceed the T5 encoder's {self.context_length} tokens. "
                "Shorten the prompt (or question).")
        embeds = torch.cat([inputs_t5, self._embed(enc.input_ids).to(inputs_t5.dtype)], dim=1)
        return embeds, torch.cat([atts_t5, enc.attention_mask], dim=1)

    # ------------------------------------------------------------------ answer ranking
    def _candidate_tokens(self, answers: Sequence[str]) -> List[List[int]]:
        return self.t5_tokenizer([a.strip() for a in answers]).input_ids  # ends with </s>

    def _score_prefix(self, image: torch.Tensor, prompts: Sequence[str]) -> Dict[str, Any]:
        inputs_t5, atts_t5 = self.visual_prompt(image, prompts)
        with self.autocast():
            embeds, mask = self._llm_inputs(inputs_t5, atts_t5, prompts)
            hidden = self.t5_model.encoder(inputs_embeds=embeds, attention_mask=mask,
                                           return_dict=True).last_hidden_state
            start = torch.full((hidden.shape[0], 1), self.t5_model.config.decoder_start_token_id,
                               device=hidden.device)
            logits = self.t5_model(encoder_outputs=(hidden,), attention_mask=mask,
                                   decoder_input_ids=start, return_dict=True).logits
        return {"hidden": hidden, "mask": mask,
                "first": F.log_softmax(logits[:, 0].float(), dim=-1)}  # (B, V)

    def _continuation_logp(self, state: Dict[str, Any], b: int, ids: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
        k = ids.shape[0]
        hidden = state["hidden"][b:b + 1].expand(k, -1, -1)
        enc_mask = state["mask"][b:b + 1].expand(k, -1)
        labels = ids.masked_fill(mask == 0, -100)
        with self.autocast():
            logits = self.t5_model(encoder_outputs=(hidden,), attention_mask=enc_mask,
                                   labels=labels, decoder_attention_mask=mask,
                                   return_dict=True).logits
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None])[..., 0]  # (K, A)
        return (logp * mask).sum(1)

