"""transformers BLIP-2 folders: read their sizes and weights, and rename weights both ways.

A folder written by transformers' ``save_pretrained`` (``Blip2ForConditionalGeneration``,
``Blip2Model``, ``Blip2ForImageTextRetrieval``) holds everything a model needs: ``config.json``
gives every size (vision tower, Q-Former, queries, LLM), the weights file(s) the weights, and the
processor / tokenizer files the tokenizers. This module turns such a folder into

- the settings of our config classes (:func:`apply_folder_sizes`): the vision tower becomes an
  EVA-style encoder of the folder's sizes (``vit_model: eva``; transformers' ``Blip2VisionModel``
  has EVA's blocks), plus the Q-Former's ``BertConfig`` (:func:`qformer_bert_config`), so no
  ``bert_path`` / ``vit_path`` is needed;
- a state dict in LAVIS's names (:func:`hf_to_lavis_state_dict`), and back
  (:func:`lavis_to_hf_state_dict`, used by the export in :mod:`lavis_plugins.models.export`).

The renames are the inverse of transformers' ``convert_blip_2_original_to_pytorch.py``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch
from transformers import BertConfig

from lavis_plugins.common.errors import UserError
from lavis_plugins.models.blip2_base import TinyVitConfig

logger = logging.getLogger(__name__)

BLIP2_MODEL_TYPE = "blip-2"
# transformers' InstructBLIP folders: same vision tower and LLM; their Q-Former has the text branch
INSTRUCTBLIP_MODEL_TYPES = ("instructblip", "instructblipvideo")
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"  # where InstructBLIP folders keep the BERT tokenizer
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# files of which any one means a folder holds a BERT (Q-Former) tokenizer
BERT_TOKENIZER_FILES = ("vocab.txt",)


def folder_model_type(path: Optional[str]) -> Optional[str]:
    """``model_type`` of the transformers ``config.json`` in folder ``path`` (None: not one)."""
    if not path or not os.path.isdir(path):
        return None
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError):
        return None


def is_hf_blip2_folder(path: Optional[str]) -> bool:
    """A local folder holding a transformers BLIP-2 ``config.json``."""
    return folder_model_type(path) == BLIP2_MODEL_TYPE


def read_config(folder: str) -> Dict[str, Any]:
    """The folder's ``config.json`` as a dict (sub-configs as written, or transformers'
    defaults for those left out: ``save_pretrained`` writes only what differs)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder).to_dict()


def read_hf_state_dict(folder: str) -> Dict[str, torch.Tensor]:
    """All weights of a transformers folder (safetensors or .bin, single file or sharded)."""
    folder_p = Path(folder)
    for index_name, loader in (("model.safetensors.index.json", "st"),
                               ("pytorch_model.bin.index.json", "pt")):
        index = folder_p / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            break
    else:
        if (folder_p / "model.safetensors").is_file():
            files, loader = ["model.safetensors"], "st"
        elif (folder_p / "pytorch_model.bin").is_file():
            files, loader = ["pytorch_model.bin"], "pt"
        else:
            raise UserError(f"{folder} has a BLIP-2 config.json but no weights (model.safetensors "
                            "or pytorch_model.bin, single or sharded)")
    missing = [n for n in files if not (folder_p / n).is_file()]
    if missing:
        raise UserError(f"{folder}: its weight index names file(s) the folder lacks: {missing}")
    state: Dict[str, torch.Tensor] = {}
    for name in files:
        if loader == "st":
            from safetensors.torch import load_file

            state.update(load_file(str(folder_p / name)))
        else:
            from lavis_plugins.common.safe_load import load_weights

            state.update(load_weights(folder_p / name, f"transformers folder {folder}"))
    return state


