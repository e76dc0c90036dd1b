"""BLIP-2 stage 2 with a decoder-only LLM (OPT): ``lp_blip2_opt``.

The Q-Former's 32 query outputs, projected to OPT's width, are prepended to the text embeddings as
a soft visual prompt; OPT (transformers' ``OPTForCausalLM``, frozen) is trained through with the
LM loss on the text after the prompt. Same state-dict names as LAVIS's ``blip2_opt``, so its
checkpoints load as they are (see :mod:`lavis_plugins.models._blip2_llm`).

Differences from LAVIS's ``Blip2OPT`` (numerics are equal, tested in tests/test_stage2_parity.py):
- transformers' OPT (SDPA attention, KV cache in generation) instead of a vendored 2022 copy;
- the LM head runs only on the text positions (not on the 32 query positions), and in training
  OPT's layers skip the padding rows and its last layer computes only the rows the loss reads
  (:mod:`~lavis_plugins.models._opt_packed`; same loss, less work);
- training on ``text_input``/``text_output`` pairs (VQA fine-tuning): the loss is on the output;
- batched prompts of different lengths are left-padded after the visual prompt; OPT's positions
  come from the attention mask, so padding does not shift them;
- ``min_length`` counts new tokens (LAVIS counts prompt tokens too);
- ``predict_answers`` and ``rank_answers`` (LAVIS 1.0.2's Blip2OPT has neither).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from lavis.common.registry import registry

from lavis_plugins.common.errors import UserError
from lavis_plugins.models._blip2_llm import (
    Blip2LLMBase,
    Blip2LLMConfig,
    Blip2LLMOutput,
    as_text_list,
    join_prompt,
)
from lavis_plugins.models._opt_packed import (
    TextRows,
    install_packed_forward,
    opt_hidden_for_loss,
    packed_layout,
    select_targets,
    supports_packing,
    text_rows,
)
from lavis_plugins.models._shared_prefill import shared_prefill
from lavis_plugins.models.text_tokens import to_device
from lavis_plugins.paths import config_path

logger = logging.getLogger(__name__)

# the keys ``pretokenize`` adds to a batch: LLM input ids, attention mask, targets (B, L)
LLM_PRETOKENIZED = ("llm_input_ids", "llm_attention_mask", "llm_targets")
# and the flat caption positions that are tokens / carry a target (``_opt_packed.TextRows``)
LLM_ROWS = ("llm_token_rows", "llm_target_rows")


@dataclass
class Blip2OPTConfig(Blip2LLMConfig):
    """``lp_blip2_opt`` settings: the shared ones plus the OPT folder."""

    # local OPT folder (config.json, weights, tokenizer); also accepted as ``llm_path``. Not
    # needed when the checkpoint is a transformers Blip2 folder, which holds its own OPT.
    opt_model: Optional[str] = "facebook/opt-2.7b"
    llm_dtype: str = "fp16"  # BLIP-2 keeps OPT in fp16

    ALIASES: ClassVar[Dict[str, str]] = {"llm_path": "opt_model"}


@contextlib.contextmanager
def sync_free_opt_decoder(decoder: torch.nn.Module) -> Iterator[None]:
    """A training forward of transformers' ``OPTDecoder`` without its two host reads.

    - Its SDPA mask helper checks ``torch.all(mask == 1)`` to drop an all-ones mask (a sync);
      the plain 4D causal mask it builds otherwise gives the same attention. Safe for training
      batches only: right-padded after the visual prompt, so no row is fully masked (left
      padding would need transformers' unmasking of such rows).
    - In training mode it draws ``torch.rand([]) < layerdrop`` per layer even when layerdrop is 0
      (a read of a tensor, and a graph break per layer under ``torch.compile``): with layerdrop
      0 the decoder's own ``training`` flag is cleared for the call. Its layers keep theirs, so
      dropout is unchanged; gradient checkpointing, which reads the flag too, keeps it.
    Any other decoder is run as it is.
    """
    from transformers.modeling_attn_mask_utils import _prepare_4d_causal_attention_mask
    from transformers.models.opt.modeling_opt import OPTDecoder

    if not isinstance(decoder, OPTDecoder):
        yield
        return

    def causal_mask(inputs_embeds, input_shape, past_length, attention_mask, head_mask,
                    output_attentions):
        if attention_mask is None:
            attention_mask = torch.ones(input_shape[0], past_length + input_shape[1],
                                        device=inputs_embeds.device)
        return (_prepare_4d_causal_attention_mask(attention_mask, input_shape, inputs_embeds,
                                                  past_length), attention_mask)

    training = decoder.training
    sdpa = bool(getattr(decoder, "_use_sdpa", False))  # eager attention builds the 4D mask
    if sdpa:
        decoder._update_causal_mask = causal_mask
    if decoder.layerdrop == 0 and not decoder.gradient_checkpointing:
        decoder.training = False
    try:
        yield
    finally:
        if sdpa:
            del decoder._update_causal_mask  # the class's method again
        decoder.training = training


@registry.register_model("lp_blip2_opt")
class LPBlip2OPT(Blip2LLMBase):
    """BLIP-2 with a frozen OPT.

    Model types: ``pretrain_opt2.7b``, ``pretrain_opt6.7b`` (stage-2 pre-trained),
    ``caption_coco_opt2.7b`` (COCO caption fine-tuned, 364 px), ``tiny`` (tests and demos).
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        "pretrain_opt2.7b": config_path("models/lp_blip2_opt_pretrain_opt2.7b.yaml"),
        "pretrain_opt6.7b": config_path("models/lp_blip2_opt_pretrain_opt6.7b.yaml"),
        "caption_coco_opt2.7b": config_path("models/lp_blip2_opt_caption_coco_opt2.7b.yaml"),
        "tiny": config_path("models/lp_blip2_opt_tiny.yaml"),
    }
    CONFIG_CLASS = Blip2OPTConfig
    PROJ_NAME = "opt_proj"
    LLM_NAME = "opt_model"
    LLM_CLASS = "OPTForCausalLM"
    LLM_MODEL_TYPE = "opt"
    LLM_LABEL = "OPT"
    OTHER_ARCH_HINT = "lp_blip2_t5 for FlanT5"
    TOKENIZER_NAME = "opt_tokenizer"
    TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
    VQA_PROMPT = "Question: {} Answer:"  # BLIP-2's zero-shot VQA prompt for OPT
    END_TEXT = "\n"  # ends every training target; its token stops generation (BLIP-2's OPT)

    # ------------------------------------------------------------------ construction
    def make_tiny_llm(self, folder: Path) -> None:
        from lavis_plugins.common.tiny_llm import make_tiny_opt

        make_tiny_opt(folder)

    def _build_llm(self, hf_folder: Optional[str]) -> torch.nn.Module:
        llm = super()._build_llm(hf_folder)
        install_packed_forward(llm.get_decoder())  # training without padding rows
        return llm

    def _load_tokenizer(self, folder: str) -> None:
        super()._load_tokenizer(folder)
        if self.llm_tokenizer.pad_token_id is None:
            raise UserError(f"the OPT tokenizer in {folder} has no pad token")
        # BLIP-2 ends every training caption with "\n" and stops generation there
        self.eos_token_id = self.llm_tokenizer(self.END_TEXT, add_special_tokens=False
                                               ).input_ids[0]
        self.prompt_length = len(self.llm_tokenizer(self.prompt).input_ids)

    @property
    def context_length(self) -> int:
        return int(self.llm.config.max_position_embeddings)

    def _decoder(self):
        """The LLM without its head: (inputs_embeds | input_ids, attention_mask, ...) ->
        last_hidden_state (B, L, H)."""
        return self.llm.get_decoder()

    def _lm_head(self):
        return self.llm.get_output_embeddings()

    def _positions(self, mask: torch.Tensor, new: Optional[int] = None) -> Optional[torch.Tensor]:
        """Position ids for ``mask`` (B, L) (the last ``new`` columns), counting only kept tokens,
        as transformers' generation does; None for OPT, which derives them from the mask."""
        return None

    def _separator(self, before: str, after: str) -> str:
        """What goes between a context and the answer that follows it (each tokenised on its
        own): a space, unless either side has one."""
        return "" if before[-1:].isspace() or after[:1].isspace() else " "

    def _as_cache(self, past):
        """Per-layer (key, value) tuples in the form the decoder takes as past_key_values."""
        return past

    # ------------------------------------------------------------------ training
    def forward(self, samples: Dict[str, Any], return_logits: bool = False) -> Blip2LLMOutput:
        """LM loss on the text after the visual prompt.

        Args:
            samples: ``image`` (B, 3, H, W) and ``text_input`` (B captions; each gets
                ``model.prompt`` in front unless it already starts with it); optionally
                ``text_output`` (B answers: then ``text_input`` is context without loss).
            return_logits: also return the text-position logits (B, L, V) and targets (B, L).
        """
        inputs_opt, atts_opt = self.visual_prompt(  # (B, Nq, H), (B, Nq)
            samples["image"], self.training_prompts(samples))
        ids, mask, targets, rows = self._training_batch(samples, inputs_opt.device)  # (B, L)
        nq = inputs_opt.shape[1]
        with self.autocast():
            embeds = torch.cat([inputs_opt, self._embed(ids)], dim=1)  # (B, Nq + L, H)
            full_mask = torch.cat([atts_opt, mask], dim=1)
            decoder = self._decoder()
            if not return_logits and supports_packing(decoder):
                loss = self._loss_without_padding(embeds, full_mask, targets, rows)
                return Blip2LLMOutput(loss=loss, loss_lm=loss)
            with sync_free_opt_decoder(decoder):
                hidden = decoder(
                    inputs_embeds=embeds, attention_mask=full_mask,
                    position_ids=self._positions(full_mask), use_cache=False,
                    return_dict=True).last_hidden_state
            # position Nq - 1 + i predicts text token i (the last query predicts the first token)
            text_hidden = hidden[:, nq - 1:-1]  # (B, L, H)
            loss = self._lm_loss(text_hidden, targets)
            logits = self._lm_head()(text_hidden).float() if return_logits else None
        return Blip2LLMOutput(loss=loss, loss_lm=loss, logits=logits,
                              targets=targets if return_logits else None)

    def _loss_without_padding(self, embeds: torch.Tensor, full_mask: torch.Tensor,
                              targets: torch.Tensor, rows: TextRows) -> torch.Tensor:
        """The LM loss of ``forward`` with OPT run on the rows that exist and its last layer on
        the rows the loss reads (:mod:`~lavis_plugins.models._opt_packed`): embeds (B, Nq + L,
        H) and full_mask (B, Nq + L), targets (B, L). Sizes come from shapes, not device reads:
        ``compile_for_training`` compiles this whole."""
        b, length = targets.shape
        layout = packed_layout(rows, b, embeds.shape[1] - length, length, embeds.device)
        hidden = opt_hidden_for_loss(self._decoder(), embeds, full_mask, layout)  # (M, H)
        logits = self._lm_head()(hidden).float()  # (M, V)
        total = F.cross_entropy(logits, select_targets(targets, rows), reduction="sum")
        return total / max(hidden.shape[0], 1)  # 0 when no position has a target

    def _lm_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the positions whose target is set (0 when none:
        every text truncated or masked). hidden (B, L, H), targets (B, L) with -100 elsewhere.

        The LM head runs on every position: selecting the targeted ones by a mask would give a
        data-dependent size, a host sync on a GPU (and a graph break under ``torch.compile``)."""
        logits = self._lm_head()(hidden).float().flatten(0, 1)  # (B*L, V)
        total = F.cross_entropy(logits, targets.flatten(), ignore_index=-100, reduction="sum")
        return total / (targets != -100).sum().clamp(min=1)

    def _with_prompt(self, text: str) -> str:
        # LAVIS's caption processors already put the prompt in front; do not add it twice
        return text if text.startswith(self.prompt) else join_prompt(self.prompt, text)

    def _training_tokens(self, samples: Dict[str, Any], device: torch.device
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input ids, attention mask, targets), right-padded, at most ``max_txt_len`` tokens.

        Captions: ``prompt + caption + "\\n"``; the prompt's tokens (with BOS) and padding get
        target -100 (LAVIS's recipe). Pairs: ``text_input`` (with BOS, no loss) followed by
        ``" " + text_output + "\\n"``.
        """
        if LLM_PRETOKENIZED[0] in samples:  # tokenised by the data loader (pretokenize)
            return tuple(samples[k].to(device, non_blocking=True) for k in LLM_PRETOKENIZED)
        tok, end = self.llm_tokenizer, self.END_TEXT
        texts = as_text_list(samples.get("text_input"), "text_input")
        if samples.get("text_output") is None:
            enc = to_device(tok([self._with_prompt(t) + end for t in texts], return_tensors="pt",
                                padding="longest", truncation=True, max_length=self.max_txt_len,
                                padding_side="right"), device)
            targets = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            if self.prompt:
                targets[:, :self.prompt_length] = -100
            return enc.input_ids, enc.attention_mask, targets
        outs = as_text_list(samples["text_output"], "text_output")
        if len(outs) != len(texts):
            raise UserError(f"samples have {len(texts)} text_input but {len(outs)} text_output")
        ins = tok(texts).input_ids
        sep = [self._separator(t, o) for t, o in zip(texts, outs)]
        answers = tok([s + o + end for s, o in zip(sep, outs)], add_special_tokens=False).input_ids
        rows = [(i + a)[:self.max_txt_len] for i, a in zip(ins, answers)]
        labels = [([-100] * len(i) + a)[:self.max_txt_len] for i, a in zip(ins, answers)]
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id
        enc = {"ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
               "mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
               "targets": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])}
        enc = to_device(enc, device)
        return enc["ids"], enc["mask"], enc["targets"]

    def _training_batch(self, samples: Dict[str, Any], device: torch.device
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, TextRows]:
        """``_training_tokens`` on ``device`` and their :class:`TextRows`, found on the CPU
        (by ``pretokenize`` in the data loader, or here before the copy) so that no device is
        read; ids tokenised elsewhere without them are read where they lie."""
        if LLM_PRETOKENIZED[0] in samples:
            ids, mask, targets = self._training_tokens(samples, device)
            if LLM_ROWS[0] in samples:
                return ids, mask, targets, TextRows(*(samples[k] for k in LLM_ROWS))
            return ids, mask, targets, text_rows(mask, targets)
        ids, mask, targets = self._training_tokens(samples, torch.device("cpu"))
        tokens, with_target = text_rows(mask, targets)
        moved = to_device({"ids": ids, "mask": mask, "targets": targets, "tokens": tokens,
                           "with_target": with_target}, device)
        return (moved["ids"], moved["mask"], moved["targets"],
                TextRows(moved["tokens"], moved["with_target"]))

    def pretokenize(self, samples: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """A training batch's LLM input ids, attention mask and targets (B, L) and their
        :class:`TextRows` on the CPU, for the data loader's collate
        (:mod:`~lavis_plugins.models.text_tokens`); ``forward`` then uses them."""
        ids, mask, targets, rows = self._training_batch(samples, torch.device("cpu"))
        return {**dict(zip(LLM_PRETOKENIZED, (ids, mask, targets))), **dict(zip(LLM_ROWS, rows))}

    # ------------------------------------------------------------------ generation
    def _llm_inputs(self, inputs_opt: torch.Tensor, atts_opt: torch.Tensor,
                    prompts: Sequence[str], max_new_tokens: int = 0
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``[visual prompt][left-padded prompt tokens]`` embeddings (B, Nq + P, H) and mask."""
        enc = self.llm_tokenizer(list(prompts), return_tensors="pt", padding="longest",
                                 padding_side="left").to(inputs_opt.device)
        total = inputs_opt.shape[1] + enc.input_ids.shape[1] + max_new_tokens
        if total > self.context_length:
            raise UserError(
                f"prompt too long: {enc.input_ids.shape[1]} prompt tokens + "
                f"{inputs_opt.shape[1]} visual tokens + {max_new_tokens} new tokens = {total} "
                f"exceed OPT's context of {self.context_length} positions. Shorten the prompt "
                "(or question) or lower max_length / max_len.")
        embeds = torch.cat([inputs_opt, self._embed(enc.input_ids).to(inputs_opt.dtype)], dim=1)
        return embeds, torch.cat([atts_opt, enc.attention_mask], dim=1)

    def _generation_kwargs(self) -> Dict[str, Any]:
        return {"eos_token_id": self.eos_token_id,
                "pad_token_id": self.llm_tokenizer.pad_token_id}

    def _generation_context(self, rows: int, copies: int, new_tokens: int):
        """The prompt's prefill runs once per image, not once per beam or sample, and the cache
        grows in place."""
        return shared_prefill(self.llm, rows, copies, new_tokens)

    # ------------------------------------------------------------------ answer ranking
    def _candidate_tokens(self, answers: Sequence[str]) -> List[List[int]]:
        # the text an answer is trained as: after a space, ended by "\n"
        return self.llm_tokenizer([self._separator("?", a.strip()) + a.strip() + self.END_TEXT
                                   for a in answers],
                                  add_special_tokens=False).input_ids

    def _score_prefix(self, image: torch.Tensor, prompts: Sequence[str]):
        inputs_opt, atts_opt = self.visual_prompt(image, prompts)
        with self.autocast():
            embeds, mask = self._llm_inputs(inputs_opt, atts_opt, prompts)
            out = self._decoder()(inputs_embeds=embeds, attention_mask=mask,
                                  position_ids=self._positions(mask), use_cache=True,
                                  return_dict=True)
            first = F.log_softmax(
                self._lm_head()(out.last_hidden_state[:, -1]).float(), dim=-1)  # (B, V)
        past = out.past_key_values
        if hasattr(past, "to_legacy_cache"):
            past = past.to_legacy_cache()
        return {"past": past, "mask": mask, "first": first}

    def _continuation_logp(self, state, b: int, ids: torch.Tensor, mask: torch.Tensor
                           ) -> torch.Tensor:
        """log p(candidate | prefix of sample b) for K candidates ids (K, A) / mask (K, A)."""
        k = ids.shape[0]
        past = tuple(tuple(t[b:b + 1].expand(k, *t.shape[1:]) for t in layer)
                     for layer in state["past"])
        full_mask = torch.cat([state["mask"][b:b + 1].expand(k, -1), mask], dim=1)
        with self.autocast():
            out = self._decoder()(input_ids=ids, attention_mask=full_mask,
                                  position_ids=self._positions(full_mask, ids.shape[1]),
                                  past_key_values=self._as_cache(past), use_cache=False,
                                  return_dict=True)
            logp = F.log_softmax(self._lm_head()(out.last_hidden_state).float(), dim=-1)
        first = state["first"][b, ids[:, 0]]  # (K,)
        rest = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # token t+1 given up to t
        return first + (rest * mask[:, 1:]).sum(1)

