"""``itm_negatives`` of lp_blip2_qformer: "hard" (BLIP-2's, the default, unchanged: the parity
tests use it), "mixed" (half hard, half uniform), "random" and "curriculum" (random to hard over
``itm_curriculum_epochs``, by the batch's place in training); bad values are refused."""
from __future__ import annotations

import pytest
import torch


def _weights(mode, samples=None, epochs=3.0):
    from lavis_plugins.models.itm_negatives import hard_share, mix_weights

    torch.manual_seed(0)
    w = torch.softmax(torch.randn(3, 6), dim=1)
    share = hard_share(mode, samples or {}, epochs, w.device)
    return w, (w if share is None else mix_weights(w, share))


def test_mixed_weights_are_half_itc_half_uniform():
    w, mixed = _weights("mixed")
    assert torch.equal(mixed, 0.5 * w + 0.5 * torch.full_like(w, 1 / 6))  # as before curriculum
    torch.testing.assert_close(mixed.sum(1), torch.ones(3))
    assert torch.equal(_weights("random")[1], torch.full((3, 6), 1 / 6))
    w, hard = _weights("hard")
    assert hard is w  # untouched: LAVIS's sampling, bit for bit


def _at(epoch, it, n=10):
    return {"epoch": epoch, "iters": it, "num_iters_per_epoch": n}


def test_curriculum_moves_from_random_to_hard_over_its_epochs():
    w, start = _weights("curriculum", _at(0, 0))
    torch.testing.assert_close(start, _weights("random")[1])
    # 1.5 of 3 epochs: share 0.5 hard, i.e. mixed
    torch.testing.assert_close(_weights("curriculum", _at(1, 5))[1], _weights("mixed")[1])
    torch.testing.assert_close(_weights("curriculum", _at(2, 4))[1], 0.8 * w + 0.2 / 6)
    torch.testing.assert_close(_weights("curriculum", _at(3, 0))[1], w)  # hard from epoch 3
    torch.testing.assert_close(_weights("curriculum", _at(7, 2))[1], w)
    # the span is the option's: 1.5 of 6 epochs is a quarter of the way
    torch.testing.assert_close(_weights("curriculum", _at(1, 5), epochs=6.0)[1],
                               0.25 * w + 0.75 / 6)
    # a batch that does not say where it is (a direct call) gets the end state: hard
    torch.testing.assert_close(_weights("curriculum", {})[1], w)


@pytest.mark.parametrize("mode", ["hard", "mixed", "random", "curriculum"])
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
                 "text_input": ["a red circle", "a blue square", "two shapes", "a green one"],
                 **_at(0, 5)})  # as the runner passes: 5 of 10 iters in, 1/6 of the way
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert len(drawn) == 2
    for w in drawn:  # (B, B): the positive (diagonal) has weight 0
        assert (w.diagonal() == 0).all()
        off = w[~torch.eye(4, dtype=torch.bool)]
        if mode == "random":
            assert torch.allclose(off, off[0].expand_as(off))
        if mode == "curriculum":  # 1/6 hard: every other pair keeps 5/6 of its uniform share
            assert (off >= 5 / 6 / 4 - 1e-6).all() and not torch.allclose(off, off[0])
        if mode == "mixed":
            assert (off >= 0.5 / 4 - 1e-6).all()  # every other pair keeps its uniform half


def test_bad_value_is_refused(lp, tiny_bert_dir):
    from lavis_plugins.common.errors import UserError

    with pytest.raises(UserError,
                       match="itm_negatives = 'easy'.*hard.*mixed.*random.*curriculum"):
        lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir),
                      itm_negatives="easy")


@pytest.mark.parametrize("value", [0, -1.0, "three", True])
def test_bad_curriculum_epochs_is_refused(lp, tiny_bert_dir, value):
    from lavis_plugins.common.errors import UserError

    with pytest.raises(UserError, match=r"itm_curriculum_epochs = .*: it must be a number of "
                                        r"epochs > 0"):
        lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir),
                      itm_negatives="curriculum", itm_curriculum_epochs=value)


def test_curriculum_through_the_cli_follows_the_runners_position(lp, tmp_path, tiny_bert_dir,
                                                                  monkeypatch):
    """``lavis-plugins train`` with ``model.itm_negatives=curriculum``: the runner's epoch and
    iteration reach the model, so the share of hard negatives rises step by step (2 epochs x 2
    steps over a 2-epoch curriculum: 0, 1/4, 1/2, 3/4); a bad span is refused in one line."""
    from test_stage1_survey_options import _train_yaml

    from lavis_plugins import cli
    from lavis_plugins.common.errors import UserError
    from lavis_plugins.models import blip2_qformer, itm_negatives

    shares = []

    def spy(*a, **kw):
        share = itm_negatives.hard_share(*a, **kw)
        shares.append(float(share))
        return share

    monkeypatch.setattr(blip2_qformer, "hard_share", spy)
    yaml = _train_yaml(tmp_path, tiny_bert_dir)
    opts = ["model.itm_negatives=curriculum", "model.itm_curriculum_epochs=2"]
    cli.run(str(yaml), opts, evaluate_only=False, job_id="curriculum")
    assert shares == pytest.approx([0.0, 0.25, 0.5, 0.75])
    with pytest.raises(UserError, match=r"^lp_blip2_qformer: itm_curriculum_epochs = 0: it must "
                                        r"be a number of epochs > 0$"):
        cli.run(str(yaml), ["model.itm_negatives=curriculum", "model.itm_curriculum_epochs=0"],
                evaluate_only=False, job_id="bad")
