"""Why the demo's ITM head learned nothing, measured: demo stage 1 (projects/demo/stage1.yaml,
625 steps on the shapes shards) with each ``model.itm_negatives``, then on the 200 shapes test
images: ITM accuracy and retrieval R@1 with ITM re-ranking vs ITC alone.

    python benchmarks/itm_negatives_shapes.py --out /tmp/itm_neg hard mixed random
    python benchmarks/itm_negatives_shapes.py --out /tmp/itm_cur curriculum --seeds 42 7 123

``--seeds``: one stage 1 per mode and seed (``run.seed``); ``--option KEY=VALUE``: more stage-1
options for every run (e.g. ``model.itm_curriculum_epochs=4``); ``--bert KEY=VALUE``: sizes of the
demo's Q-Former BERT (``make_tiny_bert``'s ``hidden_size``, ``num_hidden_layers``,
``num_attention_heads``, ``intermediate_size``); ``--splits``: the shapes splits to evaluate on
(``val test``: 400 images, each split its own retrieval problem of 200, halves the evaluation
noise of one split; the demo reports ``test``).

ITM accuracy: each test image with its own (first) caption and with the next image's caption,
called a match when P(match) > 0.5 (chance 50%); "pair" accuracy: its own caption scores higher
(chance 50%). R@1: lp_retrieval's scores (k_test 16 ITC candidates re-ranked by ITM logit +
ITC) vs the ITC similarity alone. Results are appended to ``<out>/results.jsonl``; 2-3 min CPU per
setting.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch


def evaluate(model, split: str = "test") -> dict:
    """ITM accuracies and R@1 (ITM re-rank, ITC alone) on a shapes retrieval split."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    from lavis_plugins.paths import config_path
    from lavis_plugins.tasks.retrieval import compute_retrieval_scores, itc_metrics

    cfg = OmegaConf.load(config_path("datasets/lp_shapes/defaults_retrieval.yaml"))
    test = registry.get_builder_class("lp_shapes_retrieval")(
        cfg.datasets.lp_shapes_retrieval).build_datasets()[split]
    model.eval()
    n = len(test.image)
    images = torch.stack([test[i]["image"] for i in range(n)])
    with torch.no_grad():
        tok = model.tokenize([test.text[test.img2txt[i][0]] for i in range(n)])
        emb = model.encode_image(images)
        other = torch.roll(torch.arange(n), 1)
        pos = model.itm_logits(emb, tok.input_ids, tok.attention_mask).softmax(-1)[:, 1]
        neg = model.itm_logits(emb, tok.input_ids[other], tok.attention_mask[other]
                               ).softmax(-1)[:, 1]

        class Loader:
            dataset = test

            def __iter__(self):
                for s in range(0, n, 50):
                    yield {"image": images[s:s + 50], "index": torch.arange(s, min(n, s + 50))}

        details: dict = {}
        i2t, t2i = compute_retrieval_scores(model, Loader(), 16, details)
    itc = details["itc"]

    def r1(a_i2t, a_t2i):
        txt = np.mean([int(a_i2t[i].argmax()) in set(test.img2txt[i]) for i in range(n)])
        img = np.mean([int(a_t2i[t].argmax()) == test.txt2img[t] for t in range(len(test.text))])
        return 100 * float(txt), 100 * float(img)

    (rt, ri), (ct, ci) = r1(i2t, t2i), r1(itc, itc.T)
    return {"itm_acc": 100 * float(((pos > .5).sum() + (neg <= .5).sum()) / (2 * n)),
            "itm_pair_acc": 100 * float((pos > neg).float().mean()),
            # balanced, on the ITC top-16 pairs that re-ranking reads (lp_retrieval's itm_acc)
            "itm_acc_candidates": itc_metrics(details, test.txt2img, test.img2txt, 16)["itm_acc"],
            "txt_r1_itm": rt, "img_r1_itm": ri, "txt_r1_itc": ct, "img_r1_itc": ci}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    from lavis_plugins.models.itm_negatives import ITM_NEGATIVES

    p.add_argument("modes", nargs="+", choices=ITM_NEGATIVES)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[42], help="run.seed of each run")
    p.add_argument("--option", action="append", default=[], help="more stage-1 KEY=VALUE")
    p.add_argument("--bert", action="append", default=[], help="demo BERT size KEY=VALUE")
    p.add_argument("--splits", nargs="+", default=["test"], choices=["val", "test"])
    args = p.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lavis_plugins

    lavis_plugins.register()
    from lavis_plugins import cli, demo
    from lavis_plugins.demo_data import ensure_shapes_dataset

    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    sizes = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.bert)}
    tag = "".join(f"-{k}{v}" for k, v in sorted(sizes.items()))
    ctx = demo.DemoContext(out=out, data_root=ensure_shapes_dataset(),
                           bert_dir=out / f"tiny-bert{tag}", llm_dir=out / "llm")
    demo.make_demo_bert(ctx.bert_dir, **sizes)
    for mode, seed in [(m, s) for m in args.modes for s in args.seeds]:
        t, cpu = time.time(), time.process_time()
        opts = [*demo.stage_options("stage1", ctx), f"model.itm_negatives={mode}",
                f"run.seed={seed}", *args.option]
        runner, _ = cli.run(str(demo.demo_yaml("stage1.yaml")), opts, evaluate_only=False,
                            job_id=f"stage1_{mode}_{seed}", force=True)
        log = [json.loads(x) for x in (Path(runner.output_dir) / "train_log.jsonl").read_text()
               .splitlines() if x.strip()]
        model = runner.unwrap_dist_model(runner.model)
        res = dict(mode=mode, seed=seed, options=args.option, bert=sizes,
                   **{f"{split}_{k}" if split != "test" else k: v for split in args.splits
                      for k, v in evaluate(model, split).items()},
                   loss_itm_last=[r["loss_itm"] for r in log if "loss_itm" in r][-1],
                   wall_s=time.time() - t, cpu_s=time.process_time() - cpu,
                   load=os.getloadavg())
        print("RESULT", json.dumps(res), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
