"""lp_zeroshot_classification through the CLI on a tiny ImageFolder: the prompt-ensembled ITC
classifier equals scoring each class prompt one by one, ITM re-ranking equals ITC + the ITM
logits of each class's prompts pooled by ``template_pooling`` (mean or max), the metrics and
files are written, and bad input is one clear line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lavis_plugins import cli
from lavis_plugins.common.errors import UserError

CLASSES = ["red_circle", "blue_square", "green_triangle"]
TEMPLATES = ["a {}", "a photo of a {}.", "there is a {} on the left"]


def _png(path: Path, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagefolder") / "test"
    for c, name in enumerate(CLASSES):
        for j in range(2):
            _png(root / name / f"{j}.png", 10 * c + j)
    return root


@pytest.fixture(scope="module")
def model_and_ckpt(lp, tiny_bert_dir, tmp_path_factory):
    torch.manual_seed(0)
    model, vis, _ = lp.load_model_and_preprocess("lp_blip2_qformer", "tiny", is_eval=True,
                                                 bert_path=str(tiny_bert_dir))
    with torch.no_grad():  # away from init, so images and prompts score differently
        for name, p in model.named_parameters():
            if name != "temp":
                p.add_(torch.randn_like(p) * 0.2)
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    torch.save({"model": model.state_dict()}, path)
    return model, vis["eval"], path


def _yaml(tmp_path: Path, bert: Path, ckpt: Path, split_dir: Path, **run) -> Path:
    run = {"templates": TEMPLATES, "itm_rerank_k": 0, **run}
    text = f"""# lavis-plugins evaluate --cfg-path {tmp_path}/zs.yaml
model:
  arch: lp_blip2_qformer
  model_type: tiny
  bert_path: {bert}
  load_finetuned: True
  finetuned: {ckpt}
datasets:
  lp_imagefolder:
    build_info:
      splits:
        test: {split_dir}
    vis_processor:
      eval:
        name: blip_image_eval
        image_size: 32
run:
  task: lp_zeroshot_classification
  runner: lp_runner
  batch_size_train: 4
  batch_size_eval: 4
  num_workers: 0
  device: cpu
  output_dir: {tmp_path}/out
  evaluate: True
  test_splits: ["test"]
""" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in run.items())
    path = tmp_path / "zs.yaml"
    path.write_text(text)
    return path


def _evaluate(tmp_path, yaml: Path, job: str = "zs"):
    runner, result = cli.run(str(yaml), [], evaluate_only=True, job_id=job)
    result_dir = Path(runner.output_dir) / "result"
    [results] = result_dir.glob("test_zeroshot*.jsonl")  # named by the epoch, if any
    recs = [json.loads(line) for line in results.read_text().splitlines()]
    return result["test"], recs, result_dir


def _one_by_one(model, image, classnames, templates, itm: bool, pooling: str = "mean"):
    """Reference: each prompt encoded alone through extract_features, ITM per prompt; ``max``:
    each template scored alone, the class's best kept."""
    img = model.extract_features({"image": image[None]}, mode="image").image_embeds_proj[0]
    scores = []
    for c in classnames:
        feats = [model.extract_features({"text_input": [t.format(c)]}, mode="text")
                 .text_embeds_proj[0, 0] for t in templates]
        if pooling == "max":
            score = max((img @ f).max() for f in feats)
        else:
            w = torch.nn.functional.normalize(torch.stack(feats).mean(0), dim=-1)
            score = (img @ w).max()
        if itm:  # pooled over the templates by the same rule as ITC
            embeds = model.encode_image(image[None])
            s = []
            for t in templates:
                tok = model.tokenize([t.format(c)])
                s.append(model.compute_itm(embeds, tok.input_ids, tok.attention_mask)[0])
            s = torch.stack(s)
            score = score + (s.max() if pooling == "max" else s.mean())
        scores.append(float(score))
    return scores


