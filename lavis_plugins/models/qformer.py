"""Q-Former: a BERT whose first rows are learned queries (BLIP-2, Li et al. 2023).

The queries cross-attend to image features every ``cross_attention_freq`` blocks, share the
self-attention with the text and have their own feed-forward layers (``*_query``). Parameter names
and shapes are exactly those of LAVIS's ``Qformer.BertLMHeadModel`` (``bert.*``, ``cls.*``), so
LAVIS checkpoints load with no renaming and ours load into LAVIS. The computation is our own,
tested equal to LAVIS's in ``tests/test_stage1_parity.py``:

- attention is ``F.scaled_dot_product_attention`` with boolean masks (LAVIS adds -10000, which is
  the same after the softmax in fp32), or with dropout on the CPU the same product computed
  without SDPA's math-backend copies (:func:`attention`);
- the cross-attention keys/values of an image are computed once (:meth:`QFormerModel.image_kv`)
  and shared by every pass over that image, e.g. the ITC query pass and the ITM rows; rows that
  attend to the same image are attended together (:class:`ImageKV` ``repeats``), so keys/values
  are never copied per row;
- passes return each layer's self-attention keys/values, so a text pass can attend to queries
  computed earlier (ITG, captioning) without running them again;
- a single pass of few query rows per image (stage 2, video frames, feature extraction) attends
  to the image features without projecting them to keys/values at all
  (:class:`FoldedImage`): the key projection moves onto the queries and the value projection
  after the attention, which is exact and costs less whenever heads x query rows is below the
  hidden width (0.55-0.6x the multiply-adds at BLIP-2's sizes).

The simple sub-blocks (residual dense + LayerNorm, feed-forward, LM head) are transformers' BERT
modules, which have LAVIS's parameter names.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig, PreTrainedModel
from transformers.models.bert.modeling_bert import (
    BertIntermediate,
    BertOnlyMLMHead,
    BertOutput,
    BertSelfOutput,
)

KV = Tuple[Tensor, Tensor]  # keys, values, each (B, heads, L, head_dim)


class FoldedImage(NamedTuple):
    """Image features (B_img, N, encoder_width) that a cross-attention layer attends to with its
    key/value projections folded into the queries and outputs (see
    :meth:`QFormerSelfAttention.attend_folded`), in place of precomputed keys/values."""

    feats: Tensor


ImageEntry = Union[KV, FoldedImage]  # what one cross-attention layer attends to


class ImageKV(NamedTuple):
    """Cross-attention keys/values of a batch of B_img images, for ``repeats`` * B_img
    consecutive rows of a pass: row r attends to image r % B_img."""

    layers: List[Optional[ImageEntry]]  # per Q-Former layer; None: no cross-attention there
    repeats: int = 1

    def select(self, index: Tensor) -> "ImageKV":
        """The keys/values of images ``index`` (a gather: prefer ``repeats`` where it serves)."""
        return ImageKV([None if kv is None else
                        FoldedImage(kv.feats[index]) if isinstance(kv, FoldedImage) else
                        (kv[0][index], kv[1][index]) for kv in self.layers], self.repeats)


def _attend_grouped(q: Tensor, groups: Sequence[Tuple[ImageEntry, int]],
                    attend: Callable[[Tensor, ImageEntry], Tensor]) -> Tensor:
    """q (R, h, Lq, hd) split into consecutive row groups, group (kv, m) holding m * B_img rows
    that attend to kv (B_img images) in turn via ``attend(q (B_img, h, L, hd), kv)``; the m rows
    of one image become one longer query sequence (attention is independent per query, so this
    is exact)."""
    sizes = [m * (kv.feats if isinstance(kv, FoldedImage) else kv[0]).shape[0]
             for kv, m in groups]
    if sum(sizes) != q.shape[0]:
        raise ValueError(f"{q.shape[0]} query rows but the image keys/values cover {sum(sizes)}")
    outs = []
    # one split, not a slice per group: its backward is one cat, not a zero-filled copy each
    for (kv, m), qg in zip(groups, q.split(sizes)):
        b_img = qg.shape[0] // m
        if m > 1:  # (m*B, h, Lq, hd) -> (B, h, m*Lq, hd)
            _, h, lq, hd = qg.shape
            qg = qg.view(m, b_img, h, lq, hd).permute(1, 2, 0, 3, 4).reshape(b_img, h, m * lq, hd)
        o = attend(qg, kv)
        if m > 1:
            o = o.view(b_img, h, m, lq, hd).permute(2, 0, 1, 3, 4).reshape(m * b_img, h, lq, hd)
        outs.append(o)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
              dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(hd)) v for q (B, h, Lq, hd), k and v (B, h, Lk, hd); ``mask`` boolean
    (True = may attend), broadcastable to (B, h, Lq, Lk). The Q-Former's masks keep at least one
    key in every row (a query, or [CLS]).

    This is ``F.scaled_dot_product_attention`` (its fused kernels) except with dropout on the
    CPU, where SDPA has no fused kernel and takes its math backend, which rescales ``k`` on every
    call (a copy of the keys when they are a transposed view), turns the boolean mask into an
    additive one and checks for fully masked rows. Here the scores are one batched product with
    the scale on ``q``, masked in place of adding, and the keys are read where they lie
    (contiguous head-major keys, as :meth:`QFormerModel.image_kv` makes the shared image ones,
    need no copy). On a GPU SDPA's fused kernels apply dropout themselves.
    """
    if not dropout_p or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))  # (B, h, Lq, Lk)
    if mask is not None:  # next to a kept key the minimum becomes exp() = 0, as SDPA's -inf
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.matmul(F.dropout(scores.softmax(-1), dropout_p), v)


