"""BLIP-2 stage 1: Q-Former representation learning with ITC, ITM and ITG on a frozen image encoder.

Registered as ``lp_blip2_qformer``. Same losses, masks and checkpoints as LAVIS's ``Blip2Qformer``
(``blip2`` / ``blip2_feature_extractor``), proven equal in ``tests/test_stage1_parity.py``, and
faster (``benchmarks/bench_stage1.py``) because it

- pads each batch's text to its longest caption, not to ``max_txt_len`` (padding is masked out
  of every attention and loss, so the results are the same);
- projects each image's features to cross-attention keys/values once per layer, shared by the
  ITC query pass and the 3 ITM copies (LAVIS projects 4 copies);
- uses fused attention, samples all hard negatives in one call, and runs the LM head only on
  tokens that have a next-token label.

It needs no process group; under one, features are gathered with gradients, so N processes with
batch B compute the ITC loss and gradients of 1 process with batch N*B (LAVIS detaches the
gathered features). Captions longer than ``max_txt_len`` tokens are truncated; an empty caption
is a ``UserError`` naming the sample.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from lavis.common import dist_utils
from lavis.common.registry import registry
from lavis.models.base_model import all_gather_with_grad, concat_all_gather
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from transformers import BatchEncoding, BertConfig
from transformers.modeling_outputs import ModelOutput

from lavis_plugins.common.errors import UserError
from lavis_plugins.common.local_files import check_checkpoint_source
from lavis_plugins.models._qformer_checkpoint import QformerCheckpointMixin
from lavis_plugins.models._qformer_features import QformerFeaturesMixin
from lavis_plugins.models._qformer_generation import QformerGenerationMixin
from lavis_plugins.models.blip2_base import LPBlip2Base, TinyVitConfig, resolve_bert_path
from lavis_plugins.models.compile import compile_kwargs
from lavis_plugins.models.itm_negatives import (ITM_NEGATIVES, check_itm_options, draw_negatives,
                                               hard_share, itm_loss, mix_weights)
from lavis_plugins.models.momentum import Teacher, momentum_targets, ramped_alpha
from lavis_plugins.models.qformer import KV, ImageKV, causal_text_mask, padding_mask
from lavis_plugins.models.stage1_losses import IGNORE, cyclip_losses, distill_cross_entropy
from lavis_plugins.models.text_tokens import to_device
from lavis_plugins.paths import config_path

logger = logging.getLogger(__name__)

# the keys ``pretokenize`` adds to a batch: caption ids and attention mask (B, T)
PRETOKENIZED = ("text_input_ids", "text_attention_mask")


@dataclass
class Blip2QformerConfig:
    """Every setting of the stage-1 model (each default is written here only)."""

    # BERT folder (or a name in the HF cache) for the Q-Former and tokenizer; "tiny": a tiny
    # random BERT made once in the cache folder
    bert_path: str = "bert-base-uncased"
    vit_model: str = "eva_clip_g"  # image encoder: eva_clip_g | clip_L | eva (sized) | tiny
    # local weights file of eva_clip_g / clip_L; "random": untrained (benchmarks only)
    vit_path: Optional[str] = None
    image_size: int = 224  # input side in pixels
    drop_path_rate: float = 0.0  # stochastic depth of the image encoder
    use_grad_checkpoint: bool = False  # image-encoder gradient checkpointing (unfrozen encoder)
    vit_precision: str = "fp16"  # fp32 | fp16 | bf16 encoder Conv/Linear weights (half: GPU)
    freeze_vit: bool = True  # image encoder gets no gradients and stays in eval mode
    tiny_vit: TinyVitConfig = field(default_factory=TinyVitConfig)  # sizes for "tiny" / "eva"
    num_query_token: int = 32  # learned queries
    cross_attention_freq: int = 2  # Q-Former layers 0, f, 2f, ... cross-attend to the image
    embed_dim: int = 256  # width of the ITC projections (vision_proj, text_proj)
    max_txt_len: int = 32  # text tokens kept, [CLS] and [SEP] included; longer is truncated
    qformer_grad_checkpoint: bool = False  # recompute Q-Former layers in backward (less memory)
    load_pretrained: bool = False  # after building, load `pretrained`
    pretrained: str = ""  # local LAVIS-format .pth ({"model": state_dict} or a state dict)
    load_finetuned: bool = False  # after building, load `finetuned` (instead of `pretrained`)
    finetuned: str = ""  # local LAVIS-format .pth
    # options from the survey (README "Stage-1 options"), off by default; paper defaults
    cyclip: bool = False  # add CyCLIP's cyclic consistency terms to the loss
    cyclip_inmodal_weight: float = 0.25  # CyCLIP's lambda_1: image-image vs text-text
    cyclip_crossmodal_weight: float = 0.25  # CyCLIP's lambda_2: image-text vs text-image
    momentum_distill: bool = False  # ALBEF: ITC and ITG targets mixed with an EMA model's
    momentum: float = 0.995  # EMA factor of the momentum model (ALBEF's)
    distill_alpha: float = 0.4  # weight of the momentum targets, ramped up over the 1st epoch
    # ITM negatives: "hard" draws them from the softmaxed ITC similarities (BLIP-2, LAVIS);
    # "mixed" half from those, half uniformly from the batch; "random" uniformly; "curriculum"
    # from random to hard over itm_curriculum_epochs (models/itm_negatives.py). A tiny Q-Former
    # trained from scratch learns no ITM on hard negatives alone (README "ITM negatives")
    itm_negatives: str = "hard"
    itm_curriculum_epochs: float = 3.0  # "curriculum": epochs until every negative is hard
    # negative texts per image and negative images per text, distinct, each weighted 1/N in the
    # loss (models/itm_negatives.py); 1 is BLIP-2's
    itm_negatives_per_positive: int = 1
    # weight of loss_itm in the stage-1 loss (ITC and ITG keep 1); 1 is BLIP-2's. > 1 gives the
    # cross-encoder a larger share of the shared Q-Former's gradient (docs/capfilt_demo.md)
    itm_loss_weight: float = 1.0

    ITM_NEGATIVES = ITM_NEGATIVES
    # keys of a LAVIS model config that are bookkeeping, not settings
    LAVIS_KEYS = ("arch", "model_type")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "Blip2QformerConfig":
        """From a LAVIS ``model:`` config; an unknown key is a ``UserError`` naming it."""
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        values = {k: v for k, v in dict(cfg).items() if k not in cls.LAVIS_KEYS}
        accepted = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(accepted))
        if unknown:
            raise UserError(f"lp_blip2_qformer: unknown model config key(s) {unknown}. "
                            f"Accepted: {accepted + list(cls.LAVIS_KEYS)}")
        if "tiny_vit" in values:
            values["tiny_vit"] = TinyVitConfig.from_any(values["tiny_vit"])
        return cls(**values)

    def check_options(self) -> None:
        """The survey options' values; a bad one is a ``UserError`` naming the key."""
        check_itm_options(self)
        for key in ("cyclip", "momentum_distill"):
            if not isinstance(getattr(self, key), bool):
                raise UserError(f"lp_blip2_qformer: {key} must be true or false, got "
                                f"{getattr(self, key)!r}")
        ranges = {"cyclip_inmodal_weight": (0.0, None), "cyclip_crossmodal_weight": (0.0, None),
                  "momentum": (0.0, 1.0), "distill_alpha": (0.0, 1.0)}
        for key, (lo, hi) in ranges.items():
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo or (
                    hi is not None and v > hi) or (key == "momentum" and v >= 1.0):
                raise UserError(f"lp_blip2_qformer: {key} = {v!r} is out of range: it must be a "
                                f"number >= {lo}" + (f" and {'<' if key == 'momentum' else '<='}"
                                                     f" {hi}" if hi is not None else ""))


