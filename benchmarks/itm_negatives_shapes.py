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
noise of one split; the demo reports ``test``; ``train``: 200 of the TRAINING images, those with
distinct descriptions, each with its 4 reference captions, 2 of which it was trained on: a
retrieval problem built like val/test, so a train-vs-test gap measures overfitting).
``--eval-runs DIR ...``: no training; evaluate the last checkpoint of finished stage-1 run
folders (the model settings are read from the run's ``log.txt``), e.g. to diagnose old runs.

ITM accuracy: each test image with its own (first) caption and with the next image's caption,
called a match when P(match) > 0.5 (chance 50%); "pair" accuracy: its own caption scores higher
(chance 50%). R@1: lp_retrieval's scores (k_test 16 ITC candidates re-ranked by ITM logit +
ITC) vs the ITC similarity alone. Overlap (``<split>_overlap``): per direction, how many queries
both rankings get right, ITC only, re-ranking only, neither; ``cand_recall``: share of queries
whose true match is among the ITC top-16 re-ranking reads; and per image, whether the images ITC
gets wrong (image->text) are the ones re-ranking gets wrong (``img_err_phi``: correlation of the
two error indicators, 0: unrelated, 1: the same images). Results are appended to
``<out>/results.jsonl``; 2-3 min CPU per setting.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch


TRAIN_SUBSET = 200  # training images in the "train" evaluation split (val/test have 200)


def scene_references() -> dict:
    """Every caption the shapes templates can write -> all reference captions of its scene
    (a caption names every attribute of every shape, so it identifies its scene)."""
    from itertools import permutations, product

    from lavis_plugins import demo_data as d

    scenes = [(d.Shape(s, c, z, p),) for s, c, z, p in
              product(d.SHAPES, sorted(d.COLORS), sorted(d.SIZES), list(d.POSITIONS))]
    for (pa, pb), (sa, sb), (ca, cb), (za, zb) in product(
            d.POSITION_PAIRS, permutations(d.SHAPES, 2), permutations(sorted(d.COLORS), 2),
            product(sorted(d.SIZES), repeat=2)):
        scenes.append((d.Shape(sa, ca, za, pa), d.Shape(sb, cb, zb, pb)))
    refs = {}
    for scene in scenes:
        caps = tuple(d._captions(scene))
        for c in caps:
            assert refs.setdefault(c, caps) == caps, c  # one scene per caption
    return refs


def train_subset_annotation(root: Path, out: Path, n: int = TRAIN_SUBSET) -> Path:
    """A val/test-style annotation file (``[{image, caption: [4 refs], image_id}]``) of the first
    ``n`` training images with distinct descriptions (as val/test, so every caption names one
    image); each image's 2 training captions are among its 4 references."""
    refs = scene_references()
    seen, rows = set(), []
    for ann in json.loads((root / "annotations" / "caption_train.json").read_text()):
        caps = refs[ann["caption"]]
        if caps in seen:  # an image's 2nd caption, or a description already taken
            continue
        seen.add(caps)
        rows.append({"image": ann["image"], "caption": list(caps), "image_id": ann["image_id"]})
        if len(rows) == n:
            break
    path = out / f"caption_train{n}.json"
    path.write_text(json.dumps(rows))
    return path


