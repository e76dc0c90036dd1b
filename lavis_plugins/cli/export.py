"""``lavis-plugins export``: a checkpoint to a transformers folder and a LAVIS ``.pth``.

    lavis-plugins export --checkpoint /weights/blip2-opt-2.7b --out exported/
    lavis-plugins export --model lp_blip2_opt --model-type pretrain_opt2.7b \\
        --checkpoint run/checkpoint_best.pth --options opt_model=/weights/opt-2.7b \\
        vit_path=/weights/eva_vit_g.pth --out exported/

``--out`` becomes a transformers folder (config.json, model.safetensors, processor and tokenizer
files) holding also ``lavis_checkpoint.pth`` (``--format`` picks one of the two). A transformers
folder given as ``--checkpoint`` names its model itself; a ``.pth`` needs ``--model`` and
``--model-type`` (the config it was trained with; ``--options key=value`` overrides it).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from lavis_plugins.cli.experiment import model_options
from lavis_plugins.common.errors import UserError

LAVIS_FILE = "lavis_checkpoint.pth"
FORMATS = ("both", "transformers", "lavis")
# transformers architecture / LLM family of a folder -> our model and its default type
_FOLDER_MODELS = {"opt": ("lp_blip2_opt", "pretrain_opt2.7b"),
                  "t5": ("lp_blip2_t5", "pretrain_flant5xl"),
                  "retrieval": ("lp_blip2_qformer", "pretrain")}


def folder_model(folder: str) -> Tuple[str, str]:
    """Our (model name, model type) for a transformers BLIP-2 / InstructBLIP folder (whose
    config.json sets every size: the type only supplies the other defaults)."""
    from lavis_plugins.models.hf_format import INSTRUCTBLIP_MODEL_TYPES

    cfg = json.loads((Path(folder) / "config.json").read_text())
    text = cfg.get("text_config") or {}
    text_type = text.get("model_type")
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") in INSTRUCTBLIP_MODEL_TYPES:
        return ("lp_instructblip_t5" if text.get("is_encoder_decoder") or text_type == "t5"
                else "lp_instructblip_causal", "tiny")
    if any(a in ("Blip2ForImageTextRetrieval",) for a in archs) or not text_type:
        return _FOLDER_MODELS["retrieval"]
    if text_type in _FOLDER_MODELS:
        return _FOLDER_MODELS[text_type]
    return "lp_blip2_causal", "tiny"  # any other decoder-only LLM


def export(checkpoint: str, out: str, model: Optional[str] = None,
           model_type: Optional[str] = None, fmt: str = "both",
           options: Optional[Dict[str, object]] = None) -> List[Path]:
    """Load ``checkpoint`` (a transformers BLIP-2 folder or a LAVIS ``.pth``) and write it to
    ``out`` in ``fmt``; returns the written paths."""
    from lavis_plugins.api import load_model
    from lavis_plugins.models.hf_format import (BLIP2_MODEL_TYPE, INSTRUCTBLIP_MODEL_TYPES,
                                                folder_model_type)

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {list(FORMATS)}")
    if not Path(checkpoint).exists():
        raise UserError(f"--checkpoint {checkpoint}: no such file or folder")
    if model is None or model_type is None:
        if folder_model_type(checkpoint) not in (BLIP2_MODEL_TYPE, *INSTRUCTBLIP_MODEL_TYPES):
            raise UserError(f"--checkpoint {checkpoint} is not a transformers BLIP-2 / "
                            "InstructBLIP folder: give --model and --model-type (the config it "
                            "was trained with)")
        guess = folder_model(checkpoint)
        model, model_type = model or guess[0], model_type or guess[1]
    if Path(out).resolve() == Path(checkpoint).resolve():
        raise UserError("--out is the --checkpoint folder; write the export elsewhere")
    net = load_model(model, model_type, is_eval=True, checkpoint=checkpoint, **(options or {}))
    written = []
    if fmt in ("both", "transformers"):
        written.append(net.save_pretrained(out))
    if fmt in ("both", "lavis"):
        written.append(net.save_lavis(Path(out) / LAVIS_FILE))
    return written


def _run(args: argparse.Namespace) -> int:
    for path in export(args.checkpoint, args.out, args.model, args.model_type, args.format,
                       model_options(args.options)):
        print(f"wrote {path}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a transformers folder and a LAVIS "
                                      ".pth")
    p.add_argument("--checkpoint", required=True,
                   help="a transformers BLIP-2 folder or a LAVIS-format .pth")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--model", help="registered model (lp_blip2_opt, lp_blip2_t5, "
                                   "lp_blip2_qformer); a transformers folder names it itself")
    p.add_argument("--model-type", help="its model type (the default config to build)")
    p.add_argument("--format", default="both", choices=FORMATS)
    p.add_argument("--options", nargs="*", help="model config overrides, key=value")
    p.set_defaults(func=_run)
