"""CapFilt with other models (issue 13): LAVIS's own ``blip_caption`` captioner and
``blip_image_text_matching`` filter, an LLM captioner (``lp_blip2_opt``), and a CLIP ranker
(LAVIS's ``clip_feature_extractor``, BLIP-2's ranking). Tiny random weights built here, offline."""
from __future__ import annotations

import json

import pytest
import torch

from test_capfilt import WORDS, _cfg, _dataset, _images, data, model  # noqa: F401 - fixtures

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                          "layers": 1}}


@pytest.fixture(scope="module")
def blip_files(tmp_path_factory, tiny_bert_dir):
    """A tiny MED (BLIP's BERT) config for LAVIS's BLIP models and an empty checkpoint: LAVIS
    always loads one, and loads non-strictly, so the weights stay random (no download)."""
    from transformers import BertTokenizer

    root = tmp_path_factory.mktemp("blip")
    import lavis

    med = json.loads((__import__("pathlib").Path(lavis.__file__).parent
                      / "configs/models/med_config.json").read_text())
    # BLIP's tokenizer adds [DEC] and [ENC] to BERT's vocabulary
    vocab = len(BertTokenizer.from_pretrained(str(tiny_bert_dir))) + 2
    med.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64, vocab_size=vocab)
    (root / "med.json").write_text(json.dumps(med))
    torch.save({"model": {}}, root / "empty.pth")
    return root


def _blip(arch, model_type, files, bert_parent, **kw):
    from lavis_plugins.api import load_model

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(bert_parent)  # LAVIS's BLIP loads the literal name "bert-base-uncased"
        torch.manual_seed(0)
        return load_model(arch, model_type, is_eval=True, med_config_path=str(files / "med.json"),
                          image_size=32, finetuned=str(files / "empty.pth"), **kw)


def test_lavis_blip_caption_is_a_batched_seeded_captioner(blip_files, tiny_bert_dir, data):  # noqa: F811
    from lavis_plugins.capfilt.candidates import check_captioner, generate_captions
    from lavis_plugins.common.errors import UserError

    cap = _blip("blip_caption", "base_coco", blip_files, tiny_bert_dir.parent)
    imgs = _images(_dataset(data), 3)
    cfg = _cfg("x")
    a = generate_captions(cap, imgs, cfg, seed=3)
    assert a == generate_captions(cap, imgs, cfg, seed=3)
    assert a != generate_captions(cap, imgs, cfg, seed=4)
    assert [len(x) for x in a] == [3, 3, 3] and all(t for x in a for t in x)
    # its prompt is a model setting: run.capfilt.prompt would be ignored by its generate
    with pytest.raises(UserError, match="captioner.prompt"):
        check_captioner(cap, _cfg("x", prompt="a photo of"))


def test_lavis_blip_itm_filter_scores_equal_one_by_one(blip_files, tiny_bert_dir, data):  # noqa: F811
    from lavis_plugins.capfilt.candidates import score_pairs

    itm = _blip("blip_image_text_matching", "base", blip_files, tiny_bert_dir.parent)
    imgs = _images(_dataset(data), 3)
    texts = WORDS[:6]
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    batched = score_pairs(itm, imgs, owner, texts, ["itm", "itc"])
    with torch.no_grad():
        one = [(itm({"image": imgs[o:o + 1], "text_input": [t]},
                    match_head="itm").softmax(-1)[0, 1],
                itm({"image": imgs[o:o + 1], "text_input": [t]}, match_head="itc")[0, 0])
               for o, t in zip(owner.tolist(), texts)]
    torch.testing.assert_close(batched["itm"], torch.stack([x[0] for x in one]), atol=1e-5,
                               rtol=1e-4)
    torch.testing.assert_close(batched["itc"], torch.stack([x[1] for x in one]), atol=1e-5,
                               rtol=1e-4)


YAML = """model:
  arch: blip_image_text_matching
  model_type: base
  med_config_path: {files}/med.json
  image_size: 32
  finetuned: {files}/empty.pth
datasets:
  lp_capfilt_input:
    build_info:
      annotations: {ann}
      images:
        storage: {images}
    vis_processor:
      eval:
        name: blip_image_eval
        image_size: 32
run:
  runner: lp_runner
  task: lp_capfilt
  batch_size_eval: 4
  num_workers: 0
  seed: 1
  device: cpu
  output_dir: {out}/logs
  evaluate: True
  test_splits: [input]
  capfilt:
    output: {out}/capfilt
    captioner:
      arch: blip_caption
      model_type: base_coco
      med_config_path: {files}/med.json
      image_size: 32
      finetuned: {files}/empty.pth
      prompt: "a picture of "
    num_captions: 2
    max_len: 8
    min_len: 2
    scores: [itm, itc]
    rank_by: itm
    top_k: 2
    report_examples: 0
"""