@pytest.mark.parametrize("rerank_k,pooling", [(0, "mean"), (2, "mean"), (0, "max"), (2, "max")])
def test_classifier_equals_scoring_each_class_prompt_one_by_one(model_and_ckpt, folder, tmp_path,
                                                                tiny_bert_dir, rerank_k, pooling):
    from PIL import Image

    model, vis, ckpt = model_and_ckpt
    metrics, recs, result_dir = _evaluate(
        tmp_path, _yaml(tmp_path, tiny_bert_dir, ckpt, folder, itm_rerank_k=rerank_k,
                        template_pooling=pooling))
    names = [c.replace("_", " ") for c in sorted(CLASSES)]
    assert len(recs) == 6
    with torch.no_grad():
        for rec in recs:
            ref = _one_by_one(model, vis(Image.open(rec["image"]).convert("RGB")), names,
                              TEMPLATES, itm=False, pooling=pooling)
            if rerank_k:  # the top-k by ITC get ITC + pooled ITM; the rest stay below them
                top = np.argsort(ref)[::-1][:rerank_k]
                full = _one_by_one(model, vis(Image.open(rec["image"]).convert("RGB")), names,
                                   TEMPLATES, itm=True, pooling=pooling)
                ref = [full[c] if c in top else ref[c] - 1e4 for c in range(len(names))]
            order = list(np.argsort(ref)[::-1])
            assert rec["top5"] == [names[c] for c in order]
            np.testing.assert_allclose(rec["scores"], [ref[c] for c in order], atol=2e-4)
            assert rec["label"] == Path(rec["image"]).parent.name.replace("_", " ")
    # metrics equal the results file's
    top1 = 100 * np.mean([r["correct"] for r in recs])
    assert metrics["top1"] == pytest.approx(top1) and metrics["agg_metrics"] == metrics["top1"]
    assert metrics["top5"] == 100.0  # 3 classes: always among the best 5
    assert set(metrics["per_class"]) == set(names)
    stem = next(result_dir.glob("test_zeroshot*.jsonl")).stem
    assert (result_dir / f"{stem}_confusion.png").is_file()
    assert json.loads((result_dir / f"{stem}_metrics.json").read_text())["top1"] \
        == pytest.approx(top1)


# ITM matched-logit offsets per class and template (TEMPLATES order): red circle's mean (-20) is
# below blue square's (10) but its best (30) is above, so mean and max re-rank them differently;
# offsets this large outweigh the tiny model's own ITC and ITM scores.
ITM_OFFSETS = {"red circle": [30.0, 30.0, -120.0], "blue square": [10.0, 10.0, 10.0],
               "green triangle": [-60.0, -60.0, -60.0]}


@pytest.fixture
def offset_itm(model_and_ckpt, monkeypatch):
    """Every ``lp_blip2_qformer``'s ITM matched logit gets ITM_OFFSETS of its prompt added (the
    prompt is recognised by its token ids), for models the CLI builds too."""
    from lavis_plugins.models.blip2_qformer import LPBlip2Qformer

    model = model_and_ckpt[0]
    shift = {tuple(model.tokenize([t.format(c)]).input_ids[0].tolist()): off
             for c, offs in ITM_OFFSETS.items() for t, off in zip(TEMPLATES, offs)}
    real = LPBlip2Qformer.itm_logits

    def itm_logits(self, image_embeds, text_ids, text_atts, image_kv=None):
        logits = real(self, image_embeds, text_ids, text_atts, image_kv)
        add = torch.tensor([shift[tuple(i[m.bool()].tolist())]
                            for i, m in zip(text_ids, text_atts)], dtype=logits.dtype)
        return logits + torch.stack([torch.zeros_like(add), add], dim=1)

    monkeypatch.setattr(LPBlip2Qformer, "itm_logits", itm_logits)


