"""ALBEF's momentum model for ``lp_blip2_qformer`` (option ``momentum_distill``).

The momentum model is an exponential moving average (EMA) of the trainable Q-Former, query
tokens and ITC projections: after each optimizer step's weights theta, at the next forward,
``theta_m <- m * theta_m + (1 - m) * theta`` (m = 0.995, ALBEF's). The image encoder and
``ln_vision`` are shared with the live model (BLIP-2 keeps the encoder frozen).

Design, and why:
- the EMA weights are *buffers* of a sub-module (``momentum_model.weights.<parameter name>``), not
  parameters: the optimizer never sees them, and the runner's checkpoints, which keep buffers,
  save them, so a resumed run continues the same EMA;
- the momentum forward reuses the model's own code with the EMA tensors swapped in for its
  parameters (``torch.func.functional_call``), so there is no second copy of the Q-Former to
  keep in step with the model's code;
- the EMA is initialised from the live weights at the first training forward (flag buffer
  ``initialised``), after DDP has broadcast rank 0's weights and after any checkpoint was
  loaded; from then on every rank applies the same update to the same all-reduced weights, so
  the copies stay identical without communication, and DDP is told not to broadcast them.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from lavis.common import dist_utils
from lavis.models.base_model import concat_all_gather
from torch import Tensor, nn

from lavis_plugins.models.qformer import padding_mask

# trainable weights the momentum model copies (ALBEF: every trained encoder and projection)
MOMENTUM_PREFIXES = ("Qformer.", "query_tokens", "vision_proj.", "text_proj.")


class _Buffers(nn.Module):
    """Tensors held as buffers under their dotted names (nested empty modules), so a state
    dict names them ``<prefix>.<name>``."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        super().__init__()
        for name, t in tensors.items():
            *path, leaf = name.split(".")
            mod: nn.Module = self
            for part in path:
                if part not in mod._modules:
                    mod.add_module(part, nn.Module())
                mod = mod._modules[part]
            mod.register_buffer(leaf, t.detach().clone())


class _Apply(nn.Module):
    """Calls ``fn(model, *args)``; built per call so that ``functional_call`` can swap the
    model's parameters (registered here under ``model.``) for the duration of ``fn``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


class MomentumModel(nn.Module):
    """EMA copy of the ``MOMENTUM_PREFIXES`` parameters of a model, and its forward."""

    def __init__(self, model: nn.Module, momentum: float) -> None:
        super().__init__()
        self.momentum = float(momentum)
        self.names = [n for n, p in model.named_parameters()
                      if p.requires_grad and n.startswith(MOMENTUM_PREFIXES)]
        params = dict(model.named_parameters())
        self.weights = _Buffers({n: params[n] for n in self.names})
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def buffer_names(self, prefix: str) -> Iterable[str]:
        """This module's buffers as named in the parent's state dict (``prefix`` = our name)."""
        return [f"{prefix}.{n}" for n, _ in self.named_buffers()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """theta_m <- m * theta_m + (1 - m) * theta; on the first call theta_m <- theta.

        lerp with weight 1 - m (1 before initialisation, which copies exactly); the weight is a
        tensor, so no host sync is needed to read the flag."""
        params = dict(model.named_parameters())
        weight = torch.where(self.initialised, 1.0 - self.momentum, 1.0).to(torch.float32)
        for name, ema in self.weights.named_buffers():
            ema.lerp_(params[name].detach().to(ema.dtype), weight.to(ema.dtype))
        self.initialised.fill_(True)

    @torch.no_grad()
    def run(self, model: nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(model, *args)`` with the EMA weights in place of the model's parameters."""
        ema: Dict[str, Tensor] = {f"model.{n}": t for n, t in self.weights.named_buffers()}
        return torch.func.functional_call(_Apply(model), ema, (fn, *args))


def ramped_alpha(alpha: float, samples: Mapping[str, Any], device: torch.device) -> Tensor:
    """ALBEF's distillation weight: ``alpha * min(1, iteration / iterations_per_epoch)`` during
    the first epoch, ``alpha`` after it; ``alpha`` when the batch does not say where it is (the
    runner adds ``epoch``, ``iters`` and ``num_iters_per_epoch`` to every training batch)."""
    epoch, it, n = (samples.get(k) for k in ("epoch", "iters", "num_iters_per_epoch"))
    scale = 1.0
    if epoch is not None and it is not None and n and int(epoch) == 0:
        scale = min(1.0, int(it) / int(n))
    return torch.full((), alpha * scale, device=device)  # a fill, not a copy from the host


class Teacher(NamedTuple):
    """The momentum model's soft targets for one batch; no gradients."""

    alpha: Tensor  # 0-dim distillation weight (ramped)
    i2t: Tensor  # (B, W*B) softmax of its image-to-text similarities
    t2i: Tensor  # (B, W*B) softmax of its text-to-image similarities
    itg: Tensor  # (B*(T-1), V) softmax of its next-token logits at every text position


@torch.no_grad()
def momentum_targets(model: nn.Module, image_embeds: Tensor, text, alpha: Tensor) -> Teacher:
    """Update ``model.momentum_model``, then compute its ITC similarities (max over queries,
    divided by the model's temperature) and ITG next-token distributions on this batch: ALBEF's
    soft targets. ``image_embeds`` (B, N, Dv): the batch's image features; ``text``: its tokens;
    ``alpha``: the 0-dim distillation weight (:func:`ramped_alpha`). Its features are gathered
    from all ranks, as the model's are."""
    model.momentum_model.update(model)

    def features(m):  # runs with the EMA weights swapped in
        query_hidden, query_kv = m.query_kv_pass(image_embeds)  # (B, Nq, D)
        text_hidden, _ = m.Qformer.bert(
            input_ids=text.input_ids, attention_mask=padding_mask(text.attention_mask),
            last_rows=1)
        return (F.normalize(m.vision_proj(query_hidden), dim=-1),  # (B, Nq, E)
                F.normalize(m.text_proj(text_hidden[:, 0]), dim=-1),  # (B, E)
                m._itg_logits(text, query_kv)[0])  # (B*(T-1), V)

    image_m, text_m, itg_logits = model.momentum_model.run(model, features)
    image_m_all, text_m_all = (concat_all_gather(image_m), concat_all_gather(text_m)) \
        if dist_utils.get_world_size() > 1 else (image_m, text_m)
    i2t = (image_m @ text_m_all.t()).max(dim=1).values / model.temp  # (B, W*B)
    t2i = (image_m_all @ text_m.t()).max(dim=1).values.t() / model.temp
    return Teacher(alpha, F.softmax(i2t, dim=1), F.softmax(t2i, dim=1),
                   F.softmax(itg_logits.float(), dim=-1))
