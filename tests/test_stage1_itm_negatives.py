"""``itm_negatives`` of lp_blip2_qformer: "hard" (BLIP-2's, the default, unchanged: the parity
tests use it), "mixed" (half hard, half uniform) and "random"; a bad value is refused."""
from __future__ import annotations

import pytest
import torch


def test_mixed_weights_are_half_itc_half_uniform():
    from lavis_plugins.models.blip2_qformer import _mix_uniform

    w = torch.softmax(torch.randn(3, 6), dim=1)
    mixed = _mix_uniform(w, "mixed")
    torch.testing.assert_close(mixed, 0.5 * w + 0.5 / 6)
    torch.testing.assert_close(mixed.sum(1), torch.ones(3))
    torch.testing.assert_close(_mix_uniform(w, "random"), torch.full((3, 6), 1 / 6))


@pytest.mark.parametrize("mode", ["hard", "mixed", "random"])
def test_each_mode_trains_and_never_draws_the_positive(lp, tiny_bert_dir, mode, monkeypatch):
    model = lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir),
                          itm_negatives=mode)
    drawn = []
    real = torch.multinomial

    def spy(weights, n, *a, **kw):
        drawn.append(weights.clone())
        return real(weights, n, *a, **kw)

    monkeypatch.setattr(torch, "multinomial", spy)
    torch.manual_seed(0)
    out = model({"image": torch.randn(4, 3, 32, 32),
                 "text_input": ["a red circle", "a blue square", "two shapes", "a green one"]})
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert len(drawn) == 2
    for w in drawn:  # (B, B): the positive (diagonal) has weight 0
        assert (w.diagonal() == 0).all()
        off = w[~torch.eye(4, dtype=torch.bool)]
        if mode == "random":
            assert torch.allclose(off, off[0].expand_as(off))
        if mode == "mixed":
            assert (off >= 0.5 / 4 - 1e-6).all()  # every other pair keeps its uniform half


def test_bad_value_is_refused(lp, tiny_bert_dir):
    from lavis_plugins.common.errors import UserError

    with pytest.raises(UserError, match="itm_negatives = 'easy'.*hard.*mixed.*random"):
        lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir),
                      itm_negatives="easy")