@pytest.mark.parametrize("pooling,order", [
    ("max", ["red circle", "blue square", "green triangle"]),  # best templates: 30 > 10 > -60
    ("mean", ["blue square", "red circle", "green triangle"]),  # means: 10 > -20 > -60
])
def test_itm_rerank_pools_templates_like_itc(model_and_ckpt, folder, tmp_path, tiny_bert_dir,
                                              offset_itm, pooling, order):
    """Through the YAML's run options: with every class re-ranked, ``max`` ranks the class whose
    best template matches first and ``mean`` the class whose templates match on average."""
    from PIL import Image

    model, vis, ckpt = model_and_ckpt
    _, recs, _ = _evaluate(tmp_path, _yaml(tmp_path, tiny_bert_dir, ckpt, folder, itm_rerank_k=3,
                                           template_pooling=pooling))
    names = [c.replace("_", " ") for c in sorted(CLASSES)]
    assert len(recs) == 6
    with torch.no_grad():
        for rec in recs:
            assert rec["top5"] == order
            ref = _one_by_one(model, vis(Image.open(rec["image"]).convert("RGB")), names,
                              TEMPLATES, itm=True, pooling=pooling)
            np.testing.assert_allclose(rec["scores"], [ref[names.index(c)] for c in order],
                                       atol=2e-4)


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_itm_rerank_adds_exactly_the_pooled_itm_logits(model_and_ckpt, monkeypatch, pooling):
    """The re-ranked scores are ITC + the ITM logits the function computed, pooled over each
    class's templates by ``mean`` (bit-identical to the rule before ``max`` existed) or
    ``max``; the classes outside the top k stay ITC + BELOW_RERANKED."""
    from lavis_plugins.models.blip2_qformer import LPBlip2Qformer
    from lavis_plugins.tasks.zeroshot_classification import (
        BELOW_RERANKED,
        class_weights,
        itm_rerank,
    )

    model = model_and_ckpt[0]
    names = [c.replace("_", " ") for c in CLASSES]
    _, ids, atts = class_weights(model, names, TEMPLATES)
    seen = []
    real = LPBlip2Qformer.itm_logits
    monkeypatch.setattr(LPBlip2Qformer, "itm_logits",
                        lambda self, *a, **kw: seen.append(real(self, *a, **kw)) or seen[-1])
    torch.manual_seed(1)
    with torch.no_grad():
        _, embeds = model.forward_image(torch.randn(2, 3, 32, 32))
    scores = torch.randn(2, len(names))
    out = itm_rerank(model, embeds, scores, ids, atts, len(TEMPLATES), 2, pooling)
    assert len(seen) == 2  # one ITM pass per image over its k x T prompts
    for b in range(2):
        top = scores[b].topk(2).indices
        itm = seen[b][:, 1].float().view(2, len(TEMPLATES))
        pooled = itm.mean(1) if pooling == "mean" else itm.max(1).values
        assert torch.equal(out[b, top], scores[b, top] + pooled)
        rest = [c for c in range(len(names)) if c not in top.tolist()]
        assert torch.equal(out[b, rest], scores[b, rest] + BELOW_RERANKED)


def test_metrics_and_confusion_matrix():
    from lavis_plugins.tasks.zeroshot_classification import (
        classification_metrics,
        confusion_matrix,
    )

    labels = np.array([0, 0, 1, 2])
    topk = np.array([[0, 1], [1, 0], [1, 2], [0, 2]])
    m = classification_metrics(labels, topk, ["a", "b", "c"])
    assert m["top1"] == 50.0 and m["top5"] == 100.0
    assert m["per_class"] == {"a": 50.0, "b": 100.0, "c": 0.0}
    assert m["mean_per_class"] == pytest.approx(50.0)
    assert confusion_matrix(labels, topk[:, 0], 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]


def test_template_sets_and_annotation_file(tmp_path, folder, lp):
    from lavis_plugins.datasets.imagefolder import read_annotation_file, readable_names
    from lavis_plugins.tasks.zeroshot_templates import TEMPLATE_SETS, resolve_templates

    assert len(TEMPLATE_SETS["imagenet80"]) == len(set(TEMPLATE_SETS["imagenet80"])) == 80
    assert resolve_templates("short") == list(TEMPLATE_SETS["short"])
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": str(folder / "red_circle" / "0.png"), "label": "b"},
                               {"image": str(folder / "blue_square" / "0.png"), "label": "a"}]))
    classes, samples = read_annotation_file(ann, None, "x")
    assert classes == ["a", "b"] and samples[0][1] == 1
    assert readable_names(["n01", "n02"], {"n01": "tench", "n02": "goldfish"}, "x") == \
        ["tench", "goldfish"]


