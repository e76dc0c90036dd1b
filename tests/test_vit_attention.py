"""Our fused EVA attention (``SdpaEvaAttention``) against LAVIS's ``eva_vit.Attention``: equal
outputs and gradients for the same weights, with and without relative-position biases, and the
encoders our models build use it."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from lavis.models import eva_vit

from lavis_plugins.models.blip2_base import (
    LPBlip2Base,
    SdpaEvaAttention,
    TinyVitConfig,
    use_sdpa_attention,
)


def _pair(**kw):
    torch.manual_seed(0)
    ref = eva_vit.Attention(**kw)
    for p in ref.parameters():  # LAVIS initialises biases and the table to zero
        torch.nn.init.normal_(p, std=0.2)
    ours = copy.deepcopy(ref)
    assert use_sdpa_attention(ours) == 1 and type(ours) is SdpaEvaAttention
    return ref, ours


@pytest.mark.parametrize("window", [None, (3, 3)], ids=["plain", "rel-pos-table"])
@pytest.mark.parametrize("extra_bias", [False, True], ids=["", "shared-rel-pos-bias"])
def test_outputs_and_gradients_equal_lavis(window, extra_bias):
    ref, ours = _pair(dim=32, num_heads=4, qkv_bias=True, window_size=window)
    n = 10 if window is None else window[0] * window[1] + 1
    x = torch.randn(3, n, 32)
    bias = torch.randn(4, n, n) if extra_bias else None
    outs, grads = [], []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        y = m(xi, rel_pos_bias=bias)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y)
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_no_qkv_bias_and_dropout_off_in_eval():
    ref, ours = _pair(dim=16, num_heads=2, qkv_bias=False, attn_drop=0.5)
    ref.eval(), ours.eval()
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    ours.train()
    assert not torch.allclose(ours(x), ref(x), atol=1e-3)  # attention dropout acts in training


def test_encoders_we_build_use_it_and_match_lavis_attention():
    cfg = TinyVitConfig(width=32, depth=2, heads=2, patch_size=8)
    torch.manual_seed(0)
    fast, _ = LPBlip2Base.init_vision_encoder("tiny", 32, 0.0, False, "fp32", tiny=cfg)
    slow = copy.deepcopy(fast)
    assert use_sdpa_attention(slow, enabled=False) == 2
    assert sum(type(m) is SdpaEvaAttention for m in fast.modules()) == 2
    assert fast.state_dict().keys() == slow.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), slow.eval()(x), atol=1e-5, rtol=1e-5)
    again = pickle.loads(pickle.dumps(fast))  # checkpoints/ddp spawn pickle the module
    assert type(again.blocks[0].attn) is SdpaEvaAttention
    torch.manual_seed(0)
    plain, _ = LPBlip2Base.init_vision_encoder("tiny", 32, 0.0, False, "fp32", tiny=cfg,
                                               sdpa=False)
    assert type(plain.blocks[0].attn) is eva_vit.Attention
