"""OPT's training forward without padding rows (``lavis_plugins/models/_opt_packed.py``) equals
transformers' ``OPTDecoder`` on the rows the loss reads: outputs and input gradients, for OPT's
layer-norm-before layout (125m, 2.7b, ...) and 350m's after layout with its input/output
projections; the row bookkeeping by hand; dropout applied in training; the cases that keep
transformers' own forward. Model-level parity (loss = LAVIS, gradients = the padded path) is in
``tests/test_stage2_parity.py``."""
from __future__ import annotations

import pytest
import torch
from transformers import OPTConfig
from transformers.models.opt.modeling_opt import OPTDecoder

from lavis_plugins.models import _opt_packed as op

B, NQ, T, VOCAB = 4, 3, 7, 40


def _decoder(before: bool = True, proj: int = 0, dropout: float = 0.0, **kw) -> OPTDecoder:
    torch.manual_seed(0)
    extra = {"word_embed_proj_dim": proj} if proj else {}
    cfg = OPTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=48,
                    vocab_size=VOCAB, max_position_embeddings=32, do_layer_norm_before=before,
                    dropout=dropout, **extra, **kw)
    decoder = OPTDecoder(cfg).eval()
    op.install_packed_forward(decoder)  # as lp_blip2_opt does when it builds its LLM
    return decoder


def _batch(width: int):
    """Right-padded captions of lengths 7, 2, 5, 1 behind NQ query rows; targets -100 at the
    padding, the first two tokens of sample 0 (a prompt) and all of sample 3 (no target)."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([7, 2, 5, 1])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    targets = torch.randint(4, VOCAB, (B, T), generator=g).masked_fill(mask == 0, -100)
    targets[0, :2] = -100
    targets[3] = -100
    embeds = torch.randn(B, NQ + T, width, generator=g, requires_grad=True)
    full = torch.cat([torch.ones(B, NQ, dtype=torch.long), mask], dim=1)
    return mask, targets, embeds, full


@pytest.mark.parametrize("before,proj", [(True, 0), (False, 16), (True, 16)],
                         ids=["ln-before", "ln-after+proj", "ln-before+proj"])
def test_rows_and_input_gradients_equal_transformers(before, proj):
    decoder = _decoder(before, proj)
    mask, targets, embeds, full = _batch(proj or 32)
    rows = op.text_rows(mask, targets)
    layout = op.packed_layout(rows, B, NQ, T, embeds.device)
    ours = op.opt_hidden_for_loss(decoder, embeds, full, layout)
    ref = decoder(inputs_embeds=embeds, attention_mask=full).last_hidden_state
    ref = ref[:, NQ - 1:-1].flatten(0, 1)[(targets != -100).flatten()]  # the loss's rows
    assert ours.shape == ref.shape == (int((targets != -100).sum()), proj or 32)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    g_ours, = torch.autograd.grad((ours * weights).sum(), embeds)
    g_ref, = torch.autograd.grad((ref * weights).sum(), embeds)
    assert torch.allclose(g_ours, g_ref, atol=1e-5, rtol=0)
    assert g_ours[1, NQ + 2:].abs().sum() == 0  # padding rows feed nothing
    assert torch.equal(op.select_targets(targets, rows), targets[targets != -100])


def test_layout_by_hand():
    # two samples, 2 query rows, captions of 3 and 1 tokens: L = 5
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    targets = torch.tensor([[-100, 5, 6], [7, -100, -100]])
    layout = op.packed_layout(op.text_rows(mask, targets), 2, 2, 3, torch.device("cpu"))
    assert layout.keep.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # sample 1's rows 8, 9 are padding
    # target i of sample b is predicted by row b * 5 + 2 - 1 + i
    assert layout.out.tolist() == [2, 3, 6]
    assert layout.keep[layout.out_in_keep].tolist() == layout.out.tolist()


def test_no_target_gives_no_rows():
    decoder = _decoder()
    mask, targets, embeds, full = _batch(32)
    targets = torch.full_like(targets, -100)
    layout = op.packed_layout(op.text_rows(mask, targets), B, NQ, T, embeds.device)
    assert op.opt_hidden_for_loss(decoder, embeds, full, layout).shape == (0, 32)


def test_dropout_applies_in_training_only():
    mask, targets, embeds, full = _batch(32)
    layout = op.packed_layout(op.text_rows(mask, targets), B, NQ, T, embeds.device)
    decoder = _decoder(dropout=0.3)
    evaluated = op.opt_hidden_for_loss(decoder, embeds, full, layout)
    decoder.train()
    first = op.opt_hidden_for_loss(decoder, embeds, full, layout)
    second = op.opt_hidden_for_loss(decoder, embeds, full, layout)
    assert not torch.allclose(first, evaluated) and not torch.allclose(first, second)
    # a rate of 0 leaves training mode equal to evaluation
    still = _decoder(dropout=0.0).train()
    assert torch.allclose(op.opt_hidden_for_loss(still, embeds, full, layout), evaluated, atol=1e-6)


def test_transformers_forward_kept_where_packing_would_change_it():
    decoder = _decoder(layerdrop=0.2)
    assert op.supports_packing(decoder)  # layerdrop acts in training only
    assert not op.supports_packing(decoder.train())
    decoder = _decoder().train()
    assert op.supports_packing(decoder)
    decoder.gradient_checkpointing = True
    assert not op.supports_packing(decoder)
    assert not op.supports_packing(torch.nn.Linear(2, 2))  # another LLM's decoder
    decoder = _decoder()
    del decoder.embed_positions.offset  # a transformers version laid out otherwise
    assert not op.supports_packing(decoder)
    decoder = _decoder()
    del decoder.layers[1].forward
    del decoder.layers[1].fc1  # a layer without a part the packed layer reads
    op.install_packed_forward(decoder)
    assert not op.supports_packing(decoder)


class _Wrapper(torch.nn.Module):
    """As FSDP (``run.strategy: fsdp``) wraps a layer: the call goes through the wrapper, which
    gathers the weights and calls the layer."""

    def __init__(self, inner):
        super().__init__()
        self._fsdp_wrapped_module = inner
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self._fsdp_wrapped_module(*args, **kwargs)


def test_packed_layers_run_through_each_layers_call():
    """The packed path calls every layer (its wrapper under FSDP), never its parts alone: a
    sharded layer's weights exist only inside that call. The two-process FSDP check is
    test_fsdp.py::test_blip2_models_under_fsdp_train_as_under_ddp."""
    decoder = _decoder()
    mask, targets, embeds, full = _batch(32)
    layout = op.packed_layout(op.text_rows(mask, targets), B, NQ, T, embeds.device)
    plain = op.opt_hidden_for_loss(decoder, embeds, full, layout)
    decoder.layers[1] = _Wrapper(decoder.layers[1])
    assert op.supports_packing(decoder)
    assert torch.equal(op.opt_hidden_for_loss(decoder, embeds, full, layout), plain)
    assert decoder.layers[1].calls == 1
    # transformers' own forward still runs through the same layers
    decoder(inputs_embeds=embeds, attention_mask=full)
    assert decoder.layers[1].calls == 2


def test_layers_without_the_installed_forward_keep_transformers_forward():
    decoder = _decoder()
    del decoder.layers[2].forward  # the class's forward again
    assert not op.supports_packing(decoder)
    decoder.layers[2] = _Wrapper(torch.nn.Linear(2, 2))  # a wrapper around something else
    assert not op.supports_packing(decoder)
