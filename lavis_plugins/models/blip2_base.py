"""What the BLIP-2 stage-1 and stage-2 models share: tokenizer, frozen image encoder, Q-Former.

``LPBlip2Base`` keeps LAVIS's attribute (state-dict) names — ``visual_encoder``, ``ln_vision``,
``Qformer`` (``.bert``, ``.cls``), ``query_tokens`` — so LAVIS checkpoints load unchanged. Unlike
LAVIS's ``Blip2Base`` it downloads nothing: BERT and the image-encoder weights come from local
paths, and a missing or wrong file is a :class:`~lavis_plugins.common.errors.UserError`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import tempfile
import types
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from lavis.models import eva_vit
from lavis.models.base_model import BaseModel
from lavis.models.blip2_models.blip2 import disabled_train
from torch import Tensor, nn
from transformers import BertConfig, BertTokenizer, PreTrainedTokenizerBase

from lavis_plugins.common.errors import UserError
from lavis_plugins.common.local_files import local_hf_folder
from lavis_plugins.common.safe_load import load_weights, state_dict_of
from lavis_plugins.models._vit_resolution import forward_in_chunks
from lavis_plugins.models.qformer import KV, ImageKV, QFormer, padding_mask, qformer_config

logger = logging.getLogger(__name__)

# where LAVIS downloads the image-encoder weights from; we only name them in error messages
VIT_URLS = {
    "eva_clip_g": "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/"
                  "BLIP2/eva_vit_g.pth",
    "clip_L": "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/"
              "BLIP2/clip_vit_L.pth",
}
VIT_MODELS = ("eva_clip_g", "clip_L", "eva", "tiny")
# encoders built from the sizes in ``tiny_vit`` (EVA-style blocks, LAVIS's eva_vit module): "tiny"
# for tests and demos, "eva" for any size, e.g. the vision tower of a transformers BLIP-2 folder
SIZED_VIT_MODELS = ("eva", "tiny")
RANDOM_WEIGHTS = "random"  # vit_path value that builds the encoder untrained (benchmarks only)
TINY_BERT = "tiny"  # bert_path value that makes (once) and uses a tiny random BERT


@dataclass
class TinyVitConfig:
    """Sizes of an EVA-style ViT (LAVIS's ``eva_vit.VisionTransformer``, the blocks transformers'
    ``Blip2VisionModel`` also has): ``vit_model`` "tiny" (tests and demos, these defaults) or
    "eva" (any size; a transformers BLIP-2 folder sets them from its ``vision_config``)."""

    width: int = 32  # token width (= num_features, the Q-Former's vision_width)
    depth: int = 1  # transformer blocks
    heads: int = 2  # attention heads
    patch_size: int = 8  # pixels per patch side; image_size must be a multiple
    mlp_ratio: float = 2.0  # feed-forward width / token width (when mlp_dim is not set)
    mlp_dim: Optional[int] = None  # feed-forward width, exactly (transformers' intermediate_size)
    qkv_bias: bool = True  # query and value biases (EVA has no key bias)
    layer_norm_eps: float = 1e-6  # epsilon of the blocks' LayerNorms
    ln_vision_eps: float = 1e-5  # epsilon of ln_vision (LAVIS: 1e-5; transformers: layer_norm_eps)

    @classmethod
    def from_any(cls, value: Union["TinyVitConfig", Mapping[str, Any], None]) -> "TinyVitConfig":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        value = dict(value)
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"unknown tiny_vit key(s) {unknown}; accepted: "
                            f"{[f.name for f in fields(cls)]}")
        return cls(**value)


def resolve_bert_path(bert_path: str) -> str:
    """``bert_path`` as a local folder (a hub name only when already in the local hub cache:
    transformers would otherwise retry the hub for minutes), or for ``"tiny"`` a tiny random BERT
    made once in the cache folder (``$LAVIS_PLUGINS_CACHE`` or ``~/.cache/lavis_plugins``)."""
    if bert_path != TINY_BERT:
        return local_hf_folder(bert_path, "model.bert_path",
                               "a BERT (bert-base-uncased: config.json, vocab.txt, weights), or "
                               "use 'tiny' for a tiny random one")
    from lavis_plugins.common.tiny_bert import make_tiny_bert

    cache = Path(os.environ.get("LAVIS_PLUGINS_CACHE", Path.home() / ".cache" / "lavis_plugins"))
    folder = cache / "tiny-bert"
    if not (folder / "config.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        # made beside and renamed into place, so concurrent ranks never read a half-written one
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".tiny-bert-"))
        make_tiny_bert(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process won the race; theirs is identical (fixed seed)
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


@contextlib.contextmanager
def _lavis_vit_from_file(module: types.ModuleType, empty_path: str,
                         weights: Optional[Dict[str, Tensor]]):
    """Make LAVIS's ``create_*_vit_*`` build its encoder with ``weights`` (already loaded by us,
    weights-only) instead of downloading and unpickling a file itself: its own ``torch.load``
    gets ``empty_path`` (an empty state dict we wrote), and the state dict it then holds is
    filled with ``weights`` before it interpolates and loads it. Records which of the model's
    keys ``weights`` lacks (LAVIS loads with strict=False and would not say)."""
    report = {}
    original = module.interpolate_pos_embed

    def interpolate_and_check(model, state_dict, *args, **kwargs):
        state_dict.update(weights or {})  # the same dict LAVIS then loads into the model
        report["missing"] = sorted(set(model.state_dict()) - set(state_dict))
        report["unexpected"] = sorted(set(state_dict) - set(model.state_dict()))
        return original(model, state_dict, *args, **kwargs)

    saved = module.download_cached_file, module.interpolate_pos_embed
    module.download_cached_file = lambda url, *a, **k: empty_path
    module.interpolate_pos_embed = interpolate_and_check
    try:
        yield report
    finally:
        module.download_cached_file, module.interpolate_pos_embed = saved


class SdpaEvaAttention(eva_vit.Attention):
    """LAVIS's EVA ``Attention`` computed by ``F.scaled_dot_product_attention``.

    Same parameters and state-dict names, equal outputs and gradients within float rounding
    (tests/test_vit_attention.py); it never materialises the (B, heads, N, N) score matrix where
    a fused kernel is available (flash / memory-efficient on CUDA, flash on CPU), which is most of
    the frozen encoder's time outside its matrix products: the tiny 2 x 256 ViT's forward is 1.27x
    faster on one CPU thread. Installed on existing modules by :func:`use_sdpa_attention`.
    """

    def forward(self, x: Tensor, rel_pos_bias: Optional[Tensor] = None) -> Tensor:
        B, N, _ = x.shape
        qkv_bias = None
        if self.q_bias is not None:  # EVA has no key bias
            qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, qkv_bias)  # (B, N, 3 * heads * hd)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = None  # additive (heads, N, N) or (B, heads, N, N), as LAVIS adds it to the scores
        if self.relative_position_bias_table is not None:
            n = self.window_size[0] * self.window_size[1] + 1
            table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
            bias = table.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if rel_pos_bias is not None:
            bias = rel_pos_bias if bias is None else bias + rel_pos_bias
        if bias is not None:
            bias = bias.to(q.dtype)
        out = F.scaled_dot_product_attention(  # (B, heads, N, hd)
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0,
            scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, -1)))


def use_sdpa_attention(encoder: nn.Module, enabled: bool = True) -> int:
    """Switch every LAVIS EVA ``Attention`` in ``encoder`` to :class:`SdpaEvaAttention` in place
    (``enabled=False``: back to LAVIS's); weights are untouched. Returns how many were switched.
    CLIP ViT-L already uses torch's ``nn.MultiheadAttention``, which has its own fused path."""
    src, dst = ((eva_vit.Attention, SdpaEvaAttention) if enabled
                else (SdpaEvaAttention, eva_vit.Attention))
    n = 0
    for m in encoder.modules():
        if type(m) is src:
            m.__class__ = dst
            n += 1
    return n


def _cast_vit(model: nn.Module, precision: str) -> None:
    """Conv/Linear weights to half precision, as LAVIS's ``convert_weights_to_fp16`` does."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)


class LPBlip2Base(BaseModel):
    """Tokenizer, image encoder and Q-Former of BLIP-2, with LAVIS's attribute names.

    Subclasses set ``visual_encoder``, ``ln_vision``, ``Qformer`` and ``query_tokens`` (see the
    ``init_*`` class methods) and call :meth:`freeze_vision_encoder` when ``freeze_vit``.
    """

    _vit_frozen = False  # set by freeze_vision_encoder: encode_image runs the ViT without grad

    @classmethod
    def init_tokenizer(cls, bert_path: str) -> BertTokenizer:
        """BERT's WordPiece tokenizer plus the [DEC] bos token that starts ITG / captions."""
        path = resolve_bert_path(bert_path)
        try:
            tokenizer = BertTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:  # ValueError: not a folder nor a hub name
            raise UserError(f"bert_path {bert_path!r}: cannot load a BERT tokenizer from it ({e}). "
                            "Give a local folder holding a BERT (e.g. bert-base-uncased: "
                            "config.json, vocab.txt, weights), or 'tiny' for a tiny random one."
                            ) from e
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        return tokenizer

    @staticmethod
    def init_text_tokenizer(slow: BertTokenizer) -> PreTrainedTokenizerBase:
        """The tokenizer that encodes text for the Q-Former: BERT's fast one when it gives the
        ids ``slow`` gives (:func:`~lavis_plugins.models.text_tokens.fast_if_equal`), else
        ``slow``. ``slow`` stays the model's ``tokenizer`` (decoding, LAVIS callers)."""
        from transformers import BertTokenizerFast

        from lavis_plugins.models.text_tokens import fast_if_equal

        def make_fast() -> BertTokenizerFast:
            basic = slow.basic_tokenizer
            fast = BertTokenizerFast.from_pretrained(
                slow.name_or_path, do_lower_case=basic.do_lower_case,
                strip_accents=basic.strip_accents,
                tokenize_chinese_chars=basic.tokenize_chinese_chars)
            if slow.bos_token:
                fast.add_special_tokens({"bos_token": slow.bos_token})
            return fast

        return fast_if_equal(slow, make_fast)

    @classmethod
    def init_vision_encoder(
        cls,
        vit_model: str,
        img_size: int,
        drop_path_rate: float,
        use_grad_checkpoint: bool,
        precision: str,
        vit_path: Optional[str] = None,
        tiny: Union[TinyVitConfig, Mapping[str, Any], None] = None,
        sdpa: bool = True,
    ) -> Tuple[nn.Module, nn.Module]:
        """The image encoder and the LayerNorm on its output: ``(visual_encoder, ln_vision)``.

        Args:
            vit_model: "eva_clip_g" (EVA ViT-g/14, 1408 wide), "clip_L" (CLIP ViT-L/14, 1024) —
                both LAVIS's definitions — or "tiny" (:class:`TinyVitConfig`, random weights).
            img_size: input side in pixels (position embeddings are interpolated to it).
            drop_path_rate: stochastic depth (eva_clip_g and tiny).
            use_grad_checkpoint: recompute the ViT blocks in backward (unfrozen encoder).
            precision: "fp32", "fp16" or "bf16": dtype of the encoder's Conv/Linear weights
                (LAVIS's ``vit_precision``; half precision needs a GPU).
            vit_path: local weights file for eva_clip_g / clip_L (LAVIS's eva_vit_g.pth /
                clip_vit_L.pth), or "random" for untrained weights (benchmarks).
            tiny: sizes of the tiny encoder.
            sdpa: compute EVA attention with fused scaled-dot-product attention
                (:class:`SdpaEvaAttention`); False keeps LAVIS's own (tests, benchmarks).
        The encoder exposes ``num_features`` (its token width).
        """
        if vit_model not in VIT_MODELS:
            raise UserError(f"unknown vit_model {vit_model!r}; choose one of {list(VIT_MODELS)}")
        if precision not in ("fp32", "fp16", "bf16"):
            raise UserError(f"vit_precision {precision!r}: choose fp32, fp16 or bf16")
        if vit_model in SIZED_VIT_MODELS:
            encoder = cls._tiny_vit(TinyVitConfig.from_any(tiny), img_size, drop_path_rate,
                                    use_grad_checkpoint)
        else:
            encoder = cls._lavis_vit(vit_model, img_size, drop_path_rate, use_grad_checkpoint,
                                     vit_path)
        if sdpa:
            use_sdpa_attention(encoder)
        if precision != "fp32":
            _cast_vit(encoder, precision)
        eps = TinyVitConfig.from_any(tiny).ln_vision_eps if vit_model in SIZED_VIT_MODELS else 1e-5
        return encoder, nn.LayerNorm(encoder.num_features, eps=eps)

    @staticmethod
    def _tiny_vit(cfg: TinyVitConfig, img_size: int, drop_path_rate: float,
                  use_grad_checkpoint: bool) -> nn.Module:
        if img_size % cfg.patch_size:
            raise UserError(f"image_size {img_size} is not a multiple of tiny_vit.patch_size "
                            f"{cfg.patch_size}")
        # eva_vit sizes the feed-forward as int(width * mlp_ratio): a ratio just above the exact
        # one gives mlp_dim whatever the float rounding
        ratio = cfg.mlp_ratio if cfg.mlp_dim is None else (cfg.mlp_dim + 0.5) / cfg.width
        return eva_vit.VisionTransformer(
            img_size=img_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
            num_heads=cfg.heads, mlp_ratio=ratio, qkv_bias=cfg.qkv_bias,
            drop_path_rate=drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps),
            use_checkpoint=use_grad_checkpoint)

    @staticmethod
    def _lavis_vit(vit_model: str, img_size: int, drop_path_rate: float,
                   use_grad_checkpoint: bool, vit_path: Optional[str]) -> nn.Module:
        from lavis.models import clip_vit

        if vit_path is None:
            raise UserError(
                f"vit_path is not set for vit_model {vit_model!r}: download {VIT_URLS[vit_model]} "
                "and set model.vit_path to the local file (or 'random' for untrained weights, "
                "benchmarks only)")
        random = vit_path == RANDOM_WEIGHTS
        if not random and not os.path.isfile(vit_path):
            raise UserError(f"vit_path {vit_path!r} for {vit_model!r} is not a file; download "
                            f"{VIT_URLS[vit_model]}")
        # read by us, weights-only (LAVIS's builders would torch.load it with full unpickling)
        weights = None if random else state_dict_of(load_weights(vit_path, "model.vit_path"),
                                                    vit_path, "model.vit_path")
        with contextlib.ExitStack() as stack:
            # LAVIS's builders always load a file: give them an empty state dict of our own
            empty = stack.enter_context(tempfile.TemporaryDirectory()) + "/empty.pth"
            torch.save({}, empty)
            module = eva_vit if vit_model == "eva_clip_g" else clip_vit
            report = stack.enter_context(_lavis_vit_from_file(module, empty, weights))
            if vit_model == "eva_clip_g":
                encoder = eva_vit.create_eva_vit_g(img_size, drop_path_rate, use_grad_checkpoint,
                                                   "fp32")
            else:
                encoder = clip_vit.create_clip_vit_L(img_size, use_grad_checkpoint, "fp32")
        if random:
            logger.warning("%s built with RANDOM weights (vit_path='random')", vit_model)
        elif report.get("missing"):
            raise UserError(
                f"vit_path {vit_path!r} is not a {vit_model} checkpoint: it lacks "
                f"{len(report['missing'])} of the encoder's weights (e.g. {report['missing'][:3]})")
        elif report.get("unexpected"):
            logger.info("vit_path %s: ignored %d unused keys", vit_path, len(report["unexpected"]))
        return encoder

    @classmethod
    def init_qformer(
        cls, bert_path: str, num_query_token: int, vision_width: int, cross_attention_freq: int = 2,
        bert_config: Optional[BertConfig] = None,
    ) -> Tuple[QFormer, nn.Parameter]:
        """A Q-Former initialised from the BERT at ``bert_path`` and its learned queries
        (1, num_query_token, hidden) ~ N(0, initializer_range), as LAVIS's ``init_Qformer``.
        With ``bert_config`` (the sizes of a checkpoint that brings every weight, e.g. a
        transformers folder) it is built at those sizes, randomly initialised, and
        ``bert_path`` is not read."""
        if bert_config is not None:
            qformer = QFormer(qformer_config(bert_config, num_query_token, vision_width,
                                             cross_attention_freq))
        else:
            path = resolve_bert_path(bert_path)
            try:
                qformer = QFormer.from_bert(path, num_query_token, vision_width,
                                            cross_attention_freq)
            except (OSError, ValueError) as e:  # ValueError: not a folder nor a hub name
                raise UserError(f"bert_path {bert_path!r}: cannot load BERT weights from it ({e})"
                                ) from e
        query_tokens = nn.Parameter(torch.zeros(1, num_query_token, qformer.config.hidden_size))
        query_tokens.data.normal_(mean=0.0, std=qformer.config.initializer_range)
        return qformer, query_tokens

    def cast_vision_encoder(self, precision: str) -> None:
        """Cast the image encoder's Conv/Linear weights to ``precision`` (``vit_precision``) and
        record it in ``cfg``. ``from_config`` builds in fp32, loads every checkpoint, then calls
        this, so weights are rounded once, from the file's values (loading into fp16 weights
        would round them for good, also for a later ``.float()`` on the CPU)."""
        if precision not in ("fp32", "fp16", "bf16"):
            raise UserError(f"vit_precision {precision!r}: choose fp32, fp16 or bf16")
        if precision != "fp32":
            _cast_vit(self.visual_encoder, precision)
        if dataclasses.is_dataclass(getattr(self, "cfg", None)):
            self.cfg = dataclasses.replace(self.cfg, vit_precision=precision)

    def save_pretrained(self, folder: Union[str, Path]) -> Path:
        """Write a transformers folder (config.json, model.safetensors, processor and
        tokenizer files) that transformers' own BLIP-2 class loads; see
        :func:`lavis_plugins.models.export.save_transformers`."""
        from lavis_plugins.models.export import save_transformers

        return save_transformers(self, folder)

    def save_lavis(self, path: Union[str, Path]) -> Path:
        """Write a LAVIS ``.pth`` (``{"model": state_dict}``) that LAVIS's classes load."""
        from lavis_plugins.models.export import save_lavis

        return save_lavis(self, path)

    def vit_setting(self) -> str:
        """The config key that sizes this model's image encoder (for error messages)."""
        cfg = getattr(self, "cfg", None)
        return "tiny_vit" if getattr(cfg, "vit_model", None) in SIZED_VIT_MODELS else "vit_model"

    def freeze_vision_encoder(self) -> None:
        """LAVIS's ``freeze_vit``: no gradients, eval mode for good (``train()`` does nothing)."""
        for p in self.visual_encoder.parameters():
            p.requires_grad = False
        self.visual_encoder.eval()
        # a partial, not a bound method, so that the model still pickles
        self.visual_encoder.train = partial(disabled_train, self.visual_encoder)
        self._vit_frozen = True
        logger.info("freeze vision encoder")

    def maybe_autocast(self, dtype: torch.dtype = torch.float16):
        """LAVIS's ``Blip2Base.maybe_autocast``: autocast to ``dtype`` on CUDA, nothing on the
        CPU. Kept under LAVIS's name so client code written for LAVIS's BLIP-2 ports unchanged."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype)

    def encode_image(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) -> image features (B, N, vision_width), ``ln_vision`` applied, in
        ``ln_vision``'s dtype (fp32 unless the whole model was cast)."""
        return self.norm_vit_features(self.vit_features(image))

    def norm_vit_features(self, feats: Tensor) -> Tensor:
        """``ln_vision`` on the image encoder's raw output (B, N, Dv) (``vit_features``)."""
        return self.ln_vision(feats.to(self.ln_vision.weight.dtype))

    def vit_features(self, image: Tensor) -> Tensor:
        """(B, 3, S, S) -> the image encoder's raw output (B, N, vision_width), before
        ``ln_vision`` (models that share one frozen encoder, e.g. a frame selector, each apply
        their own ``ln_vision`` to it).

        A frozen encoder runs without autograd. Half-precision encoder weights run under CUDA
        autocast of their dtype; on the CPU the encoder must be fp32 (``vit_precision: fp32``).
        """
        # the Conv/Linear weights carry vit_precision (norms and embeddings stay fp32, as LAVIS)
        weight_dtype = next(m.weight.dtype for m in self.visual_encoder.modules()
                            if isinstance(m, (nn.Conv2d, nn.Linear)))
        if weight_dtype not in (torch.float16, torch.bfloat16):
            cast = contextlib.nullcontext()
        elif image.is_cuda:
            cast = torch.autocast("cuda", dtype=weight_dtype)
        else:
            raise UserError(f"the image encoder holds {weight_dtype} weights, which need a GPU; "
                            "set model.vit_precision: fp32 to run on the CPU")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._vit_frozen), cast:
            # another side than the built one (frame selection's cheap scoring): position
            # embeddings interpolated; the built side runs the encoder's own forward. Frozen on
            # the CPU: a few images per call (cache-sized activations, same outputs)
            return forward_in_chunks(self.visual_encoder, image.to(weight_dtype))

    def encode_samples(self, samples: Mapping[str, Any]) -> Tensor:
        """Image features (B, N, Dv) of a batch: from ``samples["image_embeds"]`` — the frozen
        encoder's outputs read from a feature cache (``lavis_plugins.common.feature_cache``),
        ``ln_vision`` still to apply — when the batch has them, else by running the encoder on
        ``samples["image"]``."""
        cached = samples.get("image_embeds")
        if cached is None:
            return self.encode_image(samples["image"])
        if not self._vit_frozen:
            raise UserError("the batch holds cached image-encoder features, but the encoder is "
                            "being trained (freeze_vit: false); train from images instead")
        return self.ln_vision(cached.to(self.device, self.ln_vision.weight.dtype))

    def query_kv_pass(self, image_embeds: Tensor, image_kv: Optional[ImageKV] = None
                      ) -> Tuple[Tensor, List[KV]]:
        """Queries through the Q-Former over ``image_embeds`` (B, N, Dv): their last hidden state
        (B, Nq, D) and per layer their self-attention (keys, values), for later text passes.
        ``image_kv`` (from ``Qformer.bert.image_kv``) saves recomputing the image keys/values."""
        if image_kv is None:  # one pass of the queries: fold where that is cheaper
            image_kv = self.Qformer.bert.image_kv(image_embeds, self.query_tokens.shape[1])
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.Qformer.bert(query_embeds=queries, image_kv=image_kv)

    def query_output(self, image_embeds: Tensor) -> Tensor:
        """(B, N, Dv) image features -> (B, Nq, D) last hidden state of the queries."""
        return self.query_kv_pass(image_embeds)[0]

    def query_text_output(self, image_embeds: Tensor, text_ids: Tensor, text_atts: Tensor,
                          image_kv: Optional[ImageKV] = None) -> Tensor:
        """Query outputs (B, Nq, D) of the image-grounded pass over [queries; text]: queries and
        text (B, T) see each other in self-attention, queries cross-attend to the image features
        (B, N, Dv) (or to ``image_kv``, e.g. one image's keys/values with ``repeats`` = B). Stage
        1's ITM pass, and stage 2's question-aware Q-Former (``qformer_text_input``)."""
        num_query = self.query_tokens.shape[1]
        hidden, _ = self.Qformer.bert(
            input_ids=text_ids, query_embeds=self.query_tokens.expand(text_ids.shape[0], -1, -1),
            attention_mask=padding_mask(text_atts, num_query),
            image_kv=(self.Qformer.bert.image_kv(image_embeds, num_query) if image_kv is None
                      else image_kv),
            last_rows=num_query)
        return hidden

    # ------------------------------------------------------------------ optimisation
    def optimizer_param_groups(self, weight_decay: float, layer_decay: float = 1.0
                               ) -> Optional[List[Dict[str, Any]]]:
        """Param groups with weight decay off for biases/norms; with an unfrozen ViT and
        ``layer_decay`` < 1, ViT block i gets lr scale ``layer_decay ** (depth + 1 - (i + 1))``
        (patch/pos embeddings: layer 0); Q-Former and projection keep scale 1."""
        from lavis_plugins.common.optim import layerwise_lr_scale

        depth = len(getattr(self.visual_encoder, "blocks", []))
        groups: Dict[Tuple[float, float], List[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            wd = 0.0 if (p.ndim < 2 or "bias" in name or "norm" in name.lower()
                         or name.startswith("ln_") or name == "query_tokens") else weight_decay
            scale = 1.0
            if name.startswith("visual_encoder.") and layer_decay < 1.0 and depth:
                m = re.match(r"visual_encoder\.blocks\.(\d+)\.", name)
                layer = int(m.group(1)) + 1 if m else 0
                scale = layerwise_lr_scale(depth, layer, layer_decay)
            groups.setdefault((wd, scale), []).append(p)
        return [{"params": ps, "weight_decay": wd, "lr_scale": scale}
                for (wd, scale), ps in groups.items()]
