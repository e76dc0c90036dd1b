"""The Q-Former's attention (``qformer.attention``): with dropout, training's path, it computes
the scores itself instead of SDPA's math backend; it must equal SDPA (outputs and gradients)
with the same dropout draw, with and without a mask, on keys laid out as the passes give them
(a transposed view from the projection, or the contiguous head-major image keys/values)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig

from lavis_plugins.models import qformer as qf


def _qkv(b=3, h=2, lq=5, lk=7, hd=8, head_major=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, hd, generator=g, requires_grad=True)
    if head_major:  # contiguous (B, h, L, hd): the shared image keys/values
        k, v = (torch.randn(b, h, lk, hd, generator=g, requires_grad=True) for _ in range(2))
    else:  # (B, L, h, hd) transposed, as split_heads returns the projections
        k, v = (torch.randn(b, lk, h, hd, generator=g).transpose(1, 2).requires_grad_()
                for _ in range(2))
    return q, k, v


def _run(fn, q, k, v, seed):
    torch.manual_seed(seed)  # the same dropout draw on both sides
    out = fn()
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("masked", ["none", "keys", "causal"])
@pytest.mark.parametrize("head_major", [False, True])
def test_dropout_attention_equals_sdpa_with_the_same_draw(masked, head_major):
    q, k, v = _qkv(head_major=head_major)
    mask = None
    if masked == "keys":  # (B, 1, 1, Lk) padding mask, first key always kept
        mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0],
                             [1, 0, 1, 0, 1, 0, 1]], dtype=torch.bool)[:, None, None, :]
    elif masked == "causal":  # (B, 1, Lq, Lk): each row sees the 2 leading keys and a prefix
        mask = torch.ones(5, 7, dtype=torch.bool).tril(2).expand(3, 1, 5, 7)
    p = 0.3
    ref, ref_grads = _run(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                  dropout_p=p), q, k, v, seed=4)
    got, got_grads = _run(lambda: qf.attention(q, k, v, mask, p), q, k, v, seed=4)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    for name, a, b in zip("qkv", got_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    # and the dropout is really applied: another draw gives another result
    other, _ = _run(lambda: qf.attention(q, k, v, mask, p), q, k, v, seed=5)
    assert not torch.allclose(other, got)


def test_without_dropout_it_is_sdpa():
    q, k, v = _qkv()
    mask = torch.ones(5, 7, dtype=torch.bool).tril(2)
    torch.testing.assert_close(qf.attention(q, k, v, mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_shared_image_keys_values_are_head_major_and_contiguous():
    model = qf.QFormerModel(qf.qformer_config(
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64), num_query_token=4, vision_width=24,
        cross_attention_freq=2))
    k, v = model.image_kv(torch.randn(3, 17, 24)).layers[0]
    assert k.shape == v.shape == (3, 2, 17, 16)
    assert k.is_contiguous() and v.is_contiguous()
