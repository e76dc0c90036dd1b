"""OPT's training forward without its padding rows (the frozen LLM of ``lp_blip2_opt``).

A stage-2 training batch feeds OPT, per sample, the visual prompt (Nq rows) and the caption's
tokens, right-padded to the batch's longest caption; the loss reads one row per target token.
transformers' ``OPTDecoder`` runs every layer on every row (padding included) and the last
layer on every row, though after it only the rows that predict a target are read. Here, with the
same weights and the same operations per row:

- the per-row work of every layer (layer norms, projections, feed-forward) runs on the rows that
  exist, packed as (N, H) with N = B * Nq + the batch's caption tokens; only the attention runs
  on the padded (B, L) layout, scattered in and gathered out, under transformers' causal +
  padding mask;
- the last layer computes its attention output and feed-forward for the rows the loss reads
  (every row is still a key and value there), and so do the final layer norm and projection.

Padding rows never influence kept rows (they are masked keys), so this is transformers'
result on the kept rows, in less work: with 5-15-word captions in a batch of 16 about a tenth
of the OPT rows are padding (``benchmarks/flops_stage2.py``: 1.08x -> 1.14x fewer FLOPs than
LAVIS at the small config); with COCO-like captions (about 14 tokens, the batch's longest about
22) about 15% of OPT-2.7B's rows, by that count. Tested equal to transformers' decoder
(``tests/test_opt_packed.py``). The row indices are derived from the tokenizer's CPU output
(:func:`text_rows`) before the batch reaches the device, so no host sync is added on a GPU.
"""
from __future__ import annotations

import types
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = -100  # target of a position without a loss


class TextRows(NamedTuple):
    """Which caption positions exist and which carry a target, as flat indices into the (B, T)
    caption layout (CPU-computed, see :func:`text_rows`)."""

    tokens: Tensor  # (Nt,) flat b * T + j of the non-padding tokens, ascending
    targets: Tensor  # (M,) flat b * T + i of the positions whose target is set, ascending


def text_rows(mask: Tensor, targets: Tensor) -> TextRows:
    """:class:`TextRows` of a caption batch: mask and targets (B, T). On the tokenizer's CPU
    tensors this reads no device; on device tensors ``nonzero`` waits for the device."""
    return TextRows(mask.flatten().nonzero().squeeze(1), (targets.flatten() != IGNORE)
                    .nonzero().squeeze(1))


class PackedLayout(NamedTuple):
    """Rows of the (B, L = Nq + T) decoder layout: ``keep`` (N,) ascending flat indices of the
    rows that exist; ``out`` (M,) those the loss reads, and ``out_in_keep`` (M,) their places in
    ``keep``; ``b``, ``length``: B and L."""

    keep: Tensor
    out: Tensor
    out_in_keep: Tensor
    b: int
    length: int


def packed_layout(rows: TextRows, b: int, num_query: int, num_text: int,
                  device: torch.device) -> PackedLayout:
    """The decoder rows of ``rows`` (caption coordinates, B x ``num_text``) behind ``num_query``
    visual-prompt rows per sample, by arithmetic on ``device`` (no host read): text token j of
    sample b is row b * L + Nq + j; target i is predicted by row b * L + Nq - 1 + i (the last
    query predicts the first caption token)."""
    length = num_query + num_text
    tokens, targets = (t.to(device, non_blocking=True) for t in rows)
    text = tokens // num_text * length + num_query + tokens % num_text
    queries = (torch.arange(b, device=device)[:, None] * length
               + torch.arange(num_query, device=device)).flatten()
    keep = torch.cat([queries, text]).sort().values
    out = targets // num_text * length + num_query - 1 + targets % num_text
    return PackedLayout(keep, out, torch.searchsorted(keep, out), b, length)


