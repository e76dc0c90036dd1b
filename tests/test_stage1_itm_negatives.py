"""``itm_negatives`` of lp_blip2_qformer: "hard" (BLIP-2's, the default, unchanged: the parity
tests use it), "mixed" (half hard, half uniform), "random" and "curriculum" (random to hard over
``itm_curriculum_epochs``, by the batch's place in training); ``itm_negatives_per_positive`` (N
distinct negatives per image and per text, each weighted 1/N; 1 is BLIP-2's); bad values are
refused."""
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


# ------------------------------------------------------------------ itm_negatives_per_positive


def test_one_negative_per_positive_draws_what_blip2_draws():
    """N 1 is BLIP-2's ``multinomial(weights, 1)``: the same indices from the same generator
    state, and the plain mean cross-entropy (the LAVIS parity tests run with this default)."""
    from lavis_plugins.models.itm_negatives import draw_negatives, itm_loss

    w = torch.softmax(torch.randn(5, 5), dim=1).fill_diagonal_(0)
    torch.manual_seed(3)
    expected = torch.multinomial(w, 1).squeeze(1)
    torch.manual_seed(3)
    assert torch.equal(draw_negatives(w, 1), expected)
    logits = torch.randn(15, 2)
    labels = torch.tensor([1] * 5 + [0] * 10)
    loss, acc = itm_loss(logits, 5, 1)
    assert torch.equal(loss, torch.nn.functional.cross_entropy(logits, labels))
    assert acc == (logits.argmax(1) == labels).float().mean()


def test_n_negatives_are_distinct_never_the_positive_and_laid_out_by_round():
    from lavis_plugins.models.itm_negatives import draw_negatives

    b, n = 6, 4
    torch.manual_seed(0)
    for _ in range(20):
        w = (torch.softmax(torch.randn(b, b) * 5, dim=1) + 1e-4).fill_diagonal_(0)
        neg = draw_negatives(w, n)
        assert neg.shape == (n * b,)
        per_row = neg.view(n, b).t()  # index j*B + i is row i's j-th negative
        for i in range(b):
            assert len(set(per_row[i].tolist())) == n  # without replacement
            assert i not in per_row[i].tolist()


def test_each_negative_weighs_one_nth():
    """N negatives per positive with equal logits give the loss of one negative per positive:
    the positives keep BLIP-2's share (1/3) of the loss, whatever N."""
    from lavis_plugins.models.itm_negatives import itm_loss

    b, n = 4, 3
    pos, neg_t, neg_i = torch.randn(b, 2), torch.randn(b, 2), torch.randn(b, 2)
    one, _ = itm_loss(torch.cat([pos, neg_t, neg_i]), b, 1)
    many, acc = itm_loss(torch.cat([pos, neg_t.repeat(n, 1), neg_i.repeat(n, 1)]), b, n)
    torch.testing.assert_close(many, one)
    # unequal negatives: the weighted mean, by hand
    logits = torch.randn((1 + 2 * n) * b, 2)
    per = torch.nn.functional.cross_entropy(
        logits, (torch.arange(len(logits)) < b).long(), reduction="none")
    torch.testing.assert_close(itm_loss(logits, b, n)[0],
                               (per[:b].sum() + per[b:].sum() / n) / (3 * b))


def test_model_reads_one_plus_2n_pairs_with_distinct_negatives(lp, tiny_bert_dir, monkeypatch):
    """lp_blip2_qformer with N 3 and hard (default) negatives: the ITM pass scores 7B pairs, each
    image's 3 negative texts (and each text's 3 negative images) differ and are never its own, and
    every trainable parameter of the ITM path gets a gradient."""
    from lavis_plugins.models import blip2_qformer

    model = lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir),
                          itm_negatives_per_positive=3)
    drawn, shapes = [], []
    real_draw, real_loss = blip2_qformer.draw_negatives, blip2_qformer.itm_loss

    def spy_draw(weights, n):
        out = real_draw(weights, n)
        drawn.append(out)
        return out

    def spy_loss(logits, b, n):
        shapes.append((tuple(logits.shape), b, n))
        return real_loss(logits, b, n)

    monkeypatch.setattr(blip2_qformer, "draw_negatives", spy_draw)
    monkeypatch.setattr(blip2_qformer, "itm_loss", spy_loss)
    torch.manual_seed(0)
    out = model({"image": torch.randn(5, 3, 32, 32),
                 "text_input": ["a red circle", "a blue square", "two shapes", "a green one",
                                "a large red square"]})
    assert shapes == [((35, 2), 5, 3)]
    assert len(drawn) == 2
    for neg in drawn:
        per_row = neg.view(3, 5).t()
        for i in range(5):
            assert len(set(per_row[i].tolist())) == 3 and i not in per_row[i].tolist()
    assert torch.isfinite(out.loss) and 0 <= float(out.acc_itm) <= 1
    out.loss_itm.backward()
    assert model.itm_head.weight.grad is not None and model.itm_head.weight.grad.abs().sum() > 0


