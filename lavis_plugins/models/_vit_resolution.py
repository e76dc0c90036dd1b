"""The image encoder run at another square resolution than the one it was built for.

Frame selection scores candidate frames from cheaper features: the same ViT on frames of a
smaller side (``model.selection_grid`` patches), i.e. fewer patches. The position embeddings are
resized to the smaller patch grid by bicubic interpolation, as LAVIS's ``interpolate_pos_embed``
(of ``eva_vit`` / ``clip_vit``) does when it loads a checkpoint at another ``img_size`` (so the
result equals an encoder built at that size from the same weights: ``tests/test_vit_resolution.py``
checks it against LAVIS's function). At the built size the encoder's own ``forward`` runs,
unchanged.

Encoders: LAVIS's EVA ``VisionTransformer`` (``eva_clip_g``, and our ``tiny`` / ``eva``) with
absolute position embeddings, and LAVIS's CLIP ``VisionTransformer`` (``clip_L``).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lavis_plugins.common.errors import UserError


def patch_size(encoder: nn.Module) -> int:
    """Pixels per patch side of a LAVIS EVA or CLIP ``VisionTransformer``."""
    if hasattr(encoder, "patch_embed"):  # EVA
        return int(encoder.patch_embed.patch_size[0])
    if hasattr(encoder, "conv1"):  # CLIP
        return int(encoder.conv1.kernel_size[0])
    raise UserError(f"{type(encoder).__name__} is not a ViT this package can resize (EVA or "
                    "CLIP); score frames at full resolution (model.selection_grid: 0)")


def built_side(encoder: nn.Module) -> Optional[int]:
    """The square input side (pixels) ``encoder`` was built for (None: not an EVA/CLIP ViT)."""
    if hasattr(encoder, "patch_embed"):
        return int(encoder.patch_embed.img_size[0])
    side = getattr(encoder, "input_resolution", None)
    return None if side is None else int(side)


def resize_pos_embed(pos: Tensor, grid: int, align_corners: bool) -> Tensor:
    """Position embeddings (1, 1 + g*g, D) (or (1 + g*g, D)) of a g x g patch grid -> those of a
    ``grid`` x ``grid`` one: the class token's kept, the grid's resized bicubically in fp32, in
    ``pos``'s dtype. ``align_corners`` as the encoder's own LAVIS ``interpolate_pos_embed``
    (EVA's: False; CLIP's: True)."""
    flat = pos.dim() == 2
    pos = pos[None] if flat else pos
    old = int(round((pos.shape[1] - 1) ** 0.5))
    if old == grid:
        return pos[0] if flat else pos
    cls, tokens = pos[:, :1], pos[:, 1:].float()
    tokens = tokens.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    tokens = F.interpolate(tokens, size=(grid, grid), mode="bicubic",
                           align_corners=align_corners)
    out = torch.cat([cls, tokens.permute(0, 2, 3, 1).flatten(1, 2).to(pos.dtype)], dim=1)
    return out[0] if flat else out


def forward_at_side(encoder: nn.Module, image: Tensor) -> Tensor:
    """``encoder``'s output (B, 1 + (S/p)^2, D) for square images (B, 3, S, S) of any side S that
    is a multiple of the patch size p; the encoder's own ``forward`` when S is its built side."""
    side, built = image.shape[-1], built_side(encoder)
    if built is None or side == built:
        return encoder(image)
    if image.shape[-2] != side:
        raise UserError(f"the image encoder resizes to square images only; got "
                        f"{tuple(image.shape[-2:])}")
    p = patch_size(encoder)
    if side % p:
        raise UserError(f"image side {side} is not a multiple of the encoder's patch size {p}")
    if hasattr(encoder, "patch_embed"):
        return _eva_forward(encoder, image, side // p)
    return _clip_forward(encoder, image, side // p)


# Bytes of the widest activation (rows x widest linear layer, e.g. the feed-forward) per call of
# the image encoder on the CPU without autograd. A large batch through a frozen ViT runs slower per
# image on the CPU once that activation outgrows the shared cache (32 MB on the machine measured).
# One thread, our EVA blocks (SDPA attention) of width 256, process CPU ms, median of 5, load 2-3,
# one call vs the calls this budget makes: feed-forward 3968, 64 frames of 112 px (4160 rows,
# 66 MB) 674 vs 542 (4 calls); 8 frames of 224 px (33 MB) 337 vs 280 (2 calls); feed-forward 1024,
# 16 images of 224 px (17 MB) 268 vs 229 (2 calls). The outputs are the same: every operation is
# per row or per image.
CPU_ACTIVATION_BYTES = 16 << 20

# Each encoder's widest linear layer, found once per encoder rather than by a walk over its
# modules on every forward (eva_clip_g's depth, 551 modules: 0.48 ms of CPU per walk vs 0.3 us
# per lookup). Keyed weakly, so an entry goes with its encoder. A layer swapped in later would
# change only the chunk size, never the outputs.
_WIDEST_LINEAR: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


def widest_linear(encoder: nn.Module) -> int:
    """The largest ``out_features`` of ``encoder``'s ``nn.Linear`` layers (1 if it has none),
    walked once per encoder and remembered."""
    widest = _WIDEST_LINEAR.get(encoder)
    if widest is None:
        widest = max((m.out_features for m in encoder.modules() if isinstance(m, nn.Linear)),
                     default=1)
        _WIDEST_LINEAR[encoder] = widest
    return widest


def forward_in_chunks(encoder: nn.Module, image: Tensor) -> Tensor:
    """``forward_at_side`` (B, 1 + (S/p)^2, D); on the CPU without autograd, in equal chunks of
    images whose widest activation stays within ``CPU_ACTIVATION_BYTES`` (at least one image per
    call). Elsewhere (a GPU, or an encoder being trained) one call, as before."""
    if image.device.type != "cpu" or torch.is_grad_enabled() or built_side(encoder) is None:
        return forward_at_side(encoder, image)
    p = patch_size(encoder)
    rows = (image.shape[-2] // p) * (image.shape[-1] // p) + 1
    per_call = max(1, CPU_ACTIVATION_BYTES // (rows * widest_linear(encoder)
                                               * image.element_size()))
    calls = -(-image.shape[0] // per_call)
    if calls <= 1:  # (0: an empty batch)
        return forward_at_side(encoder, image)
    size = -(-image.shape[0] // calls)  # equal chunks: 16 images in 2 calls of 8, not 15 + 1
    return torch.cat([forward_at_side(encoder, part) for part in image.split(size)])


def _eva_forward(encoder: nn.Module, image: Tensor, grid: int) -> Tensor:
    """LAVIS's EVA ``forward_features`` with the position embeddings resized to ``grid``."""
    if encoder.rel_pos_bias is not None or any(
            getattr(b.attn, "relative_position_bias_table", None) is not None
            for b in encoder.blocks):
        raise UserError("this EVA encoder uses relative position biases, which are not resized; "
                        "score frames at full resolution (model.selection_grid: 0)")
    x = encoder.patch_embed.proj(image).flatten(2).transpose(1, 2)  # (B, grid^2, D)
    x = torch.cat([encoder.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    if encoder.pos_embed is not None:
        x = x + resize_pos_embed(encoder.pos_embed, grid, align_corners=False)
    x = encoder.pos_drop(x)
    for block in encoder.blocks:
        x = block(x, None)
    return x


def _clip_forward(encoder: nn.Module, image: Tensor, grid: int) -> Tensor:
    """LAVIS's CLIP ``VisionTransformer.forward`` with the position embeddings resized."""
    x = encoder.conv1(image).flatten(2).permute(0, 2, 1)  # (B, grid^2, D)
    cls = encoder.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    x = encoder.ln_pre(x + resize_pos_embed(encoder.positional_embedding, grid,
                                                align_corners=True).to(x.dtype))
    return encoder.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # LND in the blocks
