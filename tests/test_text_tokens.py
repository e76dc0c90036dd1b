"""Tokenisation in the data loader's collate (issue #14, item 3).

- BERT's fast tokenizer is used only where its ids equal the slow one's (LAVIS's), checked on
  the shipped tiny vocabulary and hard strings; otherwise the slow one is kept;
- a batch tokenised by the loader (``pretokenize``) gives the same losses as raw text, for the
  stage-1 and OPT models, through the runner's collate;
- the runner does not pre-tokenise for tasks that rewrite the text before calling the model;
- persistent loader workers see each epoch's augmentation seeds (same losses as no workers).
"""
from __future__ import annotations

import json

import pytest
import torch

from test_runner import Regressor, _runner
from test_sync_free_step import Captions, make_runner


def test_fast_bert_tokenizer_equals_slow_on_vocab_and_hard_strings(lp):
    from transformers import BertTokenizerFast

    from lavis_plugins.api import load_model_and_preprocess
    from lavis_plugins.models.text_tokens import HARD_STRINGS, vocabulary_probes

    model, _, _ = load_model_and_preprocess("lp_blip2_qformer", "tiny")
    slow, fast = model.tokenizer, model.text_tokenizer
    assert isinstance(fast, BertTokenizerFast)  # taken: it agrees on this vocabulary
    texts = [*HARD_STRINGS, *vocabulary_probes(slow), "[DEC] a red circle"]
    for kwargs in ({}, {"padding": "longest", "truncation": True, "max_length": 16}):
        a, b = slow(texts, **kwargs), fast(texts, **kwargs)
        assert a["input_ids"] == b["input_ids"] and a["attention_mask"] == b["attention_mask"]
    assert len(HARD_STRINGS[-1]) > 1000 and "" in HARD_STRINGS  # long and empty are probed


def test_fast_tokenizer_that_differs_is_not_used(lp, caplog):
    from lavis_plugins.api import load_model_and_preprocess
    from lavis_plugins.models.text_tokens import fast_if_equal

    model, _, _ = load_model_and_preprocess("lp_blip2_qformer", "tiny")
    slow = model.tokenizer

    class Lossy:  # a "fast" tokenizer that reads one word differently
        def __call__(self, texts, **kwargs):
            return slow([t.replace("circle", "square") for t in texts], **kwargs)

    assert fast_if_equal(slow, Lossy) is slow
    assert "keeping the slow one" in caplog.text
    assert fast_if_equal(slow, lambda: None) is slow
    assert fast_if_equal(slow, lambda: slow) is slow


@pytest.mark.parametrize("name,keys", [
    ("lp_blip2_qformer", ("text_input_ids", "text_attention_mask")),
    ("lp_blip2_opt", ("llm_input_ids", "llm_attention_mask", "llm_targets"))])
def test_loader_tokenised_batch_gives_the_raw_text_losses(lp, tmp_path, name, keys):
    from lavis_plugins.api import load_model_and_preprocess

    torch.manual_seed(0)
    model, _, _ = load_model_and_preprocess(name, "tiny")
    model.eval()  # no dropout: the two forwards must agree exactly
    runner = make_runner(tmp_path, model, Captions(), name)
    batch = next(runner.dataloaders["train"].epoch_batches(0))
    assert set(keys) <= set(batch) and batch[keys[0]].dtype == torch.long
    raw = {k: v for k, v in batch.items() if k not in keys}
    with torch.no_grad():
        torch.manual_seed(1)  # ITM draws its negatives
        pre = model(batch)
        torch.manual_seed(1)
        plain = model(raw)
    for k in pre.keys():
        if k.startswith("loss"):
            torch.testing.assert_close(pre[k], plain[k], rtol=0, atol=1e-6)


def test_no_pretokenising_for_a_task_that_rewrites_the_text(lp, tmp_path):
    from lavis.tasks.base_task import BaseTask

    from lavis_plugins.api import load_model_and_preprocess
    from lavis_plugins.runners.runner import PluginRunner

    class Rewrites(BaseTask):
        def train_step(self, model, samples):
            return model(dict(samples,
                              text_input=[t.upper() for t in samples["text_input"]]))["loss"]

    model, _, _ = load_model_and_preprocess("lp_blip2_qformer", "tiny")
    runner = make_runner(tmp_path, model, Captions(), "rewrites")
    assert "text_input_ids" in next(runner.dataloaders["train"].epoch_batches(0))
    runner = PluginRunner(cfg=runner.config, task=Rewrites(), model=model,
                          datasets={"d": {"train": Captions()}}, job_id="rewrites2")
    assert "text_input_ids" not in next(runner.dataloaders["train"].epoch_batches(0))


def test_persistent_workers_see_each_epochs_augmentation(lp, tmp_path):
    """Workers kept across epochs hold their own dataset copy: the epoch must travel with the
    indices, or epoch 1 would repeat epoch 0's augmentation noise."""
    def losses(job, **run):
        torch.manual_seed(0)
        runner = _runner(tmp_path, Regressor(dropout=0.0), job=job, **run)
        runner.train()
        return [json.loads(l)["loss"] for l in
                (runner.output_dir / "train_log.jsonl").read_text().splitlines()]

    ref = losses("in_process")
    kept = losses("persistent", num_workers=1, persistent_workers=True, prefetch_factor=3)
    assert kept == pytest.approx(ref, rel=1e-6, abs=1e-7)
    runner = _runner(tmp_path, Regressor(), job="opts", num_workers=2, prefetch_factor=3)
    loader = runner.dataloaders["train"].loader  # the stream's torch DataLoader
    assert loader.persistent_workers and loader.prefetch_factor == 3  # persistent by default