_RULES = {"itm_negatives_per_positive": r"must be an integer >= 1 \(1: BLIP-2's one negative "
                                        r"per positive\)",
          "itm_loss_weight": r"must be a finite number > 0 \(1: BLIP-2's equal weights of ITC, "
                             r"ITM and ITG\)"}


@pytest.mark.parametrize("key, value", [
    *[("itm_negatives_per_positive", v) for v in (0, -2, 1.5, "two", True)],
    *[("itm_loss_weight", v) for v in (0, -1.0, float("inf"), float("nan"), "two", True)]])
def test_bad_itm_option_is_refused(lp, tiny_bert_dir, key, value):
    from lavis_plugins.common.errors import UserError

    with pytest.raises(UserError, match=rf"^lp_blip2_qformer: {key} = .*: it {_RULES[key]}$"):
        lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir), **{key: value})


def test_too_small_a_batch_for_n_negatives_names_the_option(lp, tiny_bert_dir):
    """4 pairs hold only 3 distinct negatives per positive: N 4 is refused at the step."""
    from lavis_plugins.common.errors import UserError

    model = lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir),
                          itm_negatives_per_positive=4)
    with pytest.raises(UserError, match=r"at least 5 image-text pairs per step to draw 4 distinct "
                                        r"negative\(s\) per positive.*itm_negatives_per_"
                                        r"positive"):
        model({"image": torch.randn(4, 3, 32, 32), "text_input": ["a", "b", "c", "d"]})


def test_negatives_per_positive_through_the_cli(lp, tmp_path, tiny_bert_dir, monkeypatch):
    """``lavis-plugins train`` with ``model.itm_negatives_per_positive=2`` and ``mixed``
    negatives: every step's ITM pass reads 5B pairs (batch 4: 20); a bad value is one line."""
    from test_stage1_survey_options import _train_yaml

    from lavis_plugins import cli
    from lavis_plugins.common.errors import UserError
    from lavis_plugins.models import blip2_qformer

    rows = []
    real = blip2_qformer.itm_loss
    monkeypatch.setattr(blip2_qformer, "itm_loss",
                        lambda logits, b, n: rows.append(logits.shape[0]) or real(logits, b, n))
    yaml = _train_yaml(tmp_path, tiny_bert_dir)
    runner, _ = cli.run(str(yaml), ["model.itm_negatives_per_positive=2",
                                    "model.itm_negatives=mixed"], evaluate_only=False, job_id="n2")
    assert rows == [20] * 4  # 2 epochs x 2 steps
    with pytest.raises(UserError, match=r"^lp_blip2_qformer: itm_negatives_per_positive = 0: it "
                                        r"must be an integer >= 1"):
        cli.run(str(yaml), ["model.itm_negatives_per_positive=0"], evaluate_only=False,
                job_id="bad")