def qformer_config(
    bert_config: BertConfig, num_query_token: int, vision_width: int, cross_attention_freq: int
) -> BertConfig:
    """``bert_config`` plus the Q-Former fields LAVIS's ``init_Qformer`` sets (same names)."""
    config = BertConfig.from_dict(bert_config.to_dict())
    config.encoder_width = vision_width
    config.add_cross_attention = True
    config.cross_attention_freq = cross_attention_freq
    config.query_length = num_query_token
    return config


class QFormerSelfAttention(nn.Module):
    """Multi-head attention projections (LAVIS's ``attention.self`` / ``crossattention.self``)."""

    def __init__(self, config: BertConfig, kv_width: int):
        super().__init__()
        d = config.hidden_size
        if d % config.num_attention_heads:
            raise ValueError(f"hidden_size {d} is not a multiple of num_attention_heads "
                             f"{config.num_attention_heads}")
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(kv_width, d)
        self.value = nn.Linear(kv_width, d)
        self.dropout_p = config.attention_probs_dropout_prob

    def split_heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)  # (B, h, L, hd)

    def keys_values(self, x: Tensor) -> KV:
        """(B, L, kv_width) -> keys and values (B, h, L, hd)."""
        return self.split_heads(self.key(x)), self.split_heads(self.value(x))

    def forward(self, x: Tensor, kv: Union[KV, Sequence[Tuple[ImageEntry, int]]],
                mask: Optional[Tensor] = None) -> Tensor:
        """x (B, Lq, D) attends to ``kv`` (keys, values), or to row groups [(kv, repeats), ...]
        (see :class:`ImageKV`); ``mask`` is boolean (True = may attend), broadcastable to
        (B, h, Lq, Lk). Returns (B, Lq, D)."""
        q = self.split_heads(self.query(x))
        p = self.dropout_p if self.training else 0.0
        if isinstance(kv[0], Tensor):
            out = attention(q, kv[0], kv[1], mask, p)
        else:
            def attend(qg: Tensor, entry: ImageEntry) -> Tensor:
                if isinstance(entry, FoldedImage):
                    return self.attend_folded(qg, entry.feats, p)
                return attention(qg, entry[0], entry[1], dropout_p=p)

            out = _attend_grouped(q, kv, attend)
        return out.transpose(1, 2).flatten(2)

    def attend_folded(self, q: Tensor, x: Tensor, dropout_p: float = 0.0) -> Tensor:
        """Unmasked attention of q (B, h, L, hd) to features x (B, N, C) through this layer's
        key/value projections, without computing keys or values: -> (B, h, L, hd).

        Per head, q k_n = (q W_k) x_n + q b_k: the bias term is the same for every key, so the
        softmax drops it, and the scores are (q W_k) x^T. Likewise sum_n a_n (W_v x_n + b_v) =
        W_v (sum_n a_n x_n) + (sum_n a_n) b_v. Cost per image 2 L D C + 2 h L N C multiply-adds
        instead of 2 N C D + 2 L N D, and no (B, N, D) key/value tensors.
        """
        b, h, n_q, hd = q.shape
        c = x.shape[-1]
        # (h, B*L, hd) @ (h, hd, C): each head's queries into the feature space, scaled as SDPA
        qt = torch.matmul(q.transpose(0, 1).reshape(h, b * n_q, hd) * hd ** -0.5,
                          self.key.weight.view(h, hd, c))
        qt = qt.view(h, b, n_q, c).transpose(0, 1).reshape(b, h * n_q, c)
        attn = torch.softmax(torch.bmm(qt, x.transpose(1, 2)), dim=-1)  # (B, h*L, N)
        if dropout_p:
            attn = F.dropout(attn, dropout_p)
        mixed = torch.bmm(attn.to(x.dtype), x)  # (B, h*L, C)
        mixed = mixed.view(b, h, n_q, c).transpose(0, 1).reshape(h, b * n_q, c)
        out = torch.matmul(mixed, self.value.weight.view(h, hd, c).transpose(1, 2))  # (h, B*L, hd)
        bias = self.value.bias.view(h, 1, hd)
        if dropout_p:  # dropped-out rows no longer sum to one
            weight = attn.sum(-1).view(b, h, n_q).transpose(0, 1).reshape(h, b * n_q, 1)
            out = out + weight.to(out.dtype) * bias
        else:
            out = out + bias
        # the key bias has no effect (its true gradient is 0); keep it in the graph so that it
        # gets that zero gradient, as DDP (find_unused_parameters off) needs every parameter to
        out = out + self.key.bias.sum() * 0
        return out.view(h, b, n_q, hd).transpose(0, 1)

    def folding_pays(self, rows_per_image: int, num_features: int) -> bool:
        """Whether :meth:`attend_folded` costs fewer multiply-adds than projecting
        ``num_features`` image tokens to keys/values once for ``rows_per_image`` query rows."""
        d, c, h = self.query.out_features, self.key.in_features, self.num_heads
        r, n = rows_per_image, num_features
        return r * d * c + h * r * n * c < n * c * d + r * n * d