def test_lavis_blip_captioner_and_filter_run_in_the_task(lp, blip_files, tiny_bert_dir, data,  # noqa: F811
                                                         tmp_path, monkeypatch, capsys):
    from lavis_plugins.cli import main

    path = tmp_path / "capfilt.yaml"
    path.write_text(YAML.format(files=blip_files, ann=data / "ann.json", images=data / "images",
                                out=tmp_path))
    monkeypatch.chdir(tiny_bert_dir.parent)
    assert main(["capfilt", "--cfg-path", str(path)]) == 0, capsys.readouterr().err
    merged = json.loads((tmp_path / "capfilt" / "capfilt.json").read_text())
    assert len(merged) == 7
    for e in merged:
        cands = e["capfilt"]["candidates"]
        assert any(c["source"] == "synthetic" for c in cands)
        assert all({"itm", "itc"} <= set(c) for c in cands)
        best = max(range(len(cands)), key=lambda i: cands[i]["itm"])
        assert e["capfilt"]["kept"][0] == best and len(e["caption"]) == 2


def test_llm_captioner_lp_blip2_opt(lp, model, data, tmp_path):  # noqa: F811
    """An LLM captioner (``lp_blip2_opt``, given the prompt) beside the stage-1 filter: seeded,
    so two runs write the same file."""
    from lavis_plugins.common.tiny_llm import make_tiny_opt
    from lavis_plugins.tasks.capfilt import build_captioner, run_capfilt
    from lavis_plugins.capfilt.candidates import generate_captions

    opt_dir = make_tiny_opt(tmp_path / "opt")
    from lavis_plugins.capfilt.config import CapFiltConfig

    bert = model.cfg.bert_path
    cfg = _cfg(tmp_path / "a", prompt="a photo of",
               captioner={"arch": "lp_blip2_opt", "model_type": "tiny", "bert_path": bert,
                          "opt_model": str(opt_dir)})
    assert isinstance(cfg, CapFiltConfig)
    torch.manual_seed(0)
    cap = build_captioner(cfg, torch.device("cpu"))
    caps = generate_captions(cap, _images(_dataset(data), 2), cfg, seed=9)
    assert [len(x) for x in caps] == [3, 3] and all(t for x in caps for t in x)
    for out in ("a", "b"):
        run_capfilt(model, cap, _dataset(data), _cfg(tmp_path / out, prompt="a photo of"), 4,
                    seed=5)
    a, b = ((tmp_path / o / "capfilt.json").read_text() for o in ("a", "b"))
    assert a == b
    assert any(c["source"] == "synthetic" for e in json.loads(a)
               for c in e["capfilt"]["candidates"])


