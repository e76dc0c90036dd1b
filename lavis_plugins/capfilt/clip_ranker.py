"""CapFilt's CLIP ranker (BLIP-2's setting: captions ranked by CLIP ViT-L/14 image-text
similarity): LAVIS's ``clip_feature_extractor`` (its vendored open_clip code), built offline.

``run.capfilt.ranker``::

    arch: clip_feature_extractor     # or clip (the same LAVIS class)
    model_type: ViT-L-14             # an open_clip architecture name LAVIS ships
                                     # (configs/models/clip/)
    pretrained: /weights/ViT-L-14.pth  # a local open_clip-format state dict ("openai" downloads)
    model_config: null               # optional: an open_clip JSON for another architecture
                                     # (embed_dim, vision_cfg, text_cfg); model_type names it

The ranker gets the filter's image tensor (LAVIS's BLIP and CLIP processors normalise with the
same mean and std), resized to the CLIP's input size when that differs (bicubic, antialiased;
BLIP's eval processor squashes the whole image to a square where CLIP's crops its centre).
The score is the cosine similarity of the normalised image and text embeddings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from lavis_plugins.common.errors import UserError

ARCHS = ("clip_feature_extractor", "clip")  # LAVIS's registered names of its CLIP class
KEYS = ("arch", "model_type", "pretrained", "model_config", "precision")


def build_clip_ranker(cfg: Mapping[str, Any], device: torch.device) -> torch.nn.Module:
    """The CLIP model of ``run.capfilt.ranker`` in eval mode on ``device``; a bad setting or
    file is a ``UserError`` naming the key."""
    from lavis.models.clip_models import model as clip_model

    from lavis_plugins.common.safe_load import weights_only_loads

    unknown = sorted(set(cfg) - set(KEYS))
    if unknown:
        raise UserError(f"run.capfilt.ranker: unknown key(s) {unknown}; accepted: {list(KEYS)}")
    if cfg.get("arch") not in ARCHS:
        raise UserError(f"run.capfilt.ranker.arch = {cfg.get('arch')!r}: the ranker is LAVIS's "
                        f"CLIP, one of {list(ARCHS)}")
    name, pretrained = cfg.get("model_type"), cfg.get("pretrained") or ""
    if cfg.get("model_config"):
        path = Path(str(cfg["model_config"])).expanduser()
        if not path.is_file():
            raise UserError(f"run.capfilt.ranker.model_config {path} does not exist")
        name = name or path.stem
        if path.stem != name:
            raise UserError(f"run.capfilt.ranker: model_type {name!r} must be the model_config "
                            f"file's name ({path.stem!r}; open_clip names configs by file)")
        clip_model.add_model_config(path)
    if name not in clip_model.list_models():
        raise UserError(f"run.capfilt.ranker.model_type = {name!r} is not an open_clip "
                        f"architecture LAVIS knows; choose one of {clip_model.list_models()} or "
                        "give model_config")
    if not pretrained:
        raise UserError("run.capfilt.ranker.pretrained: give the CLIP weights (a local "
                        "open_clip-format state dict); an untrained CLIP would rank at random")
    if pretrained.lower() != "openai" and not Path(pretrained).expanduser().is_file():
        raise UserError(f"run.capfilt.ranker.pretrained {pretrained} does not exist")
    with weights_only_loads([pretrained]):
        try:
            model = clip_model.create_model(name, pretrained=str(Path(pretrained).expanduser())
                                            if pretrained.lower() != "openai" else pretrained)
        except RuntimeError as e:  # a state dict of another architecture
            raise UserError(f"run.capfilt.ranker.pretrained {pretrained} does not fit CLIP "
                            f"{name}: {str(e).splitlines()[0][:200]}") from None
    return model.to(device).eval()


def image_size(ranker: torch.nn.Module) -> int:
    """The side of the square images the CLIP's image tower takes."""
    size = getattr(ranker.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


@torch.no_grad()
def clip_scores(ranker: torch.nn.Module, images: Tensor, owner: Tensor, texts: List[str]) -> Tensor:
    """(M,) cosine similarities of M captions ``texts`` with their images ``images[owner]``:
    images (B, 3, H, W) encoded once each, texts in one batch."""
    side = image_size(ranker)
    if images.shape[-2:] != (side, side):
        images = F.interpolate(images.float(), size=(side, side), mode="bicubic",
                               antialias=True, align_corners=False)
    dtype = next(ranker.parameters()).dtype
    img = F.normalize(ranker.encode_image(images.to(dtype)).float(), dim=-1)  # (B, E)
    tokens = ranker.tokenizer(texts).to(images.device)  # (M, 77)
    txt = F.normalize(ranker.encode_text(tokens).float(), dim=-1)  # (M, E)
    return (img[owner] * txt).sum(-1)