class QFormerAttention(nn.Module):
    def __init__(self, config: BertConfig, kv_width: int):
        super().__init__()
        self.self = QFormerSelfAttention(config, kv_width)
        self.output = BertSelfOutput(config)  # dense, dropout, LayerNorm(x + residual)

    def forward(self, x: Tensor, kv, mask: Optional[Tensor] = None) -> Tensor:
        return self.output(self.self(x, kv, mask), x)


class QFormerLayer(nn.Module):
    # not an FSDP unit (run.strategy: fsdp): image_kv reads crossattention's weights before the
    # layers run, outside this module's forward, where a unit's weights are still sharded
    fsdp_unit = False

    def __init__(self, config: BertConfig, has_cross_attention: bool):
        super().__init__()
        self.attention = QFormerAttention(config, config.hidden_size)
        self.has_cross_attention = has_cross_attention
        if has_cross_attention:
            self.crossattention = QFormerAttention(config, config.encoder_width)
        # text feed-forward, and a separate one for the query rows
        self.intermediate, self.output = BertIntermediate(config), BertOutput(config)
        self.intermediate_query, self.output_query = BertIntermediate(config), BertOutput(config)

    def forward(
        self, h: Tensor, num_query: int, mask: Optional[Tensor], past_kv: Optional[KV],
        image_kv: Optional[Sequence[Tuple[KV, int]]], out_rows: Optional[int] = None,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """h (B, L, D) whose first ``num_query`` rows are queries -> (B, L', D), keys, values.

        ``past_kv`` (earlier rows' self-attention keys/values) is prepended to this pass's; the
        returned keys/values include it, so they can serve as the next pass's ``past_kv``.
        ``out_rows``: only the first rows are needed after this layer (L' = out_rows); every
        row still serves as key/value.
        """
        a, k, v = self.self_attend(h, mask, past_kv, out_rows)
        return self.feed_forward(a, num_query, image_kv), k, v

    def self_attend(self, h: Tensor, mask: Optional[Tensor] = None, past_kv: Optional[KV] = None,
                    out_rows: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """The self-attention half of :meth:`forward`: h (B, L, D) -> (B, L', D), keys, values."""
        k, v = self.attention.self.keys_values(h)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        if out_rows is not None:
            h = h[:, :out_rows]
            if mask is not None and mask.shape[-2] > 1:
                mask = mask[..., :out_rows, :]
        return self.attention(h, (k, v), mask), k, v

    def feed_forward(self, a: Tensor, num_query: int,
                     image_kv: Optional[Sequence[Tuple[KV, int]]]) -> Tensor:
        """The rest of :meth:`forward` after self-attention: the query rows' cross-attention and
        feed-forward, the text rows' feed-forward. a (B, L', D) -> (B, L', D)."""
        parts = []
        # query and text rows by one split, not two slices: the backward is one cat, not a
        # zero-filled full-size gradient per slice and their sum
        if num_query and a.shape[1] > num_query:
            q, t = a.split([num_query, a.shape[1] - num_query], dim=1)
        else:
            q, t = (a, None) if num_query else (None, a)
        if q is not None:
            if self.has_cross_attention:
                if image_kv is None:
                    raise ValueError("query rows reach a cross-attention layer without image "
                                     "features")
                q = self.crossattention(q, image_kv)
            parts.append(self.output_query(self.intermediate_query(q), q))
        if t is not None:
            parts.append(self.output(self.intermediate(t), t))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class QFormerEmbeddings(nn.Module):
    """Word + absolute position embeddings for text (no token types, as in LAVIS); the queries
    are prepended as they are; LayerNorm and dropout on the whole sequence."""

    def __init__(self, config: BertConfig):
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, d)
        self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # persistent, as in LAVIS, so the state dicts have the same keys
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None])

    def forward(self, input_ids: Optional[Tensor], query_embeds: Optional[Tensor],
                position_offset: int = 0) -> Tensor:
        parts = [] if query_embeds is None else [query_embeds]
        if input_ids is not None:
            n = input_ids.shape[1]
            if position_offset + n > self.position_ids.shape[1]:
                raise ValueError(f"text of {position_offset + n} tokens exceeds the "
                                 f"{self.position_ids.shape[1]} position embeddings")
            pos = self.position_ids[:, position_offset:position_offset + n]
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(pos))
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.dropout(self.LayerNorm(x))


class QFormerEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(
            QFormerLayer(config, i % config.cross_attention_freq == 0)
            for i in range(config.num_hidden_layers))


class QFormerModel(nn.Module):
    """LAVIS's ``Qformer.bert``: embeddings and layers."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = QFormerEmbeddings(config)
        self.encoder = QFormerEncoder(config)
        self.gradient_checkpointing = False  # recompute each layer in backward when training

    def image_kv(self, image_embeds: Tensor, rows_per_image: Optional[int] = None) -> ImageKV:
        """Cross-attention keys/values of every layer for image features (B_img, N,
        vision_width); compute once, pass to every pass over these images.

        ``rows_per_image``: the caller runs one pass in which this many query rows attend to
        each image (e.g. the 32 queries of stage 2); where it is cheaper, the layers then attend
        to the features directly (:class:`FoldedImage`) and no keys/values are computed. Leave
        it None when the keys/values serve several passes (stage 1's ITC and ITM)."""
        layers: List[Optional[ImageEntry]] = []
        for layer in self.encoder.layer:
            if not layer.has_cross_attention:
                layers.append(None)
                continue
            attn = layer.crossattention.self
            if rows_per_image is not None and attn.folding_pays(rows_per_image,
                                                                image_embeds.shape[1]):
                layers.append(FoldedImage(image_embeds))
            else:
                # head-major and contiguous: every pass over these images (and its backward)
                # then reads them without a copy (see :func:`attention`)
                layers.append(tuple(t.contiguous() for t in attn.keys_values(image_embeds)))
        return ImageKV(layers)

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        query_embeds: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        image_kv: Union[ImageKV, Sequence[ImageKV], None] = None,
        image_index: Optional[Tensor] = None,
        past_key_values: Optional[Sequence[KV]] = None,
        last_rows: Optional[int] = None,
    ) -> Tuple[Tensor, List[KV]]:
        """One pass over [queries; text].

        Args:
            input_ids: (B, T) text, or None for a query-only pass.
            query_embeds: (B, Nq, D) queries, or None for a text-only pass.
            attention_mask: boolean, True where a row may attend, broadcastable to
                (B, heads, L, P + L) with P the past length; None: everything.
            image_kv: from :meth:`image_kv`, needed when there are queries: one
                :class:`ImageKV`, or several covering consecutive rows.
            image_index: (B,) for arbitrary pairs: row b attends to image ``image_index[b]`` of
                the single ``image_kv`` (a gather of its keys/values).
            past_key_values: per layer (keys, values) (B, h, P, hd) of earlier rows, e.g. the
                queries' from a query pass; text positions then start at P - query_length.
        Returns:
            last hidden state (B, L, D) and per layer the self-attention (keys, values)
            (B, h, P + L, hd), to pass on as ``past_key_values``.
        """
        num_query = 0 if query_embeds is None else query_embeds.shape[1]
        offset = 0
        if past_key_values is not None:
            offset = past_key_values[0][0].shape[2] - self.config.query_length
        h = self.embeddings(input_ids, query_embeds, offset)
        if image_index is not None:
            image_kv = image_kv.select(image_index)
        groups = [image_kv] if isinstance(image_kv, ImageKV) else (image_kv or [])
        present = []
        for i, layer in enumerate(self.encoder.layer):
            cross = [(g.layers[i], g.repeats) for g in groups] if layer.has_cross_attention else []
            last = i == len(self.encoder.layer) - 1
            args = (h, num_query, attention_mask,
                    None if past_key_values is None else past_key_values[i], cross or None,
                    last_rows if last else None)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h, k, v = checkpoint(layer, *args, use_reentrant=False)
            else:
                h, k, v = layer(*args)
            present.append((k, v))
        return h, present