@dataclass
class Blip2Stage1Output(ModelOutput):
    """Stage-1 training step: scalars (accuracies are detached, for logging)."""

    loss: Optional[Tensor] = None  # loss_itc + itm_loss_weight * loss_itm + loss_itg
    loss_itc: Optional[Tensor] = None  # image-text contrastive
    # image-text matching (1 positive, 2N hard negatives per pair), before itm_loss_weight
    loss_itm: Optional[Tensor] = None
    loss_itg: Optional[Tensor] = None  # image-grounded text generation (LAVIS's loss_lm)
    # option cyclip: CyCLIP's terms (unweighted; the loss adds them times their weights)
    loss_cyclip_inmodal: Optional[Tensor] = None
    loss_cyclip_crossmodal: Optional[Tensor] = None
    acc_itc: Optional[Tensor] = None  # image->text top-1 over the (global) batch
    acc_itm: Optional[Tensor] = None  # matched / not matched, over the (1+2N)B ITM pairs

    @property
    def loss_lm(self) -> Optional[Tensor]:
        """LAVIS's name of ``loss_itg`` (an attribute, not a key: the runner logs each loss
        once)."""
        return self.loss_itg


class Tokens(NamedTuple):
    """Caption ids and attention mask (B, T) (what the losses read of a ``BatchEncoding``)."""

    input_ids: Tensor
    attention_mask: Tensor


