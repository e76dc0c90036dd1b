"""Streamed train splits (shards, mixtures) read like map-style ones (issue #14, item 3):

- their batches are tokenised in the loader's collate (the model's ``pretokenize``), in its
  workers too, with the ids ``forward`` would make from the raw text;
- every member of a mixture gets the run's worker settings (``num_workers``,
  ``persistent_workers``, ``prefetch_factor``), which one function ties to having workers, so
  a bad combination is one line for a mixture as for a lone split.
"""
from __future__ import annotations

import pytest
import torch

from test_sync_free_step import Captions
from test_train_streams import _runner, _shard_dataset

QFORMER_KEYS = ("text_input_ids", "text_attention_mask")
OPT_KEYS = ("llm_input_ids", "llm_attention_mask", "llm_targets")


def _forward_tokens(model, name: str, raw) -> tuple:
    """What ``forward`` tokenises from the raw text when the batch holds no ids."""
    if name == "lp_blip2_qformer":
        enc = model.tokenize(raw["text_input"], raw)
        return enc.input_ids, enc.attention_mask
    return model._training_tokens(raw, torch.device("cpu"))


@pytest.mark.parametrize("name,keys,workers", [
    ("lp_blip2_qformer", QFORMER_KEYS, 1),  # tokenised in the members' worker processes
    ("lp_blip2_opt", OPT_KEYS, 0)])
def test_streamed_batches_carry_the_ids_forward_would_make(lp, tmp_path, name, keys, workers):
    from lavis_plugins.api import load_model_and_preprocess

    model, _, _ = load_model_and_preprocess(name, "tiny")
    runner = _runner(tmp_path, name, {"map": {"train": Captions(n=16)},
                                      "web": {"train": _shard_dataset(tmp_path, n=16)}},
                     run={"num_workers": workers}, model=model)
    stream = runner.dataloaders["train"]
    assert type(stream).__name__ == "MixtureLoader"
    seen = set()
    for batch in stream.epoch_batches(0):
        seen.add("web" if "sample_key" in batch else "map")
        assert set(keys) <= set(batch) and batch[keys[0]].dtype == torch.long
        raw = {k: v for k, v in batch.items() if k not in keys}
        for got, own in zip((batch[k] for k in keys), _forward_tokens(model, name, raw)):
            assert torch.equal(got, own)
    assert seen == {"web", "map"}
    # a shard split alone is tokenised too
    runner = _runner(tmp_path, name + "_alone", {"web": {"train": _shard_dataset(tmp_path)}},
                     model=model)
    assert set(keys) <= set(next(runner.dataloaders["train"].epoch_batches(0)))


def test_mixture_members_get_the_runs_worker_settings(lp, tmp_path):
    datasets = {"map": {"train": Captions(n=16)}, "web": {"train": _shard_dataset(tmp_path)}}
    runner = _runner(tmp_path, "workers", datasets,
                     run={"num_workers": 2, "prefetch_factor": 3})
    map_member, shard_member = runner.dataloaders["train"].members
    assert map_member.loader.num_workers == 2 and map_member.loader.prefetch_factor == 3
    assert map_member.loader.persistent_workers  # persistent by default, as a lone split
    shard_loader = shard_member.epoch_loader()
    assert shard_loader.num_workers == 2 and shard_loader.prefetch_factor == 3
    # shard workers start with each epoch (the epoch is set in the dataset before they fork)
    assert not shard_loader.persistent_workers
    runner = _runner(tmp_path, "not_kept", datasets,
                     run={"num_workers": 1, "persistent_workers": False})
    assert not runner.dataloaders["train"].members[0].loader.persistent_workers


@pytest.mark.parametrize("key,value", [("prefetch_factor", 4), ("persistent_workers", True)])
def test_worker_options_without_workers_are_one_line_for_streams(lp, tmp_path, key, value):
    from lavis_plugins.common.errors import UserError

    for job, datasets in (
            ("mixture", {"map": {"train": Captions(n=16)},
                         "web": {"train": _shard_dataset(tmp_path)}}),
            ("shards", {"web": {"train": _shard_dataset(tmp_path)}})):
        runner = _runner(tmp_path, f"{job}_{key}", datasets, run={key: value})
        with pytest.raises(UserError, match=rf"^run\.{key} is {value!r} but run\.num_workers "
                                            rf"is 0 .*set run\.num_workers > 0 or remove "
                                            rf"run\.{key}$"):
            runner.dataloaders  # noqa: B018 - the loaders are made on first use
