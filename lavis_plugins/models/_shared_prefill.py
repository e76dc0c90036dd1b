"""Generation from transformers' ``OPTForCausalLM`` that runs the prompt once per image instead of
once per beam, and grows its key/value cache in place.

transformers' ``generate`` (4.46) repeats its inputs for the beams (``num_beams`` copies of each
row; ``num_return_sequences`` copies when sampling) BEFORE its first forward, so the prefill of
the visual prompt and the prompt text (32 queries + prompt tokens: most of the work for BLIP-2's
short captions and answers) is computed once per copy on identical rows. OPT's legacy tuple cache
then costs two copies of the whole cache per generated token: each attention layer's
``torch.cat([past, new])``, and beam search's ``_reorder_cache`` (prefix included, although the
beams of one image share it). :func:`shared_prefill` changes, for one ``generate`` call:

- the first forward (``inputs_embeds``, no cache): the decoder and LM head run on one row of
  each group of ``copies`` identical rows; logits and cache are repeated to every copy;
- the cache: each layer's keys/values live in a buffer (B * copies, heads, capacity, d) that
  grows only when full; the tensors ``generate`` holds are views of its filled part, and each
  self-attention layer writes a step's keys/values into it instead of concatenating;
- ``_reorder_cache`` (beam search): only the generated part is reordered, in place (beam search
  moves beams within an image only, and the prefix part is the same in all of them; a finished
  image's rows may take other rows' tails, and their output is discarded).

Sequences and scores equal the plain call's bit for bit (tested on the tiny models: greedy, beam 5
with length penalty and min/max length, and sampling).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

LegacyCache = Tuple[Tuple[torch.Tensor, torch.Tensor], ...]  # per layer (key, value)
GROW = 32  # positions added to a full cache buffer at once


class _CacheBuffers:
    """Per layer, key and value buffers (N, heads, capacity, d); the cache ``generate`` holds is
    their first ``length`` positions."""

    def __init__(self, past: LegacyCache, copies: int, capacity: int) -> None:
        self.layers: List[List[torch.Tensor]] = []
        length = past[0][0].shape[2]
        for layer in past:
            bufs = []
            for t in layer:  # (B, heads, length, d) -> rows repeated for the copies
                n, h, _, d = t.shape
                buf = t.new_empty(n * copies, h, max(capacity, length), d)
                # one broadcast copy (repeat_interleave would copy twice: into a temporary first)
                buf.view(n, copies, h, -1, d)[:, :, :, :length] = t[:, None]
                bufs.append(buf)
            self.layers.append(bufs)

    def views(self, length: int) -> LegacyCache:
        return tuple((k[:, :, :length], v[:, :, :length]) for k, v in self.layers)

    def owns(self, i: int, past_key: torch.Tensor) -> bool:
        """Whether ``past_key`` is the filled part of layer ``i``'s key buffer."""
        return past_key.data_ptr() == self.layers[i][0].data_ptr()

    def append(self, i: int, key: torch.Tensor, value: torch.Tensor, start: int
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write (N, heads, q, d) at ``start`` of layer ``i``; the keys and values so far."""
        end = start + key.shape[2]
        for j, new in enumerate((key, value)):
            buf = self.layers[i][j]
            if end > buf.shape[2]:  # full: a longer buffer (copies once per GROW tokens)
                bigger = buf.new_empty(*buf.shape[:2], end + GROW, buf.shape[3])
                bigger[:, :, :start] = buf[:, :, :start]
                self.layers[i][j] = buf = bigger
            buf[:, :, start:end] = new
        k, v = self.layers[i]
        return k[:, :, :end], v[:, :, :end]


def _sdpa_decode_forward(attn: nn.Module, index: int, state: Dict[str, Any]):
    """``OPTSdpaAttention.forward`` (transformers 4.46) for self-attention with a cache held by
    ``state["buffers"]``: the same products, the new keys/values written into the buffer."""
    plain = attn.forward

    @functools.wraps(plain)
    def forward(hidden_states: torch.Tensor, key_value_states: Optional[torch.Tensor] = None,
                past_key_value: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                attention_mask: Optional[torch.Tensor] = None,
                layer_head_mask: Optional[torch.Tensor] = None, output_attentions: bool = False,
                **kwargs: Any):
        buffers: Optional[_CacheBuffers] = state.get("buffers")
        if (buffers is None or past_key_value is None or key_value_states is not None
                or output_attentions or layer_head_mask is not None
                or not buffers.owns(index, past_key_value[0])):
            return plain(hidden_states, key_value_states, past_key_value, attention_mask,
                         layer_head_mask, output_attentions, **kwargs)
        bsz, q_len, _ = hidden_states.size()
        query = attn._shape(attn.q_proj(hidden_states) * attn.scaling, -1, bsz)
        key = attn._shape(attn.k_proj(hidden_states), -1, bsz)  # (N, heads, q, d)
        value = attn._shape(attn.v_proj(hidden_states), -1, bsz)
        key, value = buffers.append(index, key, value, past_key_value[0].shape[2])
        mask = None if attention_mask is None else attention_mask[:, :, :, :key.shape[-2]]
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask,
            dropout_p=attn.dropout if attn.training else 0.0,
            is_causal=mask is None and q_len > 1,
            scale=1.0)  # OPT scales the query in its projection
        out = attn.out_proj(out.transpose(1, 2).contiguous().view(bsz, q_len, -1))
        return out, None, (key, value)

    return forward


@contextlib.contextmanager
def shared_prefill(llm: nn.Module, rows: int, copies: int, new_tokens: int = 0
                   ) -> Iterator[None]:
    """Within the block, ``llm``'s ``generate`` of ``rows`` inputs, which it repeats ``copies``
    times, computes each group of identical rows once and keeps its cache in growing buffers
    (see the module docstring). ``new_tokens``: the most tokens the call generates (sizes the
    buffers; more still works). A first forward of any other batch size runs as it is. Models
    other than
    transformers' ``OPTForCausalLM`` run as they are; OPT attention other than SDPA keeps its
    own cache."""
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.models.opt import modeling_opt

    # transformers 5 has one OPT attention class and its own cache objects: run as it is there
    sdpa_attention = getattr(modeling_opt, "OPTSdpaAttention", None)
    if sdpa_attention is None or not isinstance(llm, modeling_opt.OPTForCausalLM):
        yield
        return
    plain_forward = llm.forward
    state: Dict[str, Any] = {"prefix": 0}  # prefill positions; "buffers" once it has run
    attentions = [layer.self_attn for layer in llm.get_decoder().layers]
    in_place = all(type(a) is sdpa_attention for a in attentions)

    @functools.wraps(plain_forward)  # generate inspects forward's signature (position_ids)
    def forward(*args: Any, **kwargs: Any):
        embeds = kwargs.get("inputs_embeds")
        if (args or embeds is None or kwargs.get("past_key_values") is not None
                or embeds.shape[0] != rows * copies):  # not generate's first forward
            return plain_forward(*args, **kwargs)

        def one_per_group(t):  # (B * copies, ...) -> (B, ...): generate's repeat_interleave
            return None if t is None else t[::copies]

        out = llm.get_decoder()(
            inputs_embeds=one_per_group(embeds),
            attention_mask=one_per_group(kwargs.get("attention_mask")),
            position_ids=one_per_group(kwargs.get("position_ids")),
            use_cache=True, return_dict=True)
        length = state["prefix"] = embeds.shape[1]
        # the head on every position, as the plain forward: on the last one alone, the matrix
        # product's blocking differs and so do the logits' last bits
        logits = llm.get_output_embeddings()(out.last_hidden_state)[:, -1:]  # (B, 1, V)
        if in_place:
            buffers = state["buffers"] = _CacheBuffers(out.past_key_values, copies,
                                                       length + new_tokens)
            past = buffers.views(length)
        else:
            past = tuple(tuple(t.repeat_interleave(copies, dim=0) for t in layer)
                         for layer in out.past_key_values)
        return CausalLMOutputWithPast(logits=logits.repeat_interleave(copies, dim=0),
                                      past_key_values=past)

    def reorder_cache(past: LegacyCache, beam_idx: torch.Tensor) -> LegacyCache:
        """Beam search's reorder of the cache (N, heads, T, d), generated part only, in place:
        the tensors are this call's own (buffer views, or the decoder's ``torch.cat``)."""
        start = state["prefix"]
        for layer in past:
            for t in layer:
                t[:, :, start:] = t[:, :, start:].index_select(0, beam_idx.to(t.device))
        return past

    llm.forward = forward
    llm._reorder_cache = reorder_cache
    if in_place:
        for i, attn in enumerate(attentions):
            attn.forward = _sdpa_decode_forward(attn, i, state)
    try:
        yield
    finally:
        del llm.forward, llm._reorder_cache  # the class's methods again
        if in_place:
            for attn in attentions:
                del attn.forward