# ------------------------------------------------------------------ CLIP ranker


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A tiny open_clip config (TinyCLIP.json) and its random weights (a state dict), and
    another config (OtherCLIP.json) those weights do not fit."""
    from lavis.models.clip_models import model as clip_model

    root = tmp_path_factory.mktemp("clip")
    (root / "TinyCLIP.json").write_text(json.dumps(TINY_CLIP))
    other = dict(TINY_CLIP, embed_dim=8)  # another architecture: its weights do not fit
    (root / "OtherCLIP.json").write_text(json.dumps(other))
    clip_model.add_model_config(root / "TinyCLIP.json")
    torch.manual_seed(0)
    m = clip_model.create_model("TinyCLIP")
    torch.save(m.state_dict(), root / "tiny_clip.pth")
    return root


def _ranker_cfg(clip_files, **kw):
    return dict({"arch": "clip_feature_extractor", "model_type": "TinyCLIP",
                 "model_config": str(clip_files / "TinyCLIP.json"),
                 "pretrained": str(clip_files / "tiny_clip.pth")}, **kw)


def test_clip_ranking_equals_scoring_each_caption_alone(model, clip_files, data):  # noqa: F811
    import torch.nn.functional as F

    from lavis_plugins.capfilt.candidates import Candidate, score_pairs, select
    from lavis_plugins.capfilt.clip_ranker import build_clip_ranker

    ranker = build_clip_ranker(_ranker_cfg(clip_files), torch.device("cpu"))
    imgs = _images(_dataset(data), 3)
    texts = WORDS[:6]
    owner = torch.tensor([0, 0, 0, 1, 1, 2])
    batched = score_pairs(model, imgs, owner, texts, ["itc", "clip"], ranker)
    with torch.no_grad():
        single = torch.stack([
            F.cosine_similarity(ranker.encode_image(imgs[o:o + 1]),
                                ranker.encode_text(ranker.tokenizer([t])))[0]
            for o, t in zip(owner.tolist(), texts)])
    torch.testing.assert_close(batched["clip"], single, atol=1e-5, rtol=1e-4)
    cfg = _cfg("x", scores=["clip"], rank_by="clip", top_k=2, ranker=_ranker_cfg(clip_files))
    for img in range(3):
        rows = [i for i in range(6) if owner[i] == img]
        got = select([Candidate(texts[i], "web", clip=float(batched["clip"][i])) for i in rows],
                     cfg)
        want = sorted(range(len(rows)), key=lambda j: -float(single[rows[j]]))[:2]
        assert got == want


def test_clip_ranker_through_the_yaml(lp, clip_files, data, tiny_bert_dir, tmp_path,  # noqa: F811
                                      capsys):
    from test_capfilt import write_yaml

    from lavis_plugins.cli import main

    path = write_yaml(tmp_path / "capfilt.yaml", tiny_bert_dir, tmp_path, data=data)
    r = _ranker_cfg(clip_files)
    opts = ["run.capfilt.scores=[itc,clip]", "run.capfilt.rank_by=clip"] + [
        f"run.capfilt.ranker.{k}={v}" for k, v in r.items()]
    assert main(["capfilt", "--cfg-path", str(path), "--options", *opts]) == 0, \
        capsys.readouterr().err
    flat = json.loads((tmp_path / "capfilt" / "capfilt_flat.json").read_text())
    merged = json.loads((tmp_path / "capfilt" / "capfilt.json").read_text())
    assert len(flat) == 7 and all("capfilt_clip" in f for f in flat)
    for e in merged:
        cands = e["capfilt"]["candidates"]
        assert e["capfilt"]["kept"] == [max(range(len(cands)), key=lambda i: cands[i]["clip"])]


@pytest.mark.parametrize("options, message", [
    (["run.capfilt.scores=[itc,clip]"], "clip score needs run.capfilt.ranker"),
    (["run.capfilt.ranker.arch=clip_feature_extractor"], "set both or neither"),
    (["RANKER", "run.capfilt.ranker.pretrained=/no/such.pth"], "/no/such.pth does not exist"),
    (["RANKER", "run.capfilt.ranker.arch=blip_caption"], "ranker.arch = 'blip_caption'"),
    (["RANKER", "run.capfilt.ranker.model_config=null", "run.capfilt.ranker.model_type=ViT-X"],
     "'ViT-X' is not an open_clip architecture"),
    (["RANKER", "run.capfilt.ranker.pretrained=null"], "give the CLIP weights"),
    (["RANKER", "run.capfilt.ranker.pretraind=x"], "unknown key"),
    (["RANKER", "run.capfilt.ranker.model_config=OTHER", "run.capfilt.ranker.model_type=OtherCLIP"],
     "does not fit CLIP OtherCLIP"),
])
def test_bad_ranker_settings_are_one_clear_line(lp, clip_files, data, tiny_bert_dir, tmp_path,  # noqa: F811
                                                capsys, options, message):
    from test_capfilt import write_yaml

    from lavis_plugins.cli import main

    path = write_yaml(tmp_path / "capfilt.yaml", tiny_bert_dir, tmp_path, data=data)
    ranker = ["run.capfilt.scores=[itc,clip]"] + [
        f"run.capfilt.ranker.{k}={v}" for k, v in _ranker_cfg(clip_files).items()]
    opts = [o.replace("OTHER", str(clip_files / "OtherCLIP.json"))
            for opt in options for o in (ranker if opt == "RANKER" else [opt])]
    rc = main(["capfilt", "--cfg-path", str(path), "--options", *opts])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and err.startswith("lavis-plugins: error:"), err
    assert message in err, err
    assert not (tmp_path / "capfilt" / "capfilt.json").exists()


def test_project_yamls_hold_valid_capfilt_settings(lp):
    """Every shipped CapFilt YAML's run.capfilt passes CapFiltConfig's checks."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from lavis_plugins.capfilt.config import CapFiltConfig

    paths = sorted((Path(__file__).parent.parent / "projects" / "capfilt").glob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        cfg = CapFiltConfig.from_mapping(OmegaConf.load(path).run.capfilt)
        if "clip" in cfg.scores:
            assert cfg.ranker["arch"] == "clip_feature_extractor", path
