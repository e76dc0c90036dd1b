"""CapFilt (issue 13): seeded batched generation, filter scores equal to one-by-one scoring,
top-k / threshold selection, resume after a kill, two processes, shard output, the YAML/CLI path
and its bad inputs. Tiny random models, offline."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest
import torch

from conftest import run_forked

WORDS = ["red circle on the left", "a blue square", "green triangle at the top",
         "a small yellow circle", "two red squares", "a large purple triangle", "orange circle"]


@pytest.fixture(scope="module")
def model(lp, tiny_bert_dir):
    torch.manual_seed(0)
    return lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir)).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """7 images (32 px), 1-2 web captions each, as one LAVIS caption file of 10 records."""
    from PIL import Image

    root = tmp_path_factory.mktemp("capfilt_data")
    (root / "images").mkdir()
    anns = []
    for i in range(7):
        color = tuple(int(c) for c in torch.randint(0, 255, (3,), generator=torch.Generator()
                                                    .manual_seed(i)))
        Image.new("RGB", (32, 32), color).save(root / "images" / f"{i}.png")
        anns.append({"image": f"{i}.png", "caption": WORDS[i], "image_id": i})
        if i % 2 == 0:
            anns.append({"image": f"{i}.png", "caption": WORDS[(i + 3) % 7], "image_id": i})
    (root / "ann.json").write_text(json.dumps(anns))
    return root


def _dataset(data):
    from lavis.processors.blip_processors import BlipImageEvalProcessor

    from lavis_plugins.datasets.capfilt_input import CapFiltInputDataset, read_caption_images

    entries = read_caption_images(data / "ann.json", "test")
    return CapFiltInputDataset(entries, data / "images", BlipImageEvalProcessor(image_size=32),
                               None, str(data / "ann.json"))


def _cfg(out, **kw):
    from lavis_plugins.capfilt.config import CapFiltConfig

    base = dict(output=str(out), num_captions=3, max_len=8, min_len=2, report_examples=2)
    return CapFiltConfig.from_mapping({**base, **kw})


def _images(dataset, n):
    return torch.stack([dataset[i]["image"] for i in range(n)])


class Counting:
    """A captioner wrapper that counts generate calls and rows, and can fail on call k."""

    def __init__(self, model, fail_on: int = 0) -> None:
        self.model, self.calls, self.rows, self.fail_on = model, 0, [], fail_on

    def generate(self, samples, **kw):
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("killed")
        self.rows.append(samples["image"].shape[0])
        return self.model.generate(samples, **kw)


def test_input_groups_web_captions_by_image(data):
    ds = _dataset(data)
    assert len(ds) == 7
    assert ds.entries[0]["web"] == [WORDS[0], WORDS[3]]
    assert ds.entries[1]["web"] == [WORDS[1]]
    assert ds.entries[0]["annotation"] == {"image": "0.png", "image_id": 0}


def test_generation_is_batched_and_seeded(model, data, tmp_path):
    from lavis_plugins.capfilt.candidates import generate_captions

    imgs = _images(_dataset(data), 4)
    counting = Counting(model)
    cfg = _cfg(tmp_path)
    a = generate_captions(counting, imgs, cfg, seed=7)
    assert counting.calls == 1 and counting.rows == [4 * 3]  # one call for all images x captions
    torch.manual_seed(123)  # the global RNG's state does not matter, the seed does
    b = generate_captions(model, imgs, cfg, seed=7)
    c = generate_captions(model, imgs, cfg, seed=8)
    assert a == b
    assert a != c
    assert [len(x) for x in a] == [3, 3, 3, 3] and all(t for x in a for t in x)


def test_filter_scores_equal_one_by_one(model, data):
    """The batched scores (each image encoded once) equal LAVIS-style scoring of each pair on
    its own (``model(samples, match_head=...)``), and so does the ranking."""
    from lavis_plugins.capfilt.candidates import Candidate, score_pairs, select

    imgs = _images(_dataset(data), 3)
    texts = WORDS[:6]
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    batched = score_pairs(model, imgs, owner, texts, ["itm", "itc"])
    from lavis_plugins.models.blip2_lavis_compat import match_pairs

    with torch.no_grad():
        single_itm = torch.stack([match_pairs(model, {"image": imgs[o:o + 1], "text_input": [t]},
                                              "itm").softmax(-1)[0, 1]
                                  for o, t in zip(owner.tolist(), texts)])
        single_itc = torch.stack([match_pairs(model, {"image": imgs[o:o + 1], "text_input": [t]},
                                              "itc")[0, 0] for o, t in zip(owner.tolist(), texts)])
    torch.testing.assert_close(batched["itm"], single_itm, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batched["itc"], single_itc, atol=1e-5, rtol=1e-4)
    cfg = _cfg("x", top_k=1)
    for head in ("itm", "itc"):
        cfg.rank_by = head
        for img in range(3):
            rows = [i for i in range(6) if owner[i] == img]
            got = select([Candidate(texts[i], "web", itm=float(batched["itm"][i]),
                                    itc=float(batched["itc"][i])) for i in rows], cfg)
            want = select([Candidate(texts[i], "web", itm=float(single_itm[i]),
                                     itc=float(single_itc[i])) for i in rows], cfg)
            assert got == want


def test_select_top_k_and_threshold():
    from lavis_plugins.capfilt.candidates import Candidate, candidates_of, select

    cands = [Candidate("w", "web", itm=0.2, itc=0.9), Candidate("a", "synthetic", itm=0.9, itc=0.1),
             Candidate("b", "synthetic", itm=0.6, itc=0.5), Candidate("c", "synthetic", itm=0.7,
                                                                       itc=0.5)]
    assert select(cands, _cfg("x", top_k=2, rank_by="itc")) == [0, 2]  # tie: earlier first
    assert select(cands, _cfg("x", top_k=2, rank_by="itm")) == [1, 3]
    assert select(cands, _cfg("x", top_k=None, itm_threshold=0.65, rank_by="itm")) == [1, 3]
    assert select(cands, _cfg("x", top_k=1, itm_threshold=0.5, rank_by="itc")) == [2]
    assert select(cands, _cfg("x", top_k=2, itm_threshold=0.95)) == []
    got = candidates_of(["A red  circle", ""], ["a red circle", "a blue one", "a blue one"])
    assert [(c.caption, c.source) for c in got] == [("A red  circle", "web"),
                                                     ("a blue one", "synthetic")]


def _run(model, captioner, data, out, batch_size=2, **kw):
    from lavis_plugins.tasks.capfilt import run_capfilt

    return run_capfilt(model, captioner, _dataset(data), _cfg(out, **kw), batch_size, seed=5)


def test_output_files_and_report(model, data, tmp_path):
    summary = _run(model, model, data, tmp_path / "out", top_k=2)
    merged = json.loads((tmp_path / "out" / "capfilt.json").read_text())
    flat = json.loads((tmp_path / "out" / "capfilt_flat.json").read_text())
    assert [e["image"] for e in merged] == [f"{i}.png" for i in range(7)]
    assert all(len(e["caption"]) == 2 for e in merged)
    assert len(flat) == 14 and {"capfilt_itm", "capfilt_itc", "capfilt_source"} <= set(flat[0])
    assert merged[0]["image_id"] == 0
    assert summary["images"] == 7 and summary["web_captions"] == 11
    assert summary["web_kept"] + summary["synthetic_kept"] == 14
    for name in ("report.md", "scores_hist.png", "examples.png", "summary.json"):
        assert (tmp_path / "out" / "report" / name).is_file(), name
    assert json.loads((data / "ann.json").read_text())[0]["caption"] == WORDS[0]  # input intact


def test_resume_after_kill_skips_done_batches_and_gives_the_same_files(model, data, tmp_path):
    _run(model, model, data, tmp_path / "whole")
    killed = Counting(model, fail_on=3)  # killed during its 3rd batch (of 4)
    with pytest.raises(KeyboardInterrupt):
        _run(model, killed, data, tmp_path / "resumed")
    part = tmp_path / "resumed" / "parts" / "rank0.jsonl"
    assert len(part.read_text().splitlines()) == 2
    with open(part, "a") as f:  # a line cut short by the kill
        f.write('{"batch": 2, "records": [{"ind')
    again = Counting(model)
    _run(model, again, data, tmp_path / "resumed")
    assert again.calls == 2  # batches 2 and 3 only
    for name in ("capfilt.json", "capfilt_flat.json"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name
                                                              ).read_bytes()
    # a finished folder is not redone
    third = Counting(model)
    _run(model, third, data, tmp_path / "resumed")
    assert third.calls == 0


def test_other_settings_in_the_same_folder_are_refused(model, data, tmp_path):
    from lavis_plugins.common.errors import UserError

    _run(model, model, data, tmp_path / "out", top_k=2)
    with pytest.raises(UserError, match="other settings"):
        _run(model, model, data, tmp_path / "out", top_k=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no CapFilt run"):
        _run(model, model, data, tmp_path / "other")


def _worker(rank, world, init_file, model, data, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    _run(model, model, data, out)


def test_two_processes_write_each_image_once(model, data, tmp_path):
    out = tmp_path / "out"
    run_forked(_worker, [(r, 2, str(tmp_path / "init"), model, data, out) for r in range(2)])
    merged = json.loads((out / "capfilt.json").read_text())
    assert [e["image"] for e in merged] == [f"{i}.png" for i in range(7)]
    batches = {}
    for rank in range(2):
        lines = [json.loads(x) for x in (out / "parts" / f"rank{rank}.jsonl").read_text()
                 .splitlines()]
        batches[rank] = [x["batch"] for x in lines]
        indices = [r["index"] for x in lines for r in x["records"]]
        assert len(indices) == len(set(indices))
    assert sorted(batches[0]) == [0, 2] and sorted(batches[1]) == [1, 3]
    # the same captions as one process: a batch's seed depends on its index only
    _run(model, model, data, tmp_path / "one")
    assert (tmp_path / "one" / "capfilt.json").read_bytes() == (out / "capfilt.json").read_bytes()


def test_shard_output_is_read_by_the_multi_caption_builder(model, data, tmp_path):
    from lavis_plugins.datasets.shard_plan import Segment, expand_shard_spec, load_shard_set
    from lavis_plugins.datasets.webdataset_caption import read_segments, sample_captions

    _run(model, model, data, tmp_path / "out", top_k=3, shards=str(tmp_path / "shards"),
         shard_size=4)
    merged = json.loads((tmp_path / "out" / "capfilt.json").read_text())
    shards = load_shard_set(expand_shard_spec(str(tmp_path / "shards"), "test"), "test",
                            progress=False)
    assert shards.total == 7
    segs = [Segment(i, 0, n) for i, n in enumerate(shards.sizes)]
    got = [sample_captions(raw.files, "caption") for raw in read_segments(shards, segs)]
    assert got == [e["caption"] for e in merged]
    assert all(len(c) == 3 for c in got)


# ------------------------------------------------------------------ YAML, CLI and bad input

YAML = """# lavis-plugins capfilt --cfg-path capfilt.yaml
model:
  arch: lp_blip2_qformer
  model_type: tiny
  bert_path: {bert}
