"""PAINT on the shapes dataset: fine-tune the demo's stage-1 model on a narrow task, interpolate
its weights with the zero-shot ones, and record both metrics over alpha.

    python benchmarks/paint_shapes.py --demo-out demo_output/<run> [--out output/paint]

``--demo-out``: a finished ``make demo`` folder (its ``tiny-bert`` and ``stage1`` checkpoint).
Steps: (1) ImageFolders of the one-shape train/test images by size; (2) fine-tune stage 1 on
"a <size> shape" captions (``projects/demo/paint_finetune.yaml``); (3) ``lavis-plugins
interpolate`` over alpha 0.0,0.1,...,1.0, evaluating size classification (the fine-tuned
task, ``paint_task_eval.yaml``) and zero-shot colour+shape classification
(``zeroshot_cls_eval.yaml``). Writes the table and plot into ``--out`` and copies the plot to
``docs/paint_shapes.png``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    import torch

    from lavis_plugins import cli
    from lavis_plugins.cli.interpolate import interpolate, parse_alphas
    from lavis_plugins.demo import demo_yaml, final_checkpoint
    from lavis_plugins.demo_zeroshot import make_zeroshot_folder

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo-out", required=True, type=Path)
    p.add_argument("--out", default=Path("output/paint"), type=Path)
    p.add_argument("--alpha", default="0.0,0.1,...,1.0")
    p.add_argument("--finetune-options", nargs="+", default=[],
                   help="overrides for the fine-tuning run, e.g. run.init_lr=2e-4")
    p.add_argument("--plot", default=str(REPO / "docs" / "paint_shapes.png"),
                   help="where to copy the plot")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: one thread is fastest (see lavis_plugins/demo.py)
    t0 = time.time()
    out = args.out.absolute()
    bert = args.demo_out.absolute() / "tiny-bert"
    zero_shot = final_checkpoint(args.demo_out.absolute() / "stage1")
    task = out / "task_data"
    for split in ("train", "test"):
        make_zeroshot_folder(task, split, ("size",))
    colour_shape = make_zeroshot_folder(out / "color_shape_data", "test", ("color", "shape"))

    common = [f"model.bert_path={bert}", f"run.output_dir={out}"]
    runner, _ = cli.run(str(demo_yaml("paint_finetune.yaml")),
                        common + [f"model.pretrained={zero_shot}",
                                  f"datasets.lp_imagefolder.build_info.splits.train="
                                  f"{task / 'train'}"] + args.finetune_options,
                        evaluate_only=False, job_id="finetune")
    finetuned = final_checkpoint(Path(runner.output_dir))

    # each evaluation YAML with this run's data folders
    from omegaconf import OmegaConf

    cfgs = []
    for name, test_dir in (("paint_task_eval.yaml", task / "test"),
                           ("zeroshot_cls_eval.yaml", colour_shape)):
        cfg = OmegaConf.load(demo_yaml(name))
        cfg.datasets.lp_imagefolder.build_info.splits.test = str(test_dir)
        path = out / name
        path.write_text(f"# lavis-plugins evaluate --cfg-path {path}\n" + OmegaConf.to_yaml(cfg))
        cfgs.append(str(path))
    result = interpolate(str(zero_shot), str(finetuned), parse_alphas(args.alpha), out / "alphas",
                         cfgs, common, "top1", ["size (fine-tuned task)",
                                                "colour+shape (zero-shot)"])
    docs = Path(args.plot)
    shutil.copyfile(result["plot"], docs)
    print(f"\nPAINT on shapes: {out / 'alphas'}; plot copied to {docs}; "
          f"took {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
