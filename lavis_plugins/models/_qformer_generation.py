"""Stage-1 Q-Former captioning (the ITG head): beam search and nucleus sampling on cached
query keys/values.

A mixin of :class:`~lavis_plugins.models.blip2_qformer.LPBlip2Qformer`; it reads the model's
``Qformer``, tokenizer and ``query_kv_pass``.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lavis_plugins.common.errors import UserError
from lavis_plugins.models.qformer import KV


class QformerGenerationMixin:
    """``generate`` (LAVIS's ``Blip2Qformer.generate`` arguments) and its decoding loops."""

    @torch.no_grad()
    def generate(
        self,
        samples: Mapping[str, Any],
        use_nucleus_sampling: bool = False,
        num_beams: int = 3,
        max_length: int = 30,
        min_length: int = 10,
        top_p: float = 0.9,
        repetition_penalty: float = 1.0,
    ) -> List[str]:
        """Q-Former captions for samples["image"] (B, 3, H, W): B strings.

        Beam search (``num_beams``) or nucleus sampling (``top_p``, and transformers' default
        top-k 50, as LAVIS's call to ``generate`` gets). Lengths count the [DEC] start token.
        The queries run once per image; the beams share their cached keys/values.
        """
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            MinLengthLogitsProcessor,
            RepetitionPenaltyLogitsProcessor,
        )

        max_pos = self.Qformer.config.max_position_embeddings
        if not 1 < max_length <= max_pos:
            raise UserError(f"max_length {max_length}: must be in 2..{max_pos}")
        _, query_kv = self.query_kv_pass(self.encode_image(samples["image"]))
        processors = LogitsProcessorList()
        if repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
        if min_length > 0:
            processors.append(MinLengthLogitsProcessor(min_length, self.tokenizer.sep_token_id))
        if use_nucleus_sampling or num_beams == 1:
            ids = self._sample(query_kv, processors, max_length, top_p, use_nucleus_sampling)
        else:
            ids = self._beam_search(query_kv, processors, max_length, num_beams)
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def _decode_step(self, last_ids: Tensor, past: List[KV]) -> Tuple[Tensor, List[KV]]:
        """Next-token logits (N, V) for the last tokens (N, 1) after the cached rows."""
        hidden, past = self.Qformer.bert(input_ids=last_ids, past_key_values=past)
        return self.Qformer.cls(hidden[:, -1]).float(), past

    def _start(self, query_kv: List[KV], copies: int) -> Tuple[Tensor, List[KV]]:
        past = [(k.repeat_interleave(copies, 0), v.repeat_interleave(copies, 0))
                for k, v in query_kv]
        ids = torch.full((past[0][0].shape[0], 1), self.tokenizer.bos_token_id,
                         dtype=torch.long, device=past[0][0].device)
        return ids, past

    def _sample(self, query_kv, processors, max_length, top_p, sample: bool) -> Tensor:
        """Nucleus sampling (``sample``) or greedy decoding; finished rows continue as padding."""
        from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

        eos, pad = self.tokenizer.sep_token_id, self.tokenizer.pad_token_id
        ids, past = self._start(query_kv, 1)
        unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        while ids.shape[1] < max_length and unfinished.any():
            logits, past = self._decode_step(ids[:, -1:], past)
            scores = processors(ids, logits)
            if sample:
                scores = TopPLogitsWarper(top_p)(ids, TopKLogitsWarper(50)(ids, scores))
                nxt = torch.multinomial(F.softmax(scores, dim=-1), 1).squeeze(1)
            else:
                nxt = scores.argmax(-1)
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            unfinished &= nxt != eos
        return ids

    def _beam_search(self, query_kv, processors, max_length, num_beams) -> Tensor:
        """transformers' beam search (length penalty 1, no early stopping) on our cache."""
        from transformers.generation.beam_search import BeamSearchScorer

        eos, pad = self.tokenizer.sep_token_id, self.tokenizer.pad_token_id
        b = query_kv[0][0].shape[0]
        ids, past = self._start(query_kv, num_beams)
        scorer = BeamSearchScorer(b, num_beams, ids.device, max_length=max_length)
        beam_scores = torch.zeros(b, num_beams, device=ids.device)
        beam_scores[:, 1:] = -1e9  # all beams start equal: expand the first only
        beam_scores = beam_scores.view(-1)
        while True:
            logits, past = self._decode_step(ids[:, -1:], past)
            scores = processors(ids, F.log_softmax(logits, dim=-1)) + beam_scores[:, None]
            vocab = scores.shape[-1]
            top, flat = scores.view(b, num_beams * vocab).topk(2 * num_beams, dim=1)
            out = scorer.process(ids, top, flat % vocab, flat // vocab, pad_token_id=pad,
                                 eos_token_id=eos, decoder_prompt_len=1)
            beam_scores, beam_idx = out["next_beam_scores"], out["next_beam_indices"]
            ids = torch.cat([ids[beam_idx], out["next_beam_tokens"][:, None]], dim=1)
            past = [(k[beam_idx], v[beam_idx]) for k, v in past]
            if scorer.is_done or ids.shape[1] >= max_length:
                break
        return scorer.finalize(ids, beam_scores, out["next_beam_tokens"], beam_idx,
                               max_length=max_length, pad_token_id=pad, eos_token_id=eos,
                               decoder_prompt_len=1)["sequences"]
