"""Export our BLIP-2 models: a transformers folder, and a LAVIS ``.pth``.

- :func:`save_transformers` writes what transformers' ``save_pretrained`` writes (config.json,
  ``model.safetensors``, processor and tokenizer files): a stage-2 model becomes a
  ``Blip2ForConditionalGeneration`` folder (with a question-aware Q-Former, InstructBLIP: an
  ``InstructBlipForConditionalGeneration`` one), a stage-1 model a
  ``Blip2ForImageTextRetrieval`` one. The weights are loaded *strictly* into transformers' own
  class before it saves them, so a folder is only written when every weight has its place.
- :func:`save_lavis` writes ``{"model": state_dict}`` in LAVIS's names, which LAVIS's
  ``Blip2Qformer`` / ``Blip2OPT`` / ``Blip2T5`` load strictly (same keys and shapes).

What transformers' classes cannot hold is refused, naming the setting: a CLIP ViT-L encoder
(``Blip2VisionModel`` has EVA's blocks). Two parts of stage 1 have no place in
``Blip2ForImageTextRetrieval`` and are logged: the ITG language-model head and the learned
temperature.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Dict

import torch
from torch import nn

from lavis_plugins.common.errors import UserError
from lavis_plugins.models.hf_format import (
    _HF_TOP,
    _HF_VIT_LAYER_NAMES,
    _HF_VIT_TOP,
    BERT_CONFIG_KEYS,
)

logger = logging.getLogger(__name__)

# BLIP-2's image normalisation (LAVIS's BlipImageBaseProcessor defaults: OpenAI CLIP's)
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def save_lavis(model: nn.Module, path: str | Path) -> Path:
    """``{"model": state_dict}`` at ``path`` (LAVIS's checkpoint format and key names)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"model": state}, path)
    return path


# ------------------------------------------------------------------ transformers
def _vision_config(model: nn.Module) -> Dict[str, Any]:
    from lavis.models import eva_vit

    enc = model.visual_encoder
    if not isinstance(enc, eva_vit.VisionTransformer):
        raise UserError(f"vit_model {model.cfg.vit_model!r} cannot be exported to transformers: "
                        "its Blip2VisionModel has EVA's blocks (eva_clip_g, eva, tiny), not "
                        "CLIP ViT-L's; export the LAVIS .pth instead")
    block = enc.blocks[0]
    eps = block.norm1.eps
    if model.ln_vision.eps != eps:
        # transformers has one epsilon for the blocks and the final LayerNorm (its own
        # conversion of LAVIS's weights accepts the same difference)
        logger.warning("ln_vision's LayerNorm epsilon %g is written as the blocks' %g "
                       "(transformers has one): outputs differ slightly", model.ln_vision.eps, eps)
    return dict(hidden_size=enc.num_features, intermediate_size=block.mlp.fc1.out_features,
                num_hidden_layers=len(enc.blocks), num_attention_heads=block.attn.num_heads,
                image_size=int(model.cfg.image_size), patch_size=enc.patch_embed.patch_size[0],
                layer_norm_eps=eps, qkv_bias=block.attn.q_bias is not None, hidden_act="gelu")


def _qformer_config(model: nn.Module, text_input: bool) -> Dict[str, Any]:
    c = model.Qformer.config
    out = {k: getattr(c, k) for k in BERT_CONFIG_KEYS}
    if model.Qformer.bert.embeddings.word_embeddings is not None:  # resized for [DEC]
        out["vocab_size"] = model.Qformer.bert.embeddings.word_embeddings.num_embeddings
    out.update(cross_attention_frequency=c.cross_attention_freq,
               encoder_hidden_size=c.encoder_width, use_qformer_text_input=text_input)
    return out


_VIT_BLOCK = re.compile(r"^visual_encoder\.blocks\.(\d+)\.(.*)$")
# the import tables of hf_format, inverted: export and import cannot drift apart
_VIT_NAMES = {ours: theirs for theirs, ours in _HF_VIT_LAYER_NAMES.items()}
_VIT_TOP = {ours: theirs for theirs, ours in _HF_VIT_TOP.items()}
# stage-1 parts with a place in Blip2ForImageTextRetrieval (besides the Q-Former's query side)
_STAGE1_TOP = {ours: theirs for theirs, ours in _HF_TOP.items()}


def lavis_to_hf_state_dict(state: Dict[str, torch.Tensor], proj_name: str = "llm_proj",
                           llm_name: str = "llm") -> Dict[str, torch.Tensor]:
    """Rename a LAVIS-named BLIP-2 state dict to transformers' names (the inverse of
    :func:`lavis_plugins.models.hf_format.hf_to_lavis_state_dict`). Keys transformers has no
    place for (position-id buffers, ``Qformer.cls``, ``temp``) are left out."""
    out: Dict[str, torch.Tensor] = {}
    q_bias: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _VIT_TOP:
            out[_VIT_TOP[key]] = value
        elif (m := _VIT_BLOCK.match(key)) is not None:
            i, rest = m.groups()
            if rest in ("attn.q_bias", "attn.v_bias"):
                q_bias[f"{i}.{rest[5]}"] = value
                continue
            lavis_name = next((lv for lv in _VIT_NAMES if rest.startswith(lv + ".")), None)
            if lavis_name is None:
                raise UserError(f"cannot map {key!r} to transformers' Blip2VisionModel")
            out[f"vision_model.encoder.layers.{i}.{_VIT_NAMES[lavis_name]}"
                f"{rest[len(lavis_name):]}"] = value
        elif key.startswith(tuple(_STAGE1_TOP)):
            prefix = next(p for p in _STAGE1_TOP if key.startswith(p))
            out[_STAGE1_TOP[prefix] + key[len(prefix):]] = value
        elif key.startswith("Qformer.bert."):
            if key.endswith("position_ids"):
                continue
            new = "qformer." + key[len("Qformer.bert."):]
            new = new.replace("qformer.embeddings.LayerNorm.", "qformer.layernorm.")
            out[re.sub(r"\.(attention|crossattention)\.self\.", r".\1.attention.", new)] = value
        elif key == "query_tokens":
            out[key] = value
        elif key.startswith(proj_name + "."):
            out["language_projection" + key[len(proj_name):]] = value
        elif key.startswith(llm_name + "."):
            out["language_model" + key[len(llm_name):]] = value
        elif key.startswith("Qformer.cls.") or key == "temp":
            continue
        else:
            raise UserError(f"cannot map {key!r} to a transformers BLIP-2 weight")
    for k in sorted({k.split(".")[0] for k in q_bias}, key=int):
        q, v = q_bias[f"{k}.q"], q_bias[f"{k}.v"]
        # transformers' fused qkv bias holds a zero key bias, as EVA has none
        out[f"vision_model.encoder.layers.{k}.self_attn.qkv.bias"] = torch.cat(
            [q, torch.zeros_like(q), v])
    return out


def _save_processor(model: nn.Module, tokenizer, folder: Path) -> None:
    """The files ``Blip2Processor.from_pretrained(folder)`` reads: the image processor at the
    model's size and normalisation, and the tokenizer. (Not through a ``Blip2Processor``: its
    constructor adds an ``<image>`` token to the tokenizer it is given, which would change our
    model's tokenizer and the saved vocabulary.)"""
    from transformers import BlipImageProcessor

    size = int(model.cfg.image_size)
    BlipImageProcessor(size={"height": size, "width": size}, image_mean=list(IMAGE_MEAN),
                       image_std=list(IMAGE_STD)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_transformers(model: nn.Module, folder: str | Path) -> Path:
    """Write ``model`` as a transformers folder that transformers' own class loads.

    Stage 2 (``lp_blip2_opt`` / ``lp_blip2_t5``): ``Blip2ForConditionalGeneration`` with the
    LLM, its tokenizer and a ``Blip2Processor``. Stage 1 (``lp_blip2_qformer``):
    ``Blip2ForImageTextRetrieval`` with the BERT tokenizer.
    """
    from transformers import Blip2Config

    from lavis_plugins.models._blip2_llm import Blip2LLMBase

    folder = Path(folder)
    stage2 = isinstance(model, Blip2LLMBase)
    instruct = stage2 and model.cfg.qformer_text_input
    vision = _vision_config(model)
    qformer = _qformer_config(model, text_input=not stage2)
    if instruct:
        from transformers import InstructBlipConfig
        from transformers import InstructBlipForConditionalGeneration as cls

        qformer.pop("use_qformer_text_input")  # InstructBLIP's Q-Former always has the branch
        config = InstructBlipConfig(vision_config=vision, qformer_config=qformer,
                                    text_config=model.llm.config.to_dict(),
                                    num_query_tokens=model.query_tokens.shape[1])
        state = _instructblip_names(
            lavis_to_hf_state_dict(model.state_dict(), model.PROJ_NAME, model.LLM_NAME))
        tokenizer = model.llm_tokenizer
    elif stage2:
        from transformers import Blip2ForConditionalGeneration as cls

        config = Blip2Config(vision_config=vision, qformer_config=qformer,
                             text_config=model.llm.config.to_dict(),
                             num_query_tokens=model.query_tokens.shape[1])
        state = lavis_to_hf_state_dict(model.state_dict(), model.PROJ_NAME, model.LLM_NAME)
        tokenizer = model.llm_tokenizer
    else:
        from transformers import Blip2ForImageTextRetrieval as cls

        config = Blip2Config(vision_config=vision, qformer_config=qformer,
                             num_query_tokens=model.query_tokens.shape[1],
                             image_text_hidden_size=model.vision_proj.out_features)
        logger.warning("Blip2ForImageTextRetrieval has no ITG language-model head and no learned "
                       "temperature: Qformer.cls and temp (%.4f) are not exported",
                       float(model.temp))
        state = lavis_to_hf_state_dict(model.state_dict())
        tokenizer = model.tokenizer
    config.architectures = [cls.__name__]
    from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        hf = cls(config)
    own = hf.state_dict()
    # tied / non-persistent entries transformers recreates itself
    missing = sorted(k for k in own if k not in state and not k.endswith("position_ids"))
    tied = set(getattr(hf, "_tied_weights_keys", None) or [])
    if stage2:
        tied |= {"language_model." + k for k in (model.llm._tied_weights_keys or [])}
    missing = [k for k in missing if k not in tied]
    unexpected = sorted(k for k in state if k not in own)
    if missing or unexpected:
        raise UserError(f"cannot export {type(model).__name__} to {cls.__name__}: missing "
                        f"{missing[:6]}, without a place {unexpected[:6]}")
    hf.load_state_dict(state, strict=False)
    hf.tie_weights()
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(folder)
    _save_processor(model, tokenizer, folder)
    if instruct:  # where InstructBlipProcessor reads the Q-Former's tokenizer
        from lavis_plugins.models.hf_format import QFORMER_TOKENIZER_DIR

        model.tokenizer.save_pretrained(folder / QFORMER_TOKENIZER_DIR)
    return folder


def _instructblip_names(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """BLIP-2 transformers names -> InstructBLIP's, whose Q-Former holds its text embeddings
    and their LayerNorm."""
    renames = {"embeddings.": "qformer.embeddings.",
               "qformer.layernorm.": "qformer.embeddings.layernorm."}
    out = {}
    for key, value in state.items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        out[key if prefix is None else renames[prefix] + key[len(prefix):]] = value
    return out