# ------------------------------------------------------------------ sizes
def vit_sizes(vision: Dict[str, Any], folder: str) -> TinyVitConfig:
    """An EVA-style encoder of the sizes of a transformers ``Blip2VisionConfig`` dict."""
    if vision.get("hidden_act", "gelu") != "gelu":
        raise UserError(f"{folder}: vision_config.hidden_act is {vision['hidden_act']!r}; the "
                        "EVA blocks compute exact 'gelu' only")
    eps = float(vision.get("layer_norm_eps", 1e-6))
    return TinyVitConfig(width=vision["hidden_size"], depth=vision["num_hidden_layers"],
                         heads=vision["num_attention_heads"], patch_size=vision["patch_size"],
                         mlp_dim=vision["intermediate_size"], qkv_bias=vision.get("qkv_bias", True),
                         layer_norm_eps=eps, ln_vision_eps=eps)


# the BERT fields a transformers Q-Former config shares with our Q-Former's BertConfig (read on
# import, written on export)
BERT_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "hidden_act", "hidden_dropout_prob",
                    "attention_probs_dropout_prob", "max_position_embeddings",
                    "initializer_range", "layer_norm_eps", "pad_token_id")


def qformer_bert_config(qformer: Dict[str, Any]) -> BertConfig:
    """The ``BertConfig`` our Q-Former is built from, for a transformers Q-Former config dict
    (``qformer.qformer_config`` adds the query/cross-attention fields)."""
    return BertConfig(**{k: qformer[k] for k in BERT_CONFIG_KEYS if k in qformer})


def apply_folder_sizes(cfg: Any, folder: str) -> Any:
    """``cfg`` (a config dataclass of ours) with every size the folder's config.json gives:
    image encoder (``vit_model: eva`` + ``tiny_vit``), ``image_size``, ``num_query_token``,
    ``cross_attention_freq`` and, where ``cfg`` has it, ``embed_dim``. ``vit_path`` is cleared:
    the folder holds the encoder. Settings that change are logged."""
    if not any((Path(folder) / n).is_file() for n in WEIGHT_FILES):
        raise UserError(f"{folder} has a BLIP-2 config.json but no weights (model.safetensors "
                        "or pytorch_model.bin, single or sharded)")
    full = read_config(folder)
    vision, qformer = full["vision_config"], full["qformer_config"]
    new = {"vit_model": "eva", "tiny_vit": vit_sizes(vision, folder),
           "image_size": vision["image_size"], "vit_path": None,
           "num_query_token": full["num_query_tokens"],
           "cross_attention_freq": qformer["cross_attention_frequency"]}
    if hasattr(cfg, "embed_dim") and "image_text_hidden_size" in full:
        new["embed_dim"] = full["image_text_hidden_size"]
    changed = {k: v for k, v in new.items() if k != "tiny_vit" and getattr(cfg, k) != v}
    if changed:
        logger.info("%s: settings from its config.json: %s", folder, changed)
    return dataclasses.replace(cfg, **new)


def folder_tokenizer(folder: str, files, fallback: Union[str, Callable[[], str], None], what: str,
                     key: str) -> str:
    """Where to load a tokenizer from: ``folder`` when it holds one of ``files``, else the local
    folder ``fallback`` (the ``key`` setting; a callable is resolved only then, since resolving a
    hub name that is not cached is itself an error); neither is a ``UserError`` saying what is
    lacking."""
    if any(os.path.isfile(os.path.join(folder, n)) for n in files):
        return folder
    if callable(fallback):
        try:
            fallback = fallback()
        except UserError:  # not local either: the message below names both fixes
            fallback = None
    if fallback and os.path.isdir(fallback):
        return fallback
    raise UserError(f"{folder} holds no {what} ({' or '.join(files)}): save the processor / "
                    f"tokenizer into it (e.g. Blip2Processor.save_pretrained), or set model.{key} "
                    "to a local folder that has one")


