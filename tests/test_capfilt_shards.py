"""CapFilt reading webdataset shards (issue 13: "reads a caption dataset (JSON annotations or
shards)"): the same output as from the JSON file, distributed over ranks by shard, resumable,
--shards output, and bad input (missing shard, corrupt sample). Tiny shards made here."""
from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch

from conftest import run_forked
from test_capfilt import Counting, _cfg, _dataset, data, model  # noqa: F401 - shared fixtures


@pytest.fixture(scope="module")
def shards(data, tmp_path_factory):  # noqa: F811
    """The 7 images of ``data`` as make-shards writes them, one sample per image (its web
    captions in KEY.captions.json), 2 per shard: 4 shards."""
    from lavis_plugins.cli.make_shards import make_shards

    out = tmp_path_factory.mktemp("capfilt_shards") / "in"
    make_shards(data / "ann.json", data / "images", out, shard_size=2, group_by_image=True,
                progress=False)
    return out


def _shard_input(spec):
    from lavis.processors.blip_processors import BlipImageEvalProcessor

    from lavis_plugins.capfilt.shard_input import CapFiltShardInput, open_shard_input

    return CapFiltShardInput(open_shard_input(spec, "test"), BlipImageEvalProcessor(image_size=32),
                             None, str(spec))


def _run(model, captioner, dataset, out, batch_size=2, **kw):  # noqa: F811
    from lavis_plugins.tasks.capfilt import run_capfilt

    return run_capfilt(model, captioner, dataset, _cfg(out, **kw), batch_size, seed=5)


def _strip(entries, keys=("shard", "key")):
    return [{k: v for k, v in e.items() if k not in keys} for e in entries]


def test_shards_give_the_json_inputs_output(model, data, shards, tmp_path):  # noqa: F811
    """Batches of 2 in shards of 2 are the JSON input's batches: same seeds, same captions,
    same scores; each entry also names its shard and key."""
    _run(model, model, _dataset(data), tmp_path / "json")
    summary = _run(model, model, _shard_input(str(shards)), tmp_path / "shards")
    want = json.loads((tmp_path / "json" / "capfilt.json").read_text())
    got = json.loads((tmp_path / "shards" / "capfilt.json").read_text())
    assert _strip(got) == want
    assert [(e["shard"], e["key"]) for e in got][:3] == [
        ("train-000000.tar", "000000000"), ("train-000000.tar", "000000001"),
        ("train-000001.tar", "000000002")]
    assert summary["images"] == 7 and summary["bad_samples"] == 0
    assert (tmp_path / "shards" / "report" / "examples.png").is_file()  # images read from tars