def _two_rank_worker(rank: int, init_file: str, model, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    from lavis_plugins.models import blip2_qformer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    drawn, rows = [], []
    real_draw, real_loss = blip2_qformer.draw_negatives, blip2_qformer.itm_loss
    blip2_qformer.draw_negatives = lambda w, n: drawn.append(real_draw(w, n)) or drawn[-1]
    blip2_qformer.itm_loss = lambda logits, b, n: rows.append(logits.shape[0]) or real_loss(
        logits, b, n)
    torch.manual_seed(rank)
    caps = ["a red circle", "a blue square", "two shapes", "a green one"]
    out = model({"image": torch.randn(2, 3, 32, 32), "text_input": caps[2 * rank:2 * rank + 2]})
    out.loss.backward()
    torch.save({"rows": rows, "drawn": drawn, "loss": out.loss.detach()},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_negatives_per_positive_across_two_processes(lp, tmp_path, tiny_bert_dir):
    """2 gloo processes of 2 pairs each, N 3: each rank draws its 3 distinct negatives from the 4
    pairs of both ranks (more than it holds), never its own pair, and scores 7 x 2 ITM rows."""
    from conftest import run_forked

    model = lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir),
                          itm_negatives_per_positive=3)
    run_forked(_two_rank_worker, [(r, str(tmp_path / "init"), model, str(tmp_path))
                                  for r in range(2)])
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["rows"] == [14] and torch.isfinite(got["loss"])
        for neg in got["drawn"]:  # (3*2,) indices into the 4 gathered pairs
            per_row = neg.view(3, 2).t()
            for i in range(2):
                assert len(set(per_row[i].tolist())) == 3
                assert 2 * rank + i not in per_row[i].tolist()


# ------------------------------------------------------------------ itm_loss_weight


def _step_with_weight(lp, tiny_bert_dir, weight):
    """One training step of the same tiny model and batch (same seed: same negatives) with
    ``itm_loss_weight``; returns the output and the ITM head's and query tokens' gradients."""
    torch.manual_seed(0)
    model = lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir),
                          itm_loss_weight=weight)
    torch.manual_seed(1)
    out = model({"image": torch.randn(4, 3, 32, 32),
                 "text_input": ["a red circle", "a blue square", "two shapes", "a green one"]})
    out.loss.backward()
    return out, model.itm_head.weight.grad.clone(), model.query_tokens.grad.clone()


def test_itm_loss_weight_scales_the_itm_term_and_its_gradients(lp, tiny_bert_dir):
    """Weight w: loss = ITC + w ITM + ITG (loss_itm reported unweighted), the ITM head (which
    only ITM trains) gets w times weight 1's gradient, and the shared Q-Former's gradient moves;
    the default 1 is BLIP-2's plain sum, bit for bit."""
    one, head_one, query_one = _step_with_weight(lp, tiny_bert_dir, 1.0)
    assert torch.equal(one.loss, one.loss_itc + one.loss_itm + one.loss_itg)
    three, head_three, query_three = _step_with_weight(lp, tiny_bert_dir, 3)
    torch.testing.assert_close(three.loss_itm, one.loss_itm)
    torch.testing.assert_close(three.loss, three.loss_itc + 3 * three.loss_itm + three.loss_itg)
    torch.testing.assert_close(head_three, 3 * head_one)
    assert not torch.allclose(query_three, query_one)


def test_itm_loss_weight_through_the_cli(lp, tmp_path, tiny_bert_dir):
    """``lavis-plugins train`` with ``model.itm_loss_weight=2``: every logged step's loss is
    ITC + 2 ITM + ITG (4 steps, logged each); a bad value is refused in one line."""
    import json

    from test_stage1_survey_options import _train_yaml

    from lavis_plugins import cli
    from lavis_plugins.common.errors import UserError

    yaml = _train_yaml(tmp_path, tiny_bert_dir)
    # the shared YAML's CyCLIP terms off: the loss is then the three BLIP-2 terms
    cli.run(str(yaml), ["model.itm_loss_weight=2", "model.cyclip=False"], evaluate_only=False,
            job_id="w2")
    log = [json.loads(x) for x in (tmp_path / "out" / "w2" / "train_log.jsonl").read_text()
           .splitlines() if x.strip()]
    steps = [r for r in log if "loss_itm" in r]
    assert len(steps) == 4
    for r in steps:
        assert r["loss"] == pytest.approx(r["loss_itc"] + 2 * r["loss_itm"] + r["loss_itg"],
                                          rel=1e-5)
    with pytest.raises(UserError, match=r"^lp_blip2_qformer: itm_loss_weight = -1: it must be a "
                                        r"finite number > 0"):
        cli.run(str(yaml), ["model.itm_loss_weight=-1"], evaluate_only=False, job_id="bad")