# ------------------------------------------------------------------ weights: transformers -> LAVIS
_HF_VIT_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.*)$")
_HF_VIT_LAYER_NAMES = {
    "layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv",
    "self_attn.projection": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_HF_VIT_TOP = {
    "vision_model.embeddings.class_embedding": "visual_encoder.cls_token",
    "vision_model.embeddings.position_embedding": "visual_encoder.pos_embed",
    "vision_model.embeddings.patch_embedding.weight": "visual_encoder.patch_embed.proj.weight",
    "vision_model.embeddings.patch_embedding.bias": "visual_encoder.patch_embed.proj.bias",
    "vision_model.post_layernorm.weight": "ln_vision.weight",
    "vision_model.post_layernorm.bias": "ln_vision.bias",
}
# stage-1 heads and text embeddings of Blip2ForImageTextRetrieval
_HF_TOP = {
    "embeddings.word_embeddings.": "Qformer.bert.embeddings.word_embeddings.",
    "embeddings.position_embeddings.": "Qformer.bert.embeddings.position_embeddings.",
    "vision_projection.": "vision_proj.",
    "text_projection.": "text_proj.",
    "itm_head.": "itm_head.",
}


def hf_to_lavis_state_dict(hf_state: Dict[str, torch.Tensor], proj_name: str = "llm_proj",
                           llm_name: str = "llm") -> Dict[str, torch.Tensor]:
    """Rename a transformers BLIP-2 state dict to LAVIS's names.

    ``qformer.*`` -> ``Qformer.bert.*`` (``qformer.layernorm`` -> ``embeddings.LayerNorm``,
    ``*.attention.attention.*`` -> ``*.attention.self.*``), ``language_projection`` ->
    ``proj_name``, ``language_model`` -> ``llm_name``, ``query_tokens`` as is, the retrieval
    heads (``vision_projection``, ``text_projection``, ``itm_head``) and text embeddings to
    LAVIS's stage-1 names, and ``vision_model`` ->
    ``visual_encoder``/``ln_vision`` in EVA's layout (the fused qkv bias split back into
    ``q_bias``/``v_bias``; transformers keeps a zero key bias there).
    """
    out: Dict[str, torch.Tensor] = {}
    for key, value in hf_state.items():
        if key.startswith("vision_model."):
            out.update(_hf_vision_key(key, value))
            continue
        if key.startswith("qformer."):
            new = "Qformer.bert." + key[len("qformer."):]
            new = new.replace("Qformer.bert.layernorm.", "Qformer.bert.embeddings.LayerNorm.")
            # InstructBLIP keeps that LayerNorm in its Q-Former's embeddings
            new = new.replace("Qformer.bert.embeddings.layernorm.",
                              "Qformer.bert.embeddings.LayerNorm.")
            new = re.sub(r"\.(attention|crossattention)\.attention\.", r".\1.self.", new)
        elif key.startswith("language_projection."):
            new = proj_name + key[len("language_projection"):]
        elif key.startswith("language_model."):
            new = llm_name + key[len("language_model"):]
        elif key == "query_tokens":
            new = key
        elif key.startswith(tuple(_HF_TOP)):
            prefix = next(p for p in _HF_TOP if key.startswith(p))
            new = _HF_TOP[prefix] + key[len(prefix):]
        else:
            raise UserError(f"unexpected weight {key!r} in a transformers BLIP-2 checkpoint "
                            "(expected vision_model.*, qformer.*, query_tokens, "
                            "language_projection.*, language_model.*, embeddings.*, "
                            "vision_projection.*, text_projection.*, itm_head.*)")
        out[new] = value
    return out


def _hf_vision_key(key: str, value: torch.Tensor) -> Dict[str, torch.Tensor]:
    if key in _HF_VIT_TOP:
        return {_HF_VIT_TOP[key]: value}
    m = _HF_VIT_LAYER.match(key)
    if m is None:
        raise UserError(f"cannot map vision weight {key!r} to LAVIS's EVA ViT layout")
    i, rest = m.groups()
    if rest == "self_attn.qkv.bias":
        q, _, v = value.chunk(3)  # transformers stores (q, 0, v); EVA keeps q and v only
        return {f"visual_encoder.blocks.{i}.attn.q_bias": q,
                f"visual_encoder.blocks.{i}.attn.v_bias": v}
    for hf_name, lavis_name in _HF_VIT_LAYER_NAMES.items():
        if rest.startswith(hf_name + "."):
            return {f"visual_encoder.blocks.{i}.{lavis_name}{rest[len(hf_name):]}": value}
    raise UserError(f"cannot map vision weight {key!r} to LAVIS's EVA ViT layout")


# ------------------------------------------------------------------ stage 1 from a folder
def checkpoint_folder(cfg: Any) -> Optional[str]:
    """The transformers BLIP-2 folder a LAVIS model config loads (``finetuned`` when
    ``load_finetuned``, else ``pretrained`` when ``load_pretrained``), or None."""
    for flag, key in (("load_finetuned", "finetuned"), ("load_pretrained", "pretrained")):
        if cfg.get(flag, False):
            path = cfg.get(key)
            return str(path) if is_hf_blip2_folder(str(path) if path else None) else None
    return None


# what a transformers folder may lack for a stage-1 model, and what that means for its use
_STAGE1_OPTIONAL = (
    (re.compile(r"^(vision_proj|text_proj|itm_head)\."),
     "the ITC/ITM heads (a Blip2Model / Blip2ForConditionalGeneration folder has none): "
     "retrieval scores are untrained until stage-1 training"),
    (re.compile(r"^Qformer\.bert\.(embeddings\.(word|position)_embeddings\.|"
                r"encoder\.layer\.\d+\.(intermediate|output)\.)"),
     "the Q-Former's text branch (its qformer_config has no use_qformer_text_input): text "
     "features are untrained until stage-1 training"),
    (re.compile(r"^(Qformer\.cls\.|temp$)"),
     "the ITG language-model head and the contrastive temperature (transformers has none), "
     "kept as initialised"),
)


def load_stage1_folder(model: torch.nn.Module, folder: str) -> None:
    """Load a transformers ``Blip2ForImageTextRetrieval`` / ``Blip2Model`` /
    ``Blip2ForConditionalGeneration`` folder into a stage-1 model built at its sizes.

    The vision tower, queries and the Q-Former's query side must be complete; the LLM and its
    projection (stage-2 parts) are dropped; other parts the folder lacks are reported by what
    they mean (``_STAGE1_OPTIONAL``).
    """
    from lavis_plugins.models.arch_check import describe_mismatch, mismatch_message

    state = hf_to_lavis_state_dict(read_hf_state_dict(folder))
    stage2 = sorted({k.split(".")[0] for k in state if k.startswith(("llm.", "llm_proj."))})
    state = {k: v for k, v in state.items() if not k.startswith(("llm.", "llm_proj."))}
    if stage2:
        logger.info("%s: stage-2 parts dropped (a stage-1 model has none): %s", folder, stage2)
    own = model.state_dict()
    unknown = sorted(k for k in state if k not in own)
    bad = [k for k in state if k in own and state[k].shape != own[k].shape]
    if unknown or bad:
        raise UserError(mismatch_message(
            folder, describe_mismatch(state, own, model.vit_setting()),
            f"weights that do not fit the model built from its config.json: "
            f"{(unknown + bad)[:6]}"))
    missing = [k for k, _ in model.named_parameters() if k not in state]
    reasons = {}
    for k in missing:
        why = next((w for pattern, w in _STAGE1_OPTIONAL if pattern.match(k)), None)
        if why is None:
            raise UserError(f"{folder}: lacks {k!r} (and {len(missing) - 1} more weights); a "
                            "BLIP-2 folder must hold the vision tower, query tokens and Q-Former")
        reasons.setdefault(why, []).append(k)
    for why, keys in reasons.items():
        logger.warning("%s: not in the folder (%d weights): %s", folder, len(keys), why)
    model.load_state_dict(state, strict=False)
    logger.info("loaded %d tensors from %s", len(state), folder)
