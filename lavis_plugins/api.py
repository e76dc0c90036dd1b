"""Python entry points: ``load_model``, ``load_model_and_preprocess`` and ``model_zoo``.

They work for LAVIS's own models and the plugin's, and differ from LAVIS's functions of the same
names in three ways: the zoo is read from the live registry (LAVIS's ``model_zoo`` is a snapshot
taken when ``lavis.models`` was imported, before any plugin registered); bad names fail with the
list of choices; and a ``checkpoint`` and config overrides can be given directly.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
from lavis.common.registry import registry
from lavis.models import ModelZoo, load_preprocess
from omegaconf import OmegaConf

from lavis_plugins.common.errors import UserError, unknown_name

logger = logging.getLogger(__name__)


def model_zoo() -> ModelZoo:
    """Every registered model architecture (LAVIS's and the plugin's) with its model types."""
    return ModelZoo()


def plugin_names() -> Dict[str, List[str]]:
    """Names this package registered, by registry kind (all start with ``lavis_plugins.PREFIX``)."""
    from lavis_plugins import PREFIX

    kinds = {
        "model": "model_name_mapping",
        "processor": "processor_name_mapping",
        "builder": "builder_name_mapping",
        "task": "task_name_mapping",
        "runner": "runner_name_mapping",
        "lr_scheduler": "lr_scheduler_name_mapping",
    }
    out = {}
    for kind, key in kinds.items():
        mapping = registry.mapping[key]
        out[kind] = sorted(
            n for n, cls in mapping.items() if cls.__module__.startswith("lavis_plugins.")
            or n.startswith(PREFIX)
        )
    return out


def _model_class(name: str):
    cls = registry.get_model_class(name)
    if cls is None:
        raise unknown_name("model", name, registry.mapping["model_name_mapping"].keys(),
                           "List them with `lavis-plugins zoo`.")
    return cls


def model_config(name: str, model_type: str, **overrides: Any):
    """The merged model config (default YAML of ``model_type`` + ``overrides``) for ``name``."""
    cls = _model_class(name)
    types = getattr(cls, "PRETRAINED_MODEL_CONFIG_DICT", {})
    if model_type not in types:
        raise unknown_name(f"model_type of {name!r}", model_type, types.keys())
    path = cls.default_config_path(model_type)
    try:
        full = OmegaConf.load(path)
    except FileNotFoundError as e:
        raise UserError(f"default config of {name!r}/{model_type!r} not found at {path}") from e
    cfg = OmegaConf.merge(full.model, OmegaConf.create(overrides))
    cfg.model_type = model_type
    return cfg, full.get("preprocess", None)


def load_model(
    name: str,
    model_type: str,
    is_eval: bool = False,
    device: str | torch.device = "cpu",
    checkpoint: Optional[str] = None,
    **overrides: Any,
) -> torch.nn.Module:
    """Build a registered model from its default config, optionally loading ``checkpoint``.

    Args:
        name: registered architecture (``lavis-plugins zoo`` lists them).
        model_type: one of the architecture's model types.
        is_eval: put the model in eval mode.
        device: where to put it.
        checkpoint: a local ``.pth`` (LAVIS format) or, for models that accept it, a
            transformers folder; replaces the config's ``pretrained``.
        overrides: config keys that replace the default YAML's values.
    """
    model, _ = _build(name, model_type, checkpoint, overrides, device)
    if is_eval:
        model.eval()
    if str(device) == "cpu":
        model = model.float()
    return model.to(device)


def _build(name, model_type, checkpoint, overrides, device):
    if checkpoint is not None:
        overrides = dict(overrides, pretrained=str(checkpoint), load_pretrained=True,
                         load_finetuned=False)
    from lavis_plugins.common.safe_load import weights_only_loads

    cfg, preprocess = model_config(name, model_type, **overrides)
    config_class = getattr(_model_class(name), "CONFIG_CLASS", None)
    if (str(device) == "cpu" and "vit_precision" not in overrides
            and "vit_precision" in getattr(config_class, "__dataclass_fields__", {})):
        # the model is made fp32 for the CPU anyway; an fp16 round trip would round the weights
        cfg.vit_precision = "fp32"
    # LAVIS's own models (and their ViT builders) unpickle fully: weights-only here
    with weights_only_loads([cfg.get(k) for k in ("pretrained", "finetuned", "vit_path")]):
        model = _model_class(name).from_config(cfg)
    return model, preprocess


def load_model_and_preprocess(
    name: str,
    model_type: str,
    is_eval: bool = False,
    device: str | torch.device = "cpu",
    checkpoint: Optional[str] = None,
    **overrides: Any,
) -> Tuple[torch.nn.Module, Dict[str, Any], Dict[str, Any]]:
    """Like :func:`load_model`, and also the visual and text processors ``{"train", "eval"}``."""
    model, preprocess = _build(name, model_type, checkpoint, overrides, device)
    if is_eval:
        model.eval()
    if str(device) == "cpu":
        model = model.float()
    if preprocess is None:
        logger.info("no default preprocess for %s/%s", name, model_type)
        vis, txt = {"train": None, "eval": None}, {"train": None, "eval": None}
    else:
        vis, txt = load_preprocess(_processors_at_model_size(preprocess, model))
    return model.to(device), vis, txt


def _processors_at_model_size(preprocess, model: torch.nn.Module):
    """``preprocess`` with every visual processor's ``image_size`` set to the size the model was
    built for (an ``image_size`` override, or the size a transformers folder's config.json
    gives), since an image of another size fails inside the model."""
    size = getattr(getattr(model, "cfg", None), "image_size", None)
    vis = preprocess.get("vis_processor") if size is not None else None
    if not vis:
        return preprocess
    preprocess = copy.deepcopy(preprocess)
    for split in preprocess.vis_processor.values():
        if split is not None:
            split.image_size = int(size)
    return preprocess