datasets:
  lp_capfilt_input:
    build_info:
{build_info}
    vis_processor:
      eval:
        name: blip_image_eval
        image_size: 32
run:
  runner: lp_runner
  task: lp_capfilt
  batch_size_eval: {batch}
  num_workers: 0
  seed: 1
  device: cpu
  output_dir: {out}/logs
  evaluate: True
  test_splits: [input]
  capfilt:
    output: {out}/capfilt
    num_captions: 2
    max_len: 8
    min_len: 2
    top_k: 1
    report_examples: 0
"""


def write_yaml(path: Path, bert: Path, out: Path, *, data: Optional[Path] = None,
               shards: Optional[Path] = None, batch: int = 4) -> Path:
    """``YAML`` written to ``path``, reading the JSON annotations and images under ``data`` or
    the shard set ``shards``."""
    if shards is not None:
        build_info = f"      shards: {shards}"
    else:
        build_info = (f"      annotations: {data / 'ann.json'}\n      images:\n"
                      f"        storage: {data / 'images'}")
    path.write_text(YAML.format(bert=bert, out=out, build_info=build_info, batch=batch))
    return path


@pytest.fixture
def yaml_path(tmp_path, data, tiny_bert_dir):
    return write_yaml(tmp_path / "capfilt.yaml", tiny_bert_dir, tmp_path, data=data)


def test_cli_runs_the_yaml(lp, yaml_path, tmp_path, capsys):
    from lavis_plugins.cli import main

    rc = main(["capfilt", "--cfg-path", str(yaml_path), "--shards", str(tmp_path / "shards")])
    assert rc == 0, capsys.readouterr().err
    merged = json.loads((tmp_path / "capfilt" / "capfilt.json").read_text())
    assert len(merged) == 7 and all(len(e["caption"]) == 1 for e in merged)
    assert (tmp_path / "shards" / "shards.json").is_file()


@pytest.mark.parametrize("options, message", [
    (["run.capfilt.top_kk=2"], "unknown key.*top_kk.*did you mean.*top_k"),
    (["run.capfilt.top_k=0"], "top_k = 0: must be an integer >= 1"),
    (["run.capfilt.top_k=two"], "top_k = 'two'"),
    (["run.capfilt.itm_threshold=1.5"], r"itm_threshold = 1.5: must be a probability"),
    (["run.capfilt.top_k=null"], "set top_k and/or itm_threshold"),
    (["run.capfilt.scores=[itc]", "run.capfilt.itm_threshold=0.5"], "needs the ITM score"),
    (["run.capfilt.rank_by=clip"], "rank_by"),
    (["run.capfilt.num_captions=-1"], "num_captions"),
    (["run.capfilt.top_p=0"], "top_p"),
    (["run.capfilt.prompt='a photo of'"], "takes no prompt"),
    (["run.capfilt.captioner.arch=no_such_captioner",
      "run.capfilt.captioner.model_type=x"], "no_such_captioner"),
    (["model.arch=lp_no_such_model"], "lp_no_such_model"),
    (["datasets.lp_capfilt_input.build_info.annotations=/no/such/file.json"],
     "does not exist"),
    (["run.capfilt.output="], "output"),
])
def test_bad_input_is_one_clear_line(lp, yaml_path, tmp_path, capsys, options, message):
    from lavis_plugins.cli import main

    rc = main(["capfilt", "--cfg-path", str(yaml_path), "--options", *options])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and err.startswith("lavis-plugins: error:"), err
    import re

    assert re.search(message, err, flags=re.I), err
    assert not (tmp_path / "capfilt" / "capfilt.json").exists()


def test_unreadable_input_files(lp, yaml_path, tmp_path, data, capsys):
    from lavis_plugins.cli import main

    bad = tmp_path / "bad.json"
    for text, message in (("{not json", "cannot be read as JSON"),
                          (json.dumps([{"image": "0.png"}]), "record 0 needs")):
        bad.write_text(text)
        rc = main(["capfilt", "--cfg-path", str(yaml_path), "--options",
                   f"datasets.lp_capfilt_input.build_info.annotations={bad}"])
        err = capsys.readouterr().err.strip()
        assert rc != 0 and message in err and len(err.splitlines()) == 1, err
    # an image that cannot be decoded: named, nothing merged
    bad_img = tmp_path / "imgs"
    bad_img.mkdir()
    for i in range(7):
        (bad_img / f"{i}.png").write_bytes((data / "images" / f"{i}.png").read_bytes())
    (bad_img / "5.png").write_bytes(b"not a png")
    rc = main(["capfilt", "--cfg-path", str(yaml_path), "--options",
               f"datasets.lp_capfilt_input.build_info.images.storage={bad_img}"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "5.png" in err, err
    assert not (tmp_path / "capfilt" / "capfilt.json").exists()


def test_a_foreign_shards_folder_is_never_replaced(lp, yaml_path, tmp_path, capsys):
    from lavis_plugins.cli import main

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    rc = main(["capfilt", "--cfg-path", str(yaml_path), "--shards", str(foreign)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "not written by the CapFilt run" in err and len(err.splitlines()) == 1
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "capfilt" / "parts").exists()  # refused before any work
    # its own shard folder is replaced by a rerun
    assert main(["capfilt", "--cfg-path", str(yaml_path), "--shards", str(tmp_path / "s")]) == 0
    assert main(["capfilt", "--cfg-path", str(yaml_path), "--shards", str(tmp_path / "s")]) == 0


def test_cli_refuses_other_tasks(lp, capsys):
    from lavis_plugins.cli import main

    rc = main(["capfilt", "--cfg-path", "projects/demo/retrieval_eval.yaml"])
    assert rc != 0 and "lp_capfilt" in capsys.readouterr().err
