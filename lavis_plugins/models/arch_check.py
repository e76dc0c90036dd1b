"""Which setting differs when a checkpoint does not fit the model built from the config.

A BLIP-2 state dict carries its architecture in its key set and shapes: the Q-Former layers that
have ``crossattention`` weights give ``cross_attention_freq``, ``query_tokens`` gives
``num_query_token``, the position embedding gives ``image_size`` / the patch size, and so on.
:func:`describe_mismatch` compares a file's state dict with the model's and names each setting
that differs, with the value the file needs, so that the error a loader raises says what to set
instead of which tensor failed.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Sequence

from torch import Tensor

_CROSS = re.compile(r"^Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.")
_QLAYER = re.compile(r"^Qformer\.bert\.encoder\.layer\.(\d+)\.")
_VIT_BLOCK = re.compile(r"^visual_encoder\.(?:blocks|transformer\.resblocks)\.(\d+)\.")


def _layers(keys: Sequence[str], pattern: re.Pattern) -> List[int]:
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def _freq(cross_layers: List[int], depth: int) -> str:
    """The cross_attention_freq that puts cross-attention in exactly ``cross_layers``."""
    for f in range(1, depth + 1):
        if [i for i in range(depth) if i % f == 0] == cross_layers:
            return str(f)
    return "none that fits"


def _shape(state: Mapping[str, Tensor], key: str):
    value = state.get(key)
    return None if value is None else tuple(value.shape)


def describe_mismatch(file_state: Mapping[str, Tensor], model_state: Mapping[str, Tensor],
                      vit_setting: str = "vit_model") -> List[str]:
    """Settings in which the checkpoint ``file_state`` and the model differ, one line each
    (empty when nothing recognisable differs).

    Only what both sides hold is compared (a LAVIS file without the frozen ViT says nothing
    about the ViT). ``vit_setting`` is the config key that sizes the image encoder (``vit_model``,
    or ``tiny_vit`` for the sized EVA-style encoder).
    """
    out: List[str] = []
    fk, mk = list(file_state), list(model_state)
    f_qdepth, m_qdepth = len(_layers(fk, _QLAYER)), len(_layers(mk, _QLAYER))
    if f_qdepth and m_qdepth and f_qdepth != m_qdepth:
        out.append(f"the Q-Former has {f_qdepth} layers in the file, {m_qdepth} in the model "
                   "(num_hidden_layers of the BERT at bert_path, or of config.json)")
    f_cross, m_cross = _layers(fk, _CROSS), _layers(mk, _CROSS)
    if f_cross and m_cross and f_cross != m_cross and f_qdepth == m_qdepth:
        out.append(f"cross_attention_freq: the file has cross-attention in Q-Former layers "
                   f"{f_cross} (cross_attention_freq {_freq(f_cross, f_qdepth)}), the model in "
                   f"{m_cross} (cross_attention_freq {_freq(m_cross, m_qdepth)}); set "
                   f"model.cross_attention_freq: {_freq(f_cross, f_qdepth)}")
    checks: Dict[str, str] = {
        "query_tokens": "num_query_token",
        "Qformer.bert.embeddings.LayerNorm.weight": "the Q-Former width (BERT at bert_path)",
        "vision_proj.weight": "embed_dim",
        "visual_encoder.pos_embed": f"image_size (or the patch size of {vit_setting})",
        "visual_encoder.cls_token": f"the image encoder's width ({vit_setting})",
        "ln_vision.weight": f"the image encoder's width ({vit_setting})",
    }
    for key, setting in checks.items():
        a, b = _shape(file_state, key), _shape(model_state, key)
        if a is not None and b is not None and a != b:
            line = f"{setting}: {key} is {a} in the file, {b} in the model"
            if setting == "num_query_token":
                line += f"; set model.num_query_token: {a[1]}"
            out.append(line)
    f_vdepth, m_vdepth = len(_layers(fk, _VIT_BLOCK)), len(_layers(mk, _VIT_BLOCK))
    if f_vdepth and m_vdepth and f_vdepth != m_vdepth:
        out.append(f"the image encoder has {f_vdepth} blocks in the file, {m_vdepth} in the model "
                   f"({vit_setting})")
    # cross-attention keys read image features: their width is the image encoder's
    for i in sorted(set(f_cross) & set(m_cross))[:1]:
        key = f"Qformer.bert.encoder.layer.{i}.crossattention.self.key.weight"
        a, b = _shape(file_state, key), _shape(model_state, key)
        if a is not None and b is not None and a[1] != b[1]:
            out.append(f"the Q-Former reads image features of width {a[1]} in the file, {b[1]} in "
                       f"the model ({vit_setting})")
    return out


def mismatch_message(source: str, lines: List[str], fallback: str) -> str:
    """One message: the file, then each differing setting, else ``fallback``."""
    if not lines:
        return f"{source}: {fallback}"
    return (f"{source} was trained with other settings than this model's config: "
            + "; ".join(lines))
