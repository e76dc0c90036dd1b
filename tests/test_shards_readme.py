"""The README's "Pre-training on web-scale data" commands, as written: make-shards on a COCO-style
caption file, then the stage-1 training command of the torchrun line (its module and arguments,
in one process), with only the data paths and, appended, a tiny model swapped in."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np

from conftest import REPO


def _commands() -> list:
    text = (REPO / "README.md").read_text()
    start = text.index("## Pre-training on web-scale data\n")
    section = text[start:text.index("\n## ", start + 1)]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    joined = block.replace("\\\n", " ")  # continuation lines
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_readme_make_shards_and_stage1_commands_run(lp, tmp_path, tiny_bert_dir, monkeypatch):
    from PIL import Image

    from lavis_plugins.cli import main

    coco = tmp_path / "coco"
    (coco / "images").mkdir(parents=True)
    anns = []
    for i in range(12):
        Image.fromarray(np.full((16, 16, 3), i * 20, np.uint8)).save(coco / "images" / f"{i}.jpg")
        anns.append({"image": f"{i}.jpg", "caption": f"a grey square number {i}", "image_id": i})
    (coco / "coco_karpathy_train.json").write_text(json.dumps(anns))
    paths = {"coco_karpathy_train.json": str(coco / "coco_karpathy_train.json"),
             "/data/coco/images": str(coco / "images"), "/data/coco_shards": str(tmp_path / "out"),
             "/data/laion115m/{00000..11499}.tar": str(tmp_path / "out")}

    def local(line: str) -> list:
        for k, v in paths.items():
            line = line.replace(k, v)
        return shlex.split(line)

    commands = _commands()
    (make,) = [c for c in commands if c.startswith("lavis-plugins make-shards")]
    assert main(local(make)[1:]) == 0
    index = json.loads((tmp_path / "out" / "shards.json").read_text())
    assert index["samples"] == 12

    (torchrun,) = [c for c in commands if c.startswith("torchrun")]
    args = local(torchrun)
    args = args[args.index("lavis_plugins.cli") + 1:]
    monkeypatch.chdir(REPO)  # a fresh clone's root: the YAML path is relative to it
    args[args.index("--options") + 1:] = [
        *args[args.index("--options") + 1:],
        f"run.output_dir={tmp_path / 'run'}",
        "datasets.lp_laion_shards.vis_processor.train.image_size=32",
        "model.model_type=tiny", "model.vit_model=tiny", "model.vit_precision=fp32",
        "model.num_query_token=4", "model.embed_dim=16", "model.max_txt_len=16",
        f"model.bert_path={tiny_bert_dir}", "model.image_size=32", "run.device=cpu",
        "run.amp=False", "run.max_epoch=1", "run.iters_per_epoch=2", "run.batch_size_train=4",
        "run.num_workers=0", "run.warmup_steps=1", "run.log_freq=1"]
    assert main(args + ["--job-id", "readme"]) == 0
    log = Path(tmp_path / "run" / "readme" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 2