def test_two_processes_split_the_work_by_shard(model, shards, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    run_forked(_worker, [(r, 2, str(tmp_path / "init"), model, str(shards), out)
                         for r in range(2)])
    seen = {}
    for rank in range(2):
        lines = [json.loads(x) for x in (out / "parts" / f"rank{rank}.jsonl").read_text()
                 .splitlines()]
        seen[rank] = sorted({r["annotation"]["shard"] for x in lines for r in x["records"]})
    assert seen == {0: ["train-000000.tar", "train-000002.tar"],
                    1: ["train-000001.tar", "train-000003.tar"]}
    _run(model, model, _shard_input(str(shards)), tmp_path / "one")
    assert (tmp_path / "one" / "capfilt.json").read_bytes() == (out / "capfilt.json").read_bytes()


def _worker(rank, world, init_file, model, spec, out):  # noqa: F811
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    _run(model, model, _shard_input(spec), out)


def test_resume_after_kill_reads_only_the_rest(model, shards, tmp_path):  # noqa: F811
    _run(model, model, _shard_input(str(shards)), tmp_path / "whole")
    killed = Counting(model, fail_on=3)
    with pytest.raises(KeyboardInterrupt):
        _run(model, killed, _shard_input(str(shards)), tmp_path / "resumed")
    again = Counting(model)
    _run(model, again, _shard_input(str(shards)), tmp_path / "resumed")
    assert again.calls == 2  # shards 2 and 3 only
    assert (tmp_path / "resumed" / "capfilt.json").read_bytes() == (
        tmp_path / "whole" / "capfilt.json").read_bytes()


def _corrupt_copy(src, dst, bad_key):
    """``src``'s shards copied into ``dst`` with sample ``bad_key``'s image bytes garbled."""
    import shutil

    shutil.copytree(src, dst)
    index = json.loads((dst / "shards.json").read_text())
    for entry in index["shards"]:
        path = dst / entry["file"]
        members = []
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                members.append((m, tar.extractfile(m).read()))
        with tarfile.open(path, "w") as tar:
            for m, blob in members:
                if m.name == f"{bad_key}.png":
                    blob = b"not a png at all"
                    m.size = len(blob)
                tar.addfile(m, io.BytesIO(blob))
        entry["bytes"] = path.stat().st_size
    (dst / "shards.json").write_text(json.dumps(index))


def test_corrupt_sample_is_counted_and_named_the_rest_processed(model, shards, tmp_path,  # noqa: F811
                                                                caplog):
    from lavis_plugins.datasets.shard_plan import expand_shard_spec, load_shard_set
    from lavis_plugins.datasets.webdataset_caption import ShardCaptionDataset

    bad = tmp_path / "bad"
    _corrupt_copy(shards, bad, "000000003")
    with caplog.at_level("WARNING"):
        summary = _run(model, model, _shard_input(str(bad)), tmp_path / "out",
                       shards=str(tmp_path / "outshards"))
    assert summary["bad_samples"] == 1 and summary["images"] == 7
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and "train-000001.tar key 000000003: corrupt image" in lines[0]
    merged = json.loads((tmp_path / "out" / "capfilt.json").read_text())
    assert merged[3]["caption"] == [] and "corrupt image" in merged[3]["capfilt"]["bad"]
    assert all(e["caption"] for i, e in enumerate(merged) if i != 3)
    # the output shard set leaves it out and is read by the streaming builder
    out = load_shard_set(expand_shard_spec(str(tmp_path / "outshards"), "t"), "t", progress=False)
    assert out.total == 6
    ds = ShardCaptionDataset(out, lambda im: torch.zeros(1), None, shuffle_buffer=1)
    ds.configure(seed=0, rank=0, world_size=1, batch_size=6, num_workers=0)
    batch = next(iter(ds))
    assert batch["_data_stats"]["bad"] == 0
    kept = {e["key"]: e["caption"] for e in merged if e["caption"]}
    for key, text in zip(batch["sample_key"], batch["text_input"]):
        assert text in kept[key.split("/")[1]]  # one of the kept captions of that image


def test_shard_output_holds_the_kept_captions(model, shards, tmp_path):  # noqa: F811
    from lavis_plugins.datasets.shard_plan import Segment, expand_shard_spec, load_shard_set
    from lavis_plugins.datasets.webdataset_caption import read_segments, sample_captions

    _run(model, model, _shard_input(str(shards)), tmp_path / "out", top_k=3,
         shards=str(tmp_path / "s"), shard_size=4)
    merged = json.loads((tmp_path / "out" / "capfilt.json").read_text())
    out = load_shard_set(expand_shard_spec(str(tmp_path / "s"), "t"), "t", progress=False)
    assert out.sizes == [4, 3]
    raws = list(read_segments(out, [Segment(i, 0, n) for i, n in enumerate(out.sizes)]))
    assert [sample_captions(r.files, "caption") for r in raws] == [e["caption"] for e in merged]
    src = load_shard_set(expand_shard_spec(str(shards), "t"), "t", progress=False)
    first = next(read_segments(src, [Segment(0, 0, 1)]))
    assert raws[0].files["png"] == first.files["png"]  # image bytes copied unchanged


# ------------------------------------------------------------------ YAML, CLI and bad input

@pytest.fixture
def yaml_path(tmp_path, shards, tiny_bert_dir):
    # test_capfilt's YAML reading the shard set (batches of 2: several per shard)
    from test_capfilt import write_yaml

    return write_yaml(tmp_path / "capfilt.yaml", tiny_bert_dir, tmp_path, shards=shards, batch=2)


def test_cli_reads_shards(lp, yaml_path, tmp_path, capsys):
    from lavis_plugins.cli import main

    rc = main(["capfilt", "--cfg-path", str(yaml_path), "--shards", str(tmp_path / "s")])
    assert rc == 0, capsys.readouterr().err
    merged = json.loads((tmp_path / "capfilt" / "capfilt.json").read_text())
    assert len(merged) == 7 and all(len(e["caption"]) == 1 for e in merged)
    assert json.loads((tmp_path / "s" / "shards.json").read_text())["samples"] == 7


@pytest.mark.parametrize("options, message", [
    (["datasets.lp_capfilt_input.build_info.shards={shards}/train-{{000000..000004}}.tar"],
     r"train-000004.tar is missing.*leave it out"),
    (["datasets.lp_capfilt_input.build_info.shards=/no/such/*.tar"], "not a .tar|none of"),
    (["datasets.lp_capfilt_input.build_info.annotations=/x.json"], "not both"),
    (["datasets.lp_capfilt_input.build_info.shards=null"], "not neither"),
])
def test_bad_shard_input_is_one_clear_line(lp, yaml_path, tmp_path, shards, capsys, options,
                                           message):
    import re

    from lavis_plugins.cli import main

    rc = main(["capfilt", "--cfg-path", str(yaml_path), "--options",
               *[o.format(shards=shards) for o in options]])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and err.startswith("lavis-plugins: error:"), err
    assert re.search(message, err), err
    assert not (tmp_path / "capfilt" / "parts").exists()  # refused before any work