# the sub-modules of an OPT layer that :func:`_layer` reads
_LAYER_PARTS = ("self_attn_layer_norm", "final_layer_norm", "fc1", "fc2", "activation_fn",
                "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


def supports_packing(decoder: nn.Module) -> bool:
    """Whether :func:`opt_hidden_for_loss` can stand in for ``decoder``'s forward: an OPT
    decoder whose layers carry :func:`install_packed_forward`'s forward (found through an FSDP
    wrapper; installed only on layers with the sub-modules it reads), without layerdrop or
    gradient checkpointing in training (whose own forward then keeps their behaviour). Called
    every training step: the layers' structure is checked once, at installation."""
    from transformers.models.opt.modeling_opt import OPTDecoder

    if not isinstance(decoder, OPTDecoder):
        return False
    if decoder.training and (getattr(decoder, "layerdrop", 0) > 0
                             or getattr(decoder, "gradient_checkpointing", False)):
        return False
    if not all(_has(decoder, p) for p in ("embed_positions.offset", "project_in", "project_out",
                                          "final_layer_norm")):
        return False
    return all(getattr(getattr(getattr(layer, "_fsdp_wrapped_module", layer), "forward", None),
                       "__func__", None) is _plain_or_packed for layer in decoder.layers)


class PackedCall(NamedTuple):
    """What a layer's installed forward needs to run packed (see :func:`_plain_or_packed`)."""

    config: object  # the decoder's OPTConfig
    mask: Tensor  # (B, 1, L, L) boolean attention mask
    layout: "PackedLayout"
    last: bool


def _plain_or_packed(self: nn.Module, *args, packed: Optional[PackedCall] = None, **kwargs):
    """An OPT layer's forward, installed per layer by :func:`install_packed_forward`:
    transformers' own, or with ``packed`` :func:`_layer` on the kept rows ``args[0]``. Being
    the layer's forward, it runs inside the layer's call, where ``run.strategy: fsdp`` gathers
    a sharded layer's weights (and frees them after)."""
    if packed is None:
        return type(self).forward(self, *args, **kwargs)
    return _layer(self, packed.config, args[0], packed.mask, packed.layout, packed.last)


def install_packed_forward(decoder: nn.Module) -> None:
    """Give each layer of an OPT ``decoder`` that has the sub-modules :func:`_layer` reads (a
    transformers version laid out otherwise keeps its own) the forward
    :func:`opt_hidden_for_loss` calls (an instance attribute: the class, its parameter names and
    checkpoints are unchanged); anything else is left as it is."""
    from transformers.models.opt.modeling_opt import OPTDecoder, OPTDecoderLayer

    if not isinstance(decoder, OPTDecoder):
        return
    for layer in decoder.layers:
        if isinstance(layer, OPTDecoderLayer) and all(_has(layer, p) for p in _LAYER_PARTS):
            layer.forward = types.MethodType(_plain_or_packed, layer)


def _has(obj, dotted: str) -> bool:
    for name in dotted.split("."):
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


def _pad(rows: Tensor, keep: Tensor, layout: PackedLayout, heads: int) -> Tensor:
    """Packed rows (N, H) -> (B, heads, L, H / heads), zeros at the missing rows."""
    full = rows.new_zeros(layout.b * layout.length, rows.shape[-1]).index_copy(0, keep, rows)
    return full.view(layout.b, layout.length, heads, -1).transpose(1, 2)


def _layer(layer: nn.Module, config, x: Tensor, mask: Tensor, layout: PackedLayout,
           last: bool) -> Tensor:
    """One ``OPTDecoderLayer`` on the kept rows x (N, H) -> (N, H), or (M, H) for the rows the
    loss reads when ``last``; the same operations as the layer's own forward, per row. Sizes
    and dropout rates come from the ``OPTConfig`` (their attribute names vary by version)."""
    attn = layer.self_attn
    heads, before = config.num_attention_heads, config.do_layer_norm_before
    scaling = (config.hidden_size // heads) ** -0.5
    p_attn = config.attention_dropout if layer.training else 0.0
    p_out = config.dropout if layer.training else 0.0
    residual = x
    h = layer.self_attn_layer_norm(x) if before else x
    keys, values = (_pad(p(h), layout.keep, layout, heads) for p in (attn.k_proj, attn.v_proj))
    rows = layout.out if last else layout.keep
    if last:  # queries for the rows read after this layer only
        h, residual = h[layout.out_in_keep], residual[layout.out_in_keep]
    # OPT scales the queries in the projection and not in the product
    q = _pad(attn.q_proj(h) * scaling, rows, layout, heads)
    mixed = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0,
                                           dropout_p=p_attn)
    mixed = mixed.transpose(1, 2).reshape(layout.b * layout.length, -1).index_select(0, rows)
    x = residual + F.dropout(attn.out_proj(mixed), p_out, training=p_out > 0)
    if not before:  # OPT-350m normalises after the block
        x = layer.self_attn_layer_norm(x)
    residual = x
    h = layer.final_layer_norm(x) if before else x
    h = layer.fc2(layer.activation_fn(layer.fc1(h)))
    x = residual + F.dropout(h, p_out, training=p_out > 0)
    return x if before else layer.final_layer_norm(x)


def opt_hidden_for_loss(decoder: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor,
                        layout: PackedLayout) -> Tensor:
    """``decoder(inputs_embeds=..., attention_mask=...).last_hidden_state`` at the rows
    ``layout.out``: (M, H_out). inputs_embeds (B, L, word_embed_proj_dim), attention_mask (B, L)
    (1 = token, right padding; every sample's first row a token). Positions are counted over the
    kept tokens, as OPT's learned position embedding does."""
    positions = (attention_mask.cumsum(1) * attention_mask - 1).flatten()[layout.keep]
    pos_embed = decoder.embed_positions
    x = inputs_embeds.flatten(0, 1)[layout.keep]
    if decoder.project_in is not None:
        x = decoder.project_in(x)
    x = x + nn.Embedding.forward(pos_embed, positions + pos_embed.offset)
    keep = attention_mask.bool()
    length = keep.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=keep.device).tril()
    mask = causal[None, None] & keep[:, None, None, :]  # (B, 1, L, L)
    for i, layer in enumerate(decoder.layers):  # through each layer's call (FSDP gathers there)
        x = layer(x, packed=PackedCall(decoder.config, mask, layout,
                                       last=i == len(decoder.layers) - 1))
    if decoder.final_layer_norm is not None:
        x = decoder.final_layer_norm(x)
    if decoder.project_out is not None:
        x = decoder.project_out(x)
    return x


def select_targets(targets: Tensor, rows: TextRows) -> Tensor:
    """The set targets (M,) in :attr:`PackedLayout.out`'s order."""
    return targets.flatten()[rows.targets.to(targets.device, non_blocking=True)]


__all__ = ["IGNORE", "PackedCall", "PackedLayout", "TextRows", "install_packed_forward",
           "opt_hidden_for_loss", "packed_layout", "select_targets", "supports_packing",
           "text_rows"]