class ItcResult(NamedTuple):
    loss: Tensor
    sim_i2t: Tensor  # (B, W*B) local images vs all texts, divided by the temperature
    sim_t2i: Tensor  # (B, W*B) local texts vs all images
    acc: Tensor
    cos_i2t: Tensor  # (B, W*B) sim_i2t before the temperature (cosine, max over queries)
    cos_t2i: Tensor  # (B, W*B)
    image_feats_all: Tensor  # (W*B, Nq, E) every rank's normalised query features
    text_feat_all: Tensor  # (W*B, E) every rank's normalised text features


def _gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated on dim 0, gradients flowing back to their owners."""
    return x if dist_utils.get_world_size() == 1 else all_gather_with_grad(x)


def _pad_right(ids: Tensor, length: int, value: int) -> Tensor:
    return F.pad(ids, (0, length - ids.shape[1]), value=value)


def init_vision_and_qformer(model: LPBlip2Base, cfg: Any,
                            bert_config: Optional[BertConfig] = None) -> None:
    """Set ``model.visual_encoder`` and ``ln_vision`` (frozen when ``cfg.freeze_vit``), then
    ``model.Qformer`` and ``query_tokens``, from the settings both BLIP-2 stages name alike
    (``Blip2QformerConfig``, ``Blip2LLMConfig``): vit_model, image_size, drop_path_rate,
    use_grad_checkpoint, vit_precision, vit_path, tiny_vit, freeze_vit, bert_path,
    num_query_token, cross_attention_freq. ``bert_config``: build the Q-Former at these sizes
    instead of from ``bert_path`` (the checkpoint brings its weights)."""
    model.visual_encoder, model.ln_vision = model.init_vision_encoder(
        cfg.vit_model, cfg.image_size, cfg.drop_path_rate, cfg.use_grad_checkpoint,
        cfg.vit_precision, vit_path=cfg.vit_path, tiny=cfg.tiny_vit)
    if cfg.freeze_vit:
        model.freeze_vision_encoder()
    model.Qformer, model.query_tokens = model.init_qformer(
        cfg.bert_path, cfg.num_query_token, model.visual_encoder.num_features,
        cfg.cross_attention_freq, bert_config=bert_config)


@registry.register_model("lp_blip2_qformer")
class LPBlip2Qformer(QformerFeaturesMixin, QformerGenerationMixin, QformerCheckpointMixin,
                     LPBlip2Base):
    """BLIP-2 first stage: frozen image encoder + Q-Former trained with ITC, ITM and ITG.

    Model types: "pretrain" (EVA ViT-g), "pretrain_vitL" (CLIP ViT-L), "coco" (retrieval
    fine-tuning, 364 px, unfrozen encoder) and "tiny" (tests and demos). Weights are local files:
    ``vit_path`` for the encoder, ``pretrained`` / ``finetuned`` for LAVIS checkpoints.
    Inference (features, ITM, retrieval), captioning and checkpoint loading live in the mixins
    of ``_qformer_features``, ``_qformer_generation`` and ``_qformer_checkpoint``.
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        "pretrain": config_path("models/lp_blip2_qformer_pretrain.yaml"),
        "pretrain_vitL": config_path("models/lp_blip2_qformer_pretrain_vitL.yaml"),
        "coco": config_path("models/lp_blip2_qformer_coco.yaml"),
        "tiny": config_path("models/lp_blip2_qformer_tiny.yaml"),
    }
    CONFIG_CLASS = Blip2QformerConfig
    # weights a stage-1 checkpoint must hold (the image encoder may come from vit_path)
    TRAINED_PREFIXES = ("Qformer.", "query_tokens", "ln_vision.", "vision_proj.", "text_proj.",
                        "itm_head.", "temp")

    def __init__(self, cfg: Optional[Blip2QformerConfig] = None, hf_folder: Optional[str] = None):
        """``hf_folder``: a transformers BLIP-2 folder whose weights will be loaded (``cfg``
        already at its sizes, see ``from_config``): the Q-Former is built at its sizes and the
        tokenizer read from it (else from a local ``bert_path``)."""
        super().__init__()
        cfg = cfg or Blip2QformerConfig()
        self.cfg = cfg
        bert_config = None
        if hf_folder is None:
            self.tokenizer = self.init_tokenizer(cfg.bert_path)
        else:
            from lavis_plugins.models import hf_format

            bert_config = hf_format.qformer_bert_config(
                hf_format.read_config(hf_folder)["qformer_config"])
            self.tokenizer = self.init_tokenizer(hf_format.folder_tokenizer(
                hf_folder, hf_format.BERT_TOKENIZER_FILES, lambda: resolve_bert_path(cfg.bert_path),
                "BERT tokenizer for the Q-Former", "bert_path"))
        self.text_tokenizer = self.init_text_tokenizer(self.tokenizer)
        # an int, read once: the tokenizer's property is a graph break under torch.compile
        self.dec_token_id: int = self.tokenizer.bos_token_id
        init_vision_and_qformer(self, cfg, bert_config)
        # room for [DEC] (transformers' resize, as LAVIS calls it)
        self.Qformer.resize_token_embeddings(len(self.tokenizer))
        self.Qformer.bert.gradient_checkpointing = cfg.qformer_grad_checkpoint
        d = self.Qformer.config.hidden_size
        self.vision_proj = nn.Linear(d, cfg.embed_dim)
        self.text_proj = nn.Linear(d, cfg.embed_dim)
        self.itm_head = nn.Linear(d, 2)
        self.temp = nn.Parameter(0.07 * torch.ones([]))
        self.max_txt_len = cfg.max_txt_len
        cfg.check_options()
        if cfg.momentum_distill:
            from torch.nn.parallel import DistributedDataParallel as DDP

            from lavis_plugins.models.momentum import MomentumModel

            self.momentum_model = MomentumModel(self, cfg.momentum)
            # each rank updates its EMA copy identically: DDP need not broadcast it every step
            DDP._set_params_and_buffers_to_ignore_for_model(
                self, self.momentum_model.buffer_names("momentum_model"))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "LPBlip2Qformer":
        """Build from a LAVIS model config and load its ``pretrained`` / ``finetuned``: a LAVIS
        ``.pth``, or a transformers BLIP-2 folder (``Blip2ForImageTextRetrieval``,
        ``Blip2Model``), whose config.json then sets every size."""
        from lavis_plugins.models import hf_format

        mcfg = Blip2QformerConfig.from_mapping(cfg)
        for flag, key in (("load_finetuned", "finetuned"), ("load_pretrained", "pretrained")):
            if getattr(mcfg, flag):  # refused before the encoder is built: seconds, not minutes
                check_checkpoint_source(getattr(mcfg, key), key)
        folder = hf_format.checkpoint_folder(cfg)
        # built in fp32 and cast after loading (see cast_vision_encoder)
        if folder is None:
            model = cls(dataclasses.replace(mcfg, vit_precision="fp32"))
            model.load_checkpoint_from_config(cfg)
        else:
            mcfg = hf_format.apply_folder_sizes(mcfg, folder)
            model = cls(dataclasses.replace(mcfg, vit_precision="fp32"), hf_folder=folder)
            hf_format.load_stage1_folder(model, folder)
        model.cast_vision_encoder(mcfg.vit_precision)
        return model

    @property
    def num_query(self) -> int:
        return self.query_tokens.shape[1]

    # ------------------------------------------------------------------ inputs
    def tokenize(self, texts: Sequence[str], samples: Optional[Mapping[str, Any]] = None,
                 truncate: bool = True):
        """Captions -> ``BatchEncoding`` (input_ids, attention_mask) (B, T) on the model's device,
        padded to the longest caption and (``truncate``) truncated to ``max_txt_len`` tokens;
        without truncation, longer than the Q-Former's position embeddings is a ``UserError``.
        With ``truncate``, ids already in ``samples`` (``pretokenize``, done by the data loader)
        are used as they are."""
        if truncate and samples is not None and PRETOKENIZED[0] in samples:
            return BatchEncoding({"input_ids": samples[PRETOKENIZED[0]],
                                  "attention_mask": samples[PRETOKENIZED[1]]}).to(self.device)
        return to_device(self._encode(texts, samples, truncate), self.device)

    def _encode(self, texts: Sequence[str], samples: Optional[Mapping[str, Any]],
                truncate: bool) -> BatchEncoding:
        """``tokenize`` on the CPU (the captions checked first)."""
        if isinstance(texts, str):  # one caption, as LAVIS's tokenizer call accepts
            texts = [texts]
        if not isinstance(texts, Sequence):
            raise UserError(f"text_input must be a caption or a list of captions, got "
                            f"{type(texts).__name__}")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                ident = "".join(f", {k}={samples[k][i]!r}" for k in ("image_id", "instance_id")
                                if samples is not None and k in samples)
                raise UserError(f"sample {i} of the batch{ident} has an empty or non-text caption "
                                f"({t!r}); fix or drop it in the annotation file")
        if truncate:
            return self.text_tokenizer(list(texts), padding="longest", truncation=True,
                                       max_length=self.max_txt_len, return_tensors="pt")
        enc = self.text_tokenizer(list(texts), padding="longest", return_tensors="pt")
        limit = self.Qformer.config.max_position_embeddings
        if enc.input_ids.shape[1] > limit:
            raise UserError(f"a text of {enc.input_ids.shape[1]} tokens is longer than the "
                            f"Q-Former's {limit} position embeddings; shorten it")
        return enc

    def pretokenize(self, samples: Mapping[str, Any]) -> Dict[str, Tensor]:
        """The training batch's caption ids and mask (B, T) on the CPU, for the data loader's
        collate (see :mod:`~lavis_plugins.models.text_tokens`); ``forward`` then uses them."""
        enc = self._encode(samples["text_input"], samples, truncate=True)
        return dict(zip(PRETOKENIZED, (enc.input_ids, enc.attention_mask)))

    # ------------------------------------------------------------------ training
    def forward(self, samples: Mapping[str, Any], match_head: Optional[str] = None
                ) -> Blip2Stage1Output:
        """samples: "image" (B, 3, H, W) or cached encoder outputs "image_embeds" (B, N, Dv),
        and "text_input" (B captions).

        ``match_head`` "itm" / "itc" scores the pairs instead of training, as LAVIS's
        ``blip2_image_text_matching`` does (see :func:`~lavis_plugins.models.blip2_lavis_compat.
        match_pairs`): (B, 2) matching logits / (B, 1) contrastive similarities.
        """
        if match_head is not None:
            from lavis_plugins.models.blip2_lavis_compat import match_pairs

            return match_pairs(self, samples, match_head)
        text = self.tokenize(samples["text_input"], samples)
        image_embeds = self.encode_samples(samples)  # (B, N, Dv)
        if text.input_ids.shape[0] != image_embeds.shape[0]:
            raise UserError(f"{image_embeds.shape[0]} images but {text.input_ids.shape[0]} "
                            "captions in the batch")
        alpha = None  # ALBEF's distillation weight, ramped by the batch's place in the epoch
        if self.cfg.momentum_distill and self.training:
            alpha = ramped_alpha(self.cfg.distill_alpha, samples, image_embeds.device)
        share = hard_share(self.cfg.itm_negatives, samples, self.cfg.itm_curriculum_epochs,
                           image_embeds.device)
        return self._train_losses(image_embeds, text.input_ids, text.attention_mask, alpha,
                                  share)

    def _train_losses(self, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor,
                      alpha: Optional[Tensor], itm_share: Optional[Tensor] = None
                      ) -> Blip2Stage1Output:
        """The Q-Former step: every loss from image features (B, N, Dv) and caption ids and mask
        (B, T); ``itm_share``: 0-dim share of hard ITM negatives (None: all hard). Tensors in,
        tensors out, no host reads: ``compile_for_training`` compiles it whole (one graph)."""
        text = Tokens(input_ids, attention_mask)
        image_kv = self.Qformer.bert.image_kv(image_embeds)  # shared by the ITC and ITM passes
        query_hidden, query_kv = self.query_kv_pass(image_embeds, image_kv)  # (B, Nq, D)
        text_hidden, _ = self.Qformer.bert(  # ITC needs only [CLS]
            input_ids=text.input_ids, attention_mask=padding_mask(text.attention_mask),
            last_rows=1)
        image_feats = F.normalize(self.vision_proj(query_hidden), dim=-1)  # (B, Nq, E)
        text_feat = F.normalize(self.text_proj(text_hidden[:, 0]), dim=-1)  # (B, E) from [CLS]

        teacher = None
        if alpha is not None:
            teacher = momentum_targets(self, image_embeds, text, alpha)
        itc = self._itc_loss(image_feats, text_feat, teacher)
        loss_itm, acc_itm = self._itm_loss(image_embeds, image_kv, text, itc.sim_i2t, itc.sim_t2i,
                                           itm_share)
        loss_itg = self._itg_loss(text, query_kv, teacher)
        # weight 1 is BLIP-2's sum bit for bit (x * 1.0 == x, and so is its gradient)
        loss, cyclic = itc.loss + self.cfg.itm_loss_weight * loss_itm + loss_itg, {}
        if self.cfg.cyclip:
            inmodal, cross = cyclip_losses(itc.cos_i2t, itc.cos_t2i, image_feats,
                                           itc.image_feats_all, text_feat, itc.text_feat_all)
            loss = (loss + self.cfg.cyclip_inmodal_weight * inmodal
                    + self.cfg.cyclip_crossmodal_weight * cross)
            cyclic = {"loss_cyclip_inmodal": inmodal, "loss_cyclip_crossmodal": cross}
        # every field at construction: a ModelOutput drops fields set later from its items()
        return Blip2Stage1Output(loss=loss, loss_itc=itc.loss, loss_itm=loss_itm,
                                 loss_itg=loss_itg, acc_itc=itc.acc, acc_itm=acc_itm, **cyclic)

    def compile_for_training(self, backend: str = "inductor") -> None:
        """``run.compile: true``: ``torch.compile`` the frozen image encoder (fixed shapes) and
        the Q-Former step :meth:`_train_losses` (dynamic shapes: captions vary in length, and
        one graph serves them all). In place: parameter names and checkpoints are unchanged."""
        if self._vit_frozen:
            self.visual_encoder.compile(**compile_kwargs(False, backend))
        self._train_losses = torch.compile(self._train_losses, **compile_kwargs(True, backend))

    def _itc_loss(self, image_feats: Tensor, text_feat: Tensor,
                  teacher: Optional[Teacher] = None) -> ItcResult:
        """Contrastive loss between the queries (B, Nq, E) and text [CLS] (B, E) of this rank and
        those of all ranks; image-text similarity is the max over the queries. With a
        ``teacher``, the targets are mixed with its soft similarities (ALBEF)."""
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)  # as LAVIS's BLIP models; 0.07 at init
        rank, b = dist_utils.get_rank(), text_feat.shape[0]
        image_feats_all = _gather_with_grad(image_feats)  # (W*B, Nq, E)
        text_feat_all = _gather_with_grad(text_feat)  # (W*B, E)
        cos_i2t = (image_feats @ text_feat_all.t()).max(dim=1).values  # (B, W*B)
        cos_t2i = (image_feats_all @ text_feat.t()).max(dim=1).values.t()  # (B, W*B)
        sim_i2t, sim_t2i = cos_i2t / self.temp, cos_t2i / self.temp
        targets = torch.arange(rank * b, rank * b + b, device=text_feat.device)
        if teacher is None:
            loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
                    + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2
        else:
            loss = (distill_cross_entropy(sim_i2t, targets, teacher.i2t, teacher.alpha, 0.1)
                    + distill_cross_entropy(sim_t2i, targets, teacher.t2i, teacher.alpha, 0.1)
                    ) / 2
        acc = (sim_i2t.detach().argmax(1) == targets).float().mean()
        return ItcResult(loss, sim_i2t, sim_t2i, acc, cos_i2t, cos_t2i, image_feats_all,
                         text_feat_all)

    def _itm_loss(self, image_embeds: Tensor, image_kv: ImageKV, text, sim_i2t: Tensor,
                  sim_t2i: Tensor, share: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Matching loss on B positives, nB (image, hard negative text) and nB (text, hard negative
        image) pairs (n: ``itm_negatives_per_positive``); negatives are drawn from the softmaxed
        similarities over all ranks, mixed with uniform weights by the 0-dim ``share`` of hard
        ones (None: all hard)."""
        rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
        b, n = image_embeds.shape[0], self.cfg.itm_negatives_per_positive
        if world * b < n + 1:
            raise UserError(f"ITM needs at least {n + 1} image-text pairs per step to draw {n} "
                            "distinct negative(s) per positive (model.itm_negatives_per_positive)"
                            "; raise the batch size or lower itm_negatives_per_positive")
        local = torch.arange(b, device=image_embeds.device)
        with torch.no_grad():
            weights_t2i = F.softmax(sim_t2i, dim=1) + 1e-4
            weights_i2t = F.softmax(sim_i2t, dim=1) + 1e-4
            if share is not None:
                weights_t2i, weights_i2t = (mix_weights(w, share)
                                            for w in (weights_t2i, weights_i2t))
            weights_t2i[local, rank * b + local] = 0  # never the positive
            weights_i2t[local, rank * b + local] = 0
            # a diverged step (non-finite similarities) must reach the runner's non-finite
            # check as a loss, not crash multinomial: draw uniformly where weights are not finite
            weights_t2i = torch.where(torch.isfinite(weights_t2i), weights_t2i, 1.0)
            weights_i2t = torch.where(torch.isfinite(weights_i2t), weights_i2t, 1.0)
            neg_image = draw_negatives(weights_t2i, n)  # (n*B,) per text, in 0..W*B-1
            neg_text = draw_negatives(weights_i2t, n)  # (n*B,) per image

        ids, mask = text.input_ids, text.attention_mask
        if world == 1:
            neg_kv = image_kv.select(neg_image)
            neg_ids, neg_mask = ids[neg_text], mask[neg_text]
        else:
            # keys/values of the chosen images, which may live on other ranks
            neg_kv = self.Qformer.bert.image_kv(_gather_with_grad(image_embeds)[neg_image])
            # ranks pad to different lengths: gather at max_txt_len, trim after choosing
            pad = self.tokenizer.pad_token_id
            ids = _pad_right(ids, self.max_txt_len, pad)
            mask = _pad_right(mask, self.max_txt_len, 0)
            neg_ids, neg_mask = concat_all_gather(ids)[neg_text], concat_all_gather(mask)[neg_text]
            length = int(torch.maximum(mask.sum(1).max(), neg_mask.sum(1).max()))
            ids, mask, neg_ids, neg_mask = (t[:, :length] for t in (ids, mask, neg_ids, neg_mask))

        # rows: (image, text), n rounds of (image, negative text) -- all attend to this batch's
        # images, together -- then n rounds of (negative image, text)
        hidden, _ = self.Qformer.bert(
            input_ids=torch.cat([ids, neg_ids, ids.repeat(n, 1)]),
            query_embeds=self.query_tokens.expand((1 + 2 * n) * b, -1, -1),
            attention_mask=padding_mask(torch.cat([mask, neg_mask, mask.repeat(n, 1)]),
                                        self.num_query),
            image_kv=[ImageKV(image_kv.layers, repeats=1 + n), neg_kv], last_rows=self.num_query)
        logits = self.itm_head(hidden).mean(dim=1)  # ((1 + 2n) B, 2) from the query outputs
        return itm_loss(logits, b, n)

    def _itg_logits(self, text, query_kv: List[KV]) -> Tuple[Tensor, Tensor]:
        """[DEC] + caption, each token seeing all queries (their cached keys/values) and the
        tokens before it: next-token logits (B*(T-1), V) at every position, and labels (B*(T-1),)
        with ``IGNORE`` where the next token is padding. (Every position, not only the labelled
        ones: selecting those by a mask has a data-dependent size, a host sync on a GPU.)"""
        ids = text.input_ids.clone()
        ids[:, 0] = self.dec_token_id  # [CLS] -> [DEC]
        hidden, _ = self.Qformer.bert(
            input_ids=ids, attention_mask=causal_text_mask(text.attention_mask, self.num_query),
            past_key_values=query_kv)
        labels = ids[:, 1:].masked_fill(text.attention_mask[:, 1:] == 0, IGNORE)
        return self.Qformer.cls(hidden[:, :-1]).flatten(0, 1), labels.flatten()

    def _itg_loss(self, text, query_kv: List[KV], teacher: Optional[Teacher] = None) -> Tensor:
        """Caption loss: next-token cross-entropy with label smoothing 0.1 (with a ``teacher``,
        mixed with its next-token distributions: ALBEF's language-model distillation)."""
        logits, target = self._itg_logits(text, query_kv)
        if teacher is None:
            return F.cross_entropy(logits, target, label_smoothing=0.1, ignore_index=IGNORE)
        return distill_cross_entropy(logits, target, teacher.itg, teacher.alpha, 0.1,
                                     keep=target != IGNORE)
