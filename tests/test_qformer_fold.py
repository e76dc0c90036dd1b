"""Folded cross-attention (``FoldedImage``): a single pass of the queries attends to the image
features through the key/value projections without computing keys or values. It must equal the
projected attention (outputs and every gradient), with attention dropout too, be chosen only where
it costs less and only for a single pass, and give the key bias its (zero) gradient.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig

from lavis_plugins.models import qformer as qf
from lavis_plugins.models.qformer import FoldedImage, QFormerSelfAttention


def _attention(hidden=32, heads=4, kv_width=24, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=hidden, num_attention_heads=heads,
                     attention_probs_dropout_prob=0.1)
    attn = QFormerSelfAttention(cfg, kv_width)
    with torch.no_grad():  # non-zero biases, so that dropping the key bias is exercised
        attn.key.bias.normal_()
        attn.value.bias.normal_()
    return attn


def _inputs(attn, b=3, n_q=5, n=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    h, hd = attn.num_heads, attn.query.out_features // attn.num_heads
    q = torch.randn(b, h, n_q, hd, generator=g, requires_grad=True)
    x = torch.randn(b, n, attn.key.in_features, generator=g, requires_grad=True)
    return q, x


def _grads(out, tensors, attn):
    out.square().sum().backward()
    got = [t.grad.clone() for t in tensors]
    got += [torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for p in (attn.key.weight, attn.key.bias, attn.value.weight, attn.value.bias)]
    for t in [*tensors, *attn.parameters()]:
        t.grad = None
    return got


def test_folded_attention_equals_projected_keys_values_with_gradients():
    attn = _attention()
    q, x = _inputs(attn)
    ref = F.scaled_dot_product_attention(q, *attn.keys_values(x))
    ref_grads = _grads(ref, [q, x], attn)
    got = attn.attend_folded(q, x)
    got_grads = _grads(got, [q, x], attn)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    names = ["q", "features", "key.weight", "key.bias", "value.weight", "value.bias"]
    for name, a, b in zip(names, got_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)


def test_key_bias_gets_a_zero_gradient_for_ddp():
    attn = _attention()
    q, x = _inputs(attn)
    attn.attend_folded(q, x).sum().backward()
    assert attn.key.bias.grad is not None  # DDP without find_unused_parameters needs one
    assert torch.count_nonzero(attn.key.bias.grad) == 0


def test_folded_attention_with_dropout_equals_projected_with_the_same_mask(monkeypatch):
    attn = _attention()
    q, x = _inputs(attn)
    p = 0.3
    keep = torch.rand(q.shape[0], q.shape[1] * q.shape[2], x.shape[1],
                      generator=torch.Generator().manual_seed(5)) > p

    def fixed_dropout(t, prob, *a, **k):  # the same mask on both sides, rescaled as F.dropout
        assert prob == p
        return t * keep.view(t.shape).to(t.dtype) / (1 - prob)

    monkeypatch.setattr(qf.F, "dropout", fixed_dropout)
    got = attn.attend_folded(q, x, dropout_p=p)

    k, v = attn.keys_values(x)
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    ref = fixed_dropout(probs.reshape(keep.shape), p).view(probs.shape) @ v
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_folding_is_chosen_by_cost_and_only_for_a_single_pass():
    attn = _attention(hidden=768, heads=12, kv_width=1408)  # BLIP-2's Q-Former over ViT-g
    assert attn.folding_pays(32, 257)  # stage 2: 32 queries per image
    assert not attn.folding_pays(32 * 4, 257)  # many rows per image: project once instead

    model = qf.QFormerModel(qf.qformer_config(
        BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64), num_query_token=4, vision_width=24,
        cross_attention_freq=2))
    feats = torch.randn(3, 17, 24)
    folded, shared = model.image_kv(feats, rows_per_image=4), model.image_kv(feats)
    assert isinstance(folded.layers[0], FoldedImage) and folded.layers[1] is None
    assert isinstance(shared.layers[0], tuple) and not isinstance(shared.layers[0], FoldedImage)
    picked = folded.select(torch.tensor([2, 0]))
    torch.testing.assert_close(picked.layers[0].feats, feats[[2, 0]])


@pytest.mark.parametrize("repeats", [1, 2])
def test_query_pass_equals_with_and_without_folding(repeats):
    torch.manual_seed(0)
    model = qf.QFormerModel(qf.qformer_config(
        BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                   intermediate_size=64, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0), num_query_token=4, vision_width=24,
        cross_attention_freq=2))
    feats = torch.randn(3, 17, 24, requires_grad=True)
    queries = torch.randn(3 * repeats, 4, 32)

    def run(kv):
        hidden, _ = model(query_embeds=queries, image_kv=kv._replace(repeats=repeats))
        hidden.square().sum().backward()
        grads = [feats.grad.clone()] + [p.grad.clone() for p in model.parameters()
                                        if p.grad is not None]
        model.zero_grad(set_to_none=True)
        feats.grad = None
        return hidden.detach(), grads

    kv = model.image_kv(feats, rows_per_image=4)
    assert sum(isinstance(e, FoldedImage) for e in kv.layers) == 2
    got, got_grads = run(kv)
    ref, ref_grads = run(model.image_kv(feats))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert len(got_grads) == len(ref_grads)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

