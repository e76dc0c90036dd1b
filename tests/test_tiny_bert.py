"""make_tiny_bert's initialisation and dropout settings, and the demo BERT built with them."""
import torch
from transformers import BertConfig, BertForMaskedLM

from lavis_plugins.common.tiny_bert import make_tiny_bert


def test_defaults_are_bert_config_defaults(tmp_path):
    cfg = BertConfig.from_pretrained(make_tiny_bert(tmp_path / "bert"))
    default = BertConfig()
    assert cfg.initializer_range == default.initializer_range
    assert cfg.hidden_dropout_prob == default.hidden_dropout_prob
    assert cfg.attention_probs_dropout_prob == default.attention_probs_dropout_prob


def test_demo_bert_equals_a_reinitialised_tiny_bert(tmp_path):
    """make_demo_bert once re-initialised make_tiny_bert's weights from a config with no dropout
    and a wider init (seed 0); passing those settings (and the demo's sizes) to make_tiny_bert
    gives the same bits."""
    from lavis_plugins.demo import DEMO_BERT_INIT_STD, DEMO_BERT_SIZES, make_demo_bert
    from lavis_plugins.demo_data import shapes_vocabulary

    demo = make_demo_bert(tmp_path / "demo")
    cfg = BertConfig.from_pretrained(demo)
    assert cfg.hidden_dropout_prob == cfg.attention_probs_dropout_prob == 0.0
    assert cfg.initializer_range == DEMO_BERT_INIT_STD
    assert {k: getattr(cfg, k) for k in DEMO_BERT_SIZES} == DEMO_BERT_SIZES

    # the former recipe, at the demo's sizes
    old = make_tiny_bert(tmp_path / "old", words=shapes_vocabulary(), **DEMO_BERT_SIZES)
    old_cfg = BertConfig.from_pretrained(old)
    old_cfg.hidden_dropout_prob = old_cfg.attention_probs_dropout_prob = 0.0
    old_cfg.initializer_range = DEMO_BERT_INIT_STD
    torch.manual_seed(0)
    expected = BertForMaskedLM(old_cfg).state_dict()
    got = BertForMaskedLM.from_pretrained(demo).state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