def _bad_cases(tmp_path: Path, folder: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "no_images"
    (no_images / "cat").mkdir(parents=True)
    (no_images / "cat" / "notes.txt").write_text("x")
    other = tmp_path / "other"
    _png(other / "dog" / "0.png", 0)
    no_label = tmp_path / "no_label.json"
    no_label.write_text(json.dumps([{"image": "x.png"}]))
    not_list = tmp_path / "not_list.json"
    not_list.write_text(json.dumps({"image": "x.png", "label": "a"}))
    return [
        ({}, {}, "splits is empty"),
        ({}, {"test": no_label}, "needs 'image' and 'label' keys"),
        ({}, {"test": not_list}, "must be a non-empty JSON list"),
        ({"caption_templates": "shrt"}, {"train": folder}, "unknown template set 'shrt'. Did you "
                                                           "mean short?"),
        ({}, {"test": empty}, "has no class sub-folders"),
        ({}, {"test": no_images}, "holds no images"),
        ({}, {"test": tmp_path / "missing"}, "is not a folder"),
        ({}, {"test": folder, "train": other}, "splits must hold the same classes"),
        ({}, {"dev": folder}, "unknown split"),
        ({"templates": "imagenet81"}, {"test": folder},
         "unknown template set 'imagenet81'. Did you mean imagenet80?"),
        ({"templates": ["a photo"]}, {"test": folder}, "exactly one {}"),
        ({"templates": []}, {"test": folder}, "non-empty list"),
        ({"itm_rerank_k": -1}, {"test": folder}, "run.itm_rerank_k must be a whole number"),
        ({"template_pooling": "average"}, {"test": folder},
         "run.template_pooling must be one of mean, max, got 'average'"),
        ({"confusion_max_classes": "many"}, {"test": folder}, "run.confusion_max_classes"),
        ({"class_names": {"red_circle": "red circle"}}, {"test": folder}, "no name for class"),
    ]


def test_bad_input_is_one_clear_line(tmp_path, folder, tiny_bert_dir, model_and_ckpt, capsys):
    _, _, ckpt = model_and_ckpt
    for i, (run, splits, expect) in enumerate(_bad_cases(tmp_path, folder)):
        info = {k: run.pop(k) for k in ("class_names", "caption_templates") if k in run}
        yaml = _yaml(tmp_path, tiny_bert_dir, ckpt, folder, **run)
        text = yaml.read_text().replace(f"        test: {folder}\n", "".join(
            f"        {k}: {v}\n" for k, v in splits.items()) or "        {}\n")
        for k, v in info.items():
            text = text.replace("      splits:", f"      {k}: {json.dumps(v)}\n      splits:")
        yaml.write_text(text)
        rc = cli.main(["evaluate", "--cfg-path", str(yaml), "--job-id", f"bad{i}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, (expect, err)
        assert len(err) == 1 and expect in err[0], (expect, err)


def test_empty_classnames_are_refused(model_and_ckpt):
    from lavis_plugins.tasks.zeroshot_classification import class_weights

    with pytest.raises(UserError, match="at least one class"):
        class_weights(model_and_ckpt[0], [], TEMPLATES)


def _dist_worker(rank: int, init_file: str, model, folder: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.utils.data import DataLoader, Subset

    from lavis_plugins.tasks.zeroshot_classification import ZeroShotClassificationTask

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    dataset = _dataset(model, folder)
    shard = Subset(dataset, list(range(rank, len(dataset), 2)))  # the runner's eval sharding
    shard.classnames, shard.samples = dataset.classnames, dataset.samples
    task = ZeroShotClassificationTask(_settings())
    result = task.evaluation(model, DataLoader(shard, batch_size=2))
    assert (result is None) == (rank != 0)
    if rank == 0:
        (Path(out_dir) / "dist.json").write_text(json.dumps(result["records"]))


def _dataset(model, folder):
    from lavis_plugins.datasets.imagefolder import ImageClassificationDataset, scan_image_folder

    from lavis.processors.blip_processors import BlipImageEvalProcessor

    classes, samples = scan_image_folder(folder, "test")
    return ImageClassificationDataset(BlipImageEvalProcessor(image_size=32), samples,
                                      [c.replace("_", " ") for c in classes], classes)


def _settings():
    from lavis_plugins.tasks.zeroshot_classification import ZeroShotSettings

    return ZeroShotSettings.from_run_cfg({"templates": TEMPLATES, "itm_rerank_k": 2})


def test_two_processes_merge_to_the_single_process_records(model_and_ckpt, folder, tmp_path):
    """Each of 2 gloo processes scores every other image; the main process's merged records
    equal one process scoring all of them."""
    from conftest import run_forked
    from torch.utils.data import DataLoader

    from lavis_plugins.tasks.zeroshot_classification import ZeroShotClassificationTask

    model = model_and_ckpt[0]
    run_forked(_dist_worker, [(r, str(tmp_path / "init"), model, str(folder), str(tmp_path))
                              for r in range(2)])
    got = json.loads((tmp_path / "dist.json").read_text())
    ref = ZeroShotClassificationTask(_settings()).evaluation(
        model, DataLoader(_dataset(model, folder), batch_size=4))["records"]
    assert [r["index"] for r in got] == list(range(6))
    for a, b in zip(got, ref):
        assert a["topk"] == b["topk"] and a["image"] == b["image"] and a["label"] == b["label"]
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-5)


def test_an_unreadable_image_is_a_bad_sample(tmp_path, lp):
    from lavis_plugins.datasets.validation import BadSample

    root = tmp_path / "test"
    _png(root / "cat" / "0.png", 0)
    (root / "cat" / "1.png").write_bytes(b"not an image")
    ds = _dataset(None, root)
    assert ds[0]["label"] == 0
    with pytest.raises(BadSample, match="cannot be decoded"):
        ds[1]