def eval_split(split: str, out: Path):
    """The shapes retrieval evaluation dataset of ``split`` (val, test, or ``train``: see
    :func:`train_subset_annotation`); images from the default shapes dataset."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    from lavis_plugins.datasets.shapes_datasets import ShapesRetrievalEvalDataset
    from lavis_plugins.demo_data import ensure_shapes_dataset
    from lavis_plugins.paths import config_path

    cfg = OmegaConf.load(config_path("datasets/lp_shapes/defaults_retrieval.yaml"))
    built = registry.get_builder_class("lp_shapes_retrieval")(
        cfg.datasets.lp_shapes_retrieval).build_datasets()
    if split != "train":
        return built[split]
    root = ensure_shapes_dataset()
    test = built["test"]
    ann = train_subset_annotation(root, out)
    return ShapesRetrievalEvalDataset(test.vis_processor, test.text_processor,
                                      str(root / "images"), [str(ann)])


def overlap(itc: np.ndarray, rerank_i2t: np.ndarray, rerank_t2i: np.ndarray, data, k: int = 16
            ) -> dict:
    """Where ITC alone and ITM re-ranking are right and wrong, query by query (see the module
    docstring): ``{i2t|t2i: [both, itc_only, rerank_only, neither, cand_recall]}`` (counts, %),
    ``img_err_phi``."""
    n_img, n_txt = itc.shape
    i2t_itc = np.array([int(itc[i].argmax()) in set(data.img2txt[i]) for i in range(n_img)])
    i2t_rr = np.array([int(rerank_i2t[i].argmax()) in set(data.img2txt[i]) for i in range(n_img)])
    t2i_itc = np.array([int(itc[:, t].argmax()) == data.txt2img[t] for t in range(n_txt)])
    t2i_rr = np.array([int(rerank_t2i[t].argmax()) == data.txt2img[t] for t in range(n_txt)])
    top_t = np.argsort(-itc, axis=1)[:, :k]
    top_i = np.argsort(-itc.T, axis=1)[:, :k]
    cand_i2t = np.mean([bool(set(top_t[i]) & set(data.img2txt[i])) for i in range(n_img)])
    cand_t2i = np.mean([data.txt2img[t] in set(top_i[t]) for t in range(n_txt)])

    def table(a, b, cand):
        return [int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()),
                int((~a & ~b).sum()), 100 * float(cand)]

    ea, eb = (~i2t_itc).astype(float), (~i2t_rr).astype(float)
    phi = float(np.corrcoef(ea, eb)[0, 1]) if ea.std() > 0 and eb.std() > 0 else float("nan")
    return {"i2t": table(i2t_itc, i2t_rr, cand_i2t), "t2i": table(t2i_itc, t2i_rr, cand_t2i),
            "img_err_phi": phi}


def evaluate(model, split: str = "test", out: Path = Path(".")) -> dict:
    """ITM accuracies and R@1 (ITM re-rank, ITC alone) on a shapes retrieval split."""
    from lavis_plugins.tasks.retrieval import compute_retrieval_scores, itc_metrics

    test = eval_split(split, out)
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
            "txt_r1_itm": rt, "img_r1_itm": ri, "txt_r1_itc": ct, "img_r1_itc": ci,
            "overlap": overlap(itc, i2t, t2i, test)}


def run_model_config(run_dir: Path) -> dict:
    """The ``model:`` settings of a finished stage-1 run, from the config its ``log.txt`` opens
    with (LAVIS's runner writes it there as JSON)."""
    text = (run_dir / "log.txt").read_text()
    config, _ = json.JSONDecoder().raw_decode(text)
    return config["model"]


def load_run(run_dir: Path):
    """The stage-1 model of a finished run folder, with its last epoch's weights."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    from lavis_plugins.demo import final_checkpoint

    cfg = dict(run_model_config(run_dir), load_finetuned=True,
               finetuned=str(final_checkpoint(run_dir)))
    return registry.get_model_class(cfg["arch"]).from_config(OmegaConf.create(cfg))


def record(out: Path, res: dict) -> None:
    print("RESULT", json.dumps(res), flush=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")


def evaluate_splits(model, splits, out: Path) -> dict:
    return {f"{split}_{k}" if split != "test" else k: v for split in splits
            for k, v in evaluate(model, split, out).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    from lavis_plugins.models.itm_negatives import ITM_NEGATIVES

    # no choices= here: argparse refuses an empty list against them (checked below)
    p.add_argument("modes", nargs="*", help=f"itm_negatives of each run: {list(ITM_NEGATIVES)}")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[42], help="run.seed of each run")
    p.add_argument("--option", action="append", default=[], help="more stage-1 KEY=VALUE")
    p.add_argument("--bert", action="append", default=[], help="demo BERT size KEY=VALUE")
    p.add_argument("--splits", nargs="+", default=["test"], choices=["train", "val", "test"])
    p.add_argument("--eval-runs", nargs="+", default=[], type=Path,
                   help="finished stage-1 run folders to evaluate (no training)")
    args = p.parse_args()
    if not args.modes and not args.eval_runs:
        p.error("name ITM negative modes to train, or --eval-runs folders to evaluate")
    for mode in args.modes:
        if mode not in ITM_NEGATIVES:
            p.error(f"mode {mode!r}: choose from {list(ITM_NEGATIVES)}")
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lavis_plugins

    lavis_plugins.register()
    from lavis_plugins import cli, demo
    from lavis_plugins.demo_data import ensure_shapes_dataset

    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    for run_dir in args.eval_runs:
        cpu = time.process_time()
        res = dict(run=str(run_dir), **evaluate_splits(load_run(run_dir), args.splits, out),
                   eval_cpu_s=time.process_time() - cpu, load=os.getloadavg())
        record(out, res)
    if not args.modes:
        return
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
        train_cpu = time.process_time() - cpu
        model = runner.unwrap_dist_model(runner.model)
        res = dict(mode=mode, seed=seed, options=args.option, bert=sizes,
                   **evaluate_splits(model, args.splits, out),
                   loss_itm_last=[r["loss_itm"] for r in log if "loss_itm" in r][-1],
                   wall_s=time.time() - t, cpu_s=time.process_time() - cpu,
                   train_cpu_s=train_cpu, load=os.getloadavg())
        record(out, res)


if __name__ == "__main__":
    main()