class QFormer(PreTrainedModel):
    """LAVIS's ``BertLMHeadModel`` layout: ``bert`` (:class:`QFormerModel`) and ``cls`` (LM head,
    its decoder weight tied to the word embeddings as transformers ties BERT's)."""

    config_class = BertConfig
    base_model_prefix = "bert"
    # BERT checkpoints hold parts the Q-Former has no use for
    _keys_to_ignore_on_load_unexpected = [r"pooler", r"token_type_embeddings",
                                          r"seq_relationship"]
    _keys_to_ignore_on_load_missing = [r"position_ids", r"predictions.decoder.bias"]

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = QFormerModel(config)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # LAVIS's BertPreTrainedModel._init_weights (applies to what the BERT checkpoint lacks)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.bert.embeddings.word_embeddings = value

    def get_output_embeddings(self) -> Optional[nn.Linear]:
        return None if self.cls is None else self.cls.predictions.decoder

    def set_output_embeddings(self, new: nn.Linear) -> None:
        self.cls.predictions.decoder = new

    def forward(self, *args, **kwargs):
        raise NotImplementedError("call .bert(...) and .cls(...) (see QFormerModel.forward)")

    @classmethod
    def from_bert(
        cls, bert_path: str, num_query_token: int, vision_width: int, cross_attention_freq: int = 2
    ) -> "QFormer":
        """A Q-Former initialised as LAVIS initialises it from BERT.

        BERT's weights load by name (cross-attention layers start random); the query
        feed-forward layers start as copies of the text ones (LAVIS does this in
        ``Blip2Qformer.__init__``; for stage 2 it changes nothing once stage-1 weights load).
        """
        config = qformer_config(BertConfig.from_pretrained(bert_path), num_query_token,
                                vision_width, cross_attention_freq)
        model = cls.from_pretrained(bert_path, config=config)
        model.copy_text_ffn_to_query()
        return model

    @torch.no_grad()
    def copy_text_ffn_to_query(self) -> None:
        """Copy every ``intermediate``/``output`` weight into its ``*_query`` twin."""
        for layer in self.bert.encoder.layer:
            layer.intermediate_query.load_state_dict(layer.intermediate.state_dict())
            layer.output_query.load_state_dict(layer.output.state_dict())


def padding_mask(text_mask: Tensor, num_query: int = 0) -> Tensor:
    """Bidirectional mask over [queries; text]: (B, 1, 1, Nq + T), False at text padding."""
    keep = text_mask.bool()
    if num_query:
        keep = torch.cat([keep.new_ones(keep.shape[0], num_query), keep], dim=1)
    return keep[:, None, None, :]


def causal_text_mask(text_mask: Tensor, num_query: int) -> Tensor:
    """ITG / captioning mask for text rows that follow ``num_query`` cached query rows:
    (B, 1, T, Nq + T); each text token sees every query and the text up to itself."""
    b, t = text_mask.shape
    causal = torch.ones(t, t, dtype=torch.bool, device=text_mask.device).tril()
    keep = torch.cat([causal.new_ones(t, num_query), causal], dim=1)[None] \
        & padding_mask(text_mask, num_query)[:, 0]
    return keep[:, None]
