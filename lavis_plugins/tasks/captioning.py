"""Image captioning: generate a caption per image, score CIDEr and BLEU-4, write per-image results.

Differs from LAVIS's ``captioning`` task in three ways:
- reference captions come from a local COCO-format file (``run.caption_gt_files[split]``, else
  the dataset's ``coco_gt_file`` attribute), matched by ``image_id``, or else from the evaluation
  dataset's annotation ``caption`` field, matched by ``instance_id``; never from a download;
- results are gathered from every rank in memory (no shared result folder needed), and duplicates
  (a sampler that pads the last batch) are dropped by ``instance_id``; images with no prediction
  are counted and reported, not silently skipped;
- the results file holds one record per image with its references and its own CIDEr / BLEU-4.

Metrics use pycocoevalcap's ``Cider`` and ``Bleu`` after the PTB tokenizer (a Java program, as
the COCO caption evaluation does). Without ``java`` on the PATH the task falls back to a
lower-case word/punctuation tokenizer, logs a warning and reports ``tokenizer: "simple"``: those
figures are close to, not equal to, the official ones.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

from lavis.common.registry import registry
from lavis.tasks.base_task import BaseTask

from lavis_plugins.common import dist
from lavis_plugins.common.errors import UserError

logger = logging.getLogger(__name__)

# PTB punctuation tokens that pycocoevalcap's tokenizer drops
_PTB_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
              "-", "--", "...", ";"}
_SIMPLE_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def simple_tokenize(text: str) -> str:
    """Fallback tokenizer: lower case, words and single punctuation marks, PTB punctuation
    dropped (what PTBTokenizer + pycocoevalcap do for plain English captions)."""
    toks = _SIMPLE_TOKEN.findall(text.lower().replace("\n", " "))
    return " ".join(t for t in toks if t not in _PTB_PUNCT)


def tokenize_captions(captions: Dict[Any, List[str]]) -> Tuple[Dict[Any, List[str]], str]:
    """Tokenize ``{key: [caption, ...]}`` with the PTB tokenizer when java exists, else with
    :func:`simple_tokenize`. Returns the tokenized dict and the tokenizer's name."""
    if shutil.which("java") is not None:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        as_coco = {k: [{"caption": c} for c in v] for k, v in captions.items()}
        return PTBTokenizer().tokenize(as_coco), "ptb"
    logger.warning("java not found: captions are tokenized by a simple word/punctuation "
                   "tokenizer, so CIDEr/BLEU are close to, not equal to, the official figures. "
                   "Install a Java runtime for the official PTB tokenizer.")
    return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}, "simple"


def caption_metrics(predictions: Dict[Any, str], references: Dict[Any, List[str]]
                    ) -> Tuple[Dict[str, float], Dict[Any, Dict[str, float]]]:
    """Corpus CIDEr and BLEU-1..4 and per-item CIDEr / BLEU-4 (pycocoevalcap).

    Args:
        predictions: ``{key: caption}``.
        references: ``{key: [reference, ...]}`` with the same keys.
    Returns:
        ``({"CIDEr", "Bleu_1".."Bleu_4", "tokenizer"}, {key: {"cider", "bleu_4"}})``; scores are
        fractions (CIDEr ~ 1.2 for a good COCO model), as pycocoevalcap gives them.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(predictions) != set(references):
        raise ValueError("predictions and references must have the same keys")
    keys = list(predictions)
    # one tokenizer call for both sides: the PTB tokenizer starts a JVM each call
    joint = {("res", k): [predictions[k]] for k in keys}
    joint.update({("gts", k): list(references[k]) for k in keys})
    tok, tok_name = tokenize_captions(joint)
    res = {k: tok[("res", k)] for k in keys}
    gts = {k: tok[("gts", k)] for k in keys}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_each = Cider().compute_score(gts, res)
    corpus = {"CIDEr": float(cider), **{f"Bleu_{n + 1}": float(bleu[n]) for n in range(4)},
              "tokenizer": tok_name}
    per_item = {k: {"cider": float(cider_each[i]), "bleu_4": float(bleu_each[3][i])}
                for i, k in enumerate(keys)}
    return corpus, per_item


def gather_unique(results: List[Dict[str, Any]], *keys: str) -> List[Dict[str, Any]]:
    """Every rank's results in rank order, the first record of each id kept; a record's id is
    its first of ``keys`` that is not None."""
    merged, seen = [], set()
    for part in dist.all_gather_object(results):
        for r in part:
            k = next((str(r[n]) for n in keys if r.get(n) is not None), None)
            if k is None:
                raise ValueError(f"result record without any of {keys}: {r}")
            if k not in seen:
                seen.add(k)
                merged.append(r)
    return merged


@dataclass
class CaptionTaskConfig:
    """The ``run:`` keys this task reads (others belong to the runner)."""

    num_beams: int = 5  # beam width for caption generation
    max_len: int = 30  # most new tokens per caption
    min_len: int = 8  # fewest new tokens per caption
    use_nucleus_sampling: bool = False  # sample (top-p) instead of beam search
    top_p: float = 0.9  # nucleus mass when sampling
    repetition_penalty: float = 1.0  # >1 discourages repeated tokens
    length_penalty: float = 1.0  # beam-score length exponent (<0 favours short captions)
    prompt: Optional[str] = None  # text before the caption; None -> the model's own prompt
    report_metric: bool = True  # False: only write the results file (e.g. a test split w/o refs)
    # {split: COCO-format reference file ({"annotations": [{"image_id", "caption"}]})}; when a
    # split is absent: the dataset's coco_gt_file, else its annotations' "caption" field
    caption_gt_files: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_run_cfg(cls, run_cfg) -> "CaptionTaskConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: run_cfg[k] for k in names if k in run_cfg and run_cfg[k] is not None}
        if "caption_gt_files" in kw:
            kw["caption_gt_files"] = dict(kw["caption_gt_files"])
        return cls(**kw)


@registry.register_task("lp_captioning")
class LPCaptionTask(BaseTask):
    """Captioning evaluation (CIDEr + BLEU-4) and training with the model's LM loss."""

    def __init__(self, cfg: Optional[CaptionTaskConfig] = None) -> None:
        super().__init__()
        self.cfg = cfg or CaptionTaskConfig()
        # {split: {instance_id: [reference captions]}} from the evaluation datasets
        self._refs_by_instance: Dict[str, Dict[str, List[str]]] = {}
        # {split: COCO-format reference file} named by the evaluation datasets (coco_gt_file)
        self._gt_files: Dict[str, str] = {}

    @classmethod
    def setup_task(cls, cfg=None, **kwargs) -> "LPCaptionTask":
        return cls(CaptionTaskConfig.from_run_cfg(cfg.run_cfg)) if cfg is not None else cls()

    def build_datasets(self, cfg):
        datasets = super().build_datasets(cfg)
        train_splits = set(cfg.run_cfg.get("train_splits", None) or ["train"])
        for per_split in datasets.values():
            for split, ds in per_split.items():
                if split in train_splits:  # references matter only where predictions are scored
                    continue
                if getattr(ds, "coco_gt_file", None):
                    self._gt_files[split] = str(ds.coco_gt_file)
                refs = self.references_from_dataset(ds)
                if refs:
                    self._refs_by_instance[split] = refs
        return datasets

    @staticmethod
    def references_from_dataset(dataset) -> Dict[str, List[str]]:
        """``{instance_id: [captions]}`` from an evaluation dataset's annotation list (empty when
        its entries carry no ``caption``, e.g. a training split of single captions is skipped)."""
        refs: Dict[str, List[str]] = {}
        for idx, ann in enumerate(getattr(dataset, "annotation", []) or []):
            caps = ann.get("caption") if isinstance(ann, dict) else None
            if caps is None:
                continue
            refs[str(ann.get("instance_id", idx))] = [caps] if isinstance(caps, str) else list(caps)
        return refs

    # ------------------------------------------------------------------ evaluation
    def valid_step(self, model, samples) -> List[Dict[str, Any]]:
        c = self.cfg
        if c.prompt is not None:
            samples = dict(samples, prompt=c.prompt)
        captions = model.generate(
            samples, use_nucleus_sampling=c.use_nucleus_sampling, num_beams=c.num_beams,
            max_length=c.max_len, min_length=c.min_len, top_p=c.top_p,
            repetition_penalty=c.repetition_penalty, length_penalty=c.length_penalty)
        n = len(captions)
        image_ids = _as_list(samples.get("image_id"), n)
        instance_ids = _as_list(samples.get("instance_id"), n)
        return [{"image_id": _plain(i), "caption": cap,
                 "instance_id": None if inst is None else str(inst)}
                for cap, i, inst in zip(captions, image_ids, instance_ids)]

    def after_evaluation(self, val_result, split_name, epoch=None, **kwargs) -> Dict[str, Any]:
        results = gather_unique(list(val_result), "instance_id", "image_id")
        metrics: Dict[str, Any] = {"agg_metrics": 0.0}
        if dist.is_main_process():
            if self.cfg.report_metric:
                metrics = self.score(results, split_name)
            self._write_results(results, split_name, epoch)
            if self.cfg.report_metric:
                self._append_log({split_name: metrics})
        dist.barrier()
        return metrics

    def score(self, results: List[Dict[str, Any]], split: str) -> Dict[str, Any]:
        """Attach references and per-image scores to ``results`` (in place); corpus metrics."""
        refs, key = self._references(split)
        scored = [r for r in results if r.get(key) is not None and str(r[key]) in refs]
        missing = len(refs) - len(scored)
        if not scored:
            raise UserError(
                f"captioning split {split!r}: no prediction matches a reference by {key!r}. "
                "Check that the evaluation dataset yields 'instance_id' (LAVIS caption eval "
                "datasets do) or that run.caption_gt_files points at this split's references.")
        if missing:
            logger.warning("captioning %s: %d of %d images have no prediction; metrics cover "
                           "the %d predicted", split, missing, len(refs), len(scored))
        preds = {str(r[key]): r["caption"] for r in scored}
        corpus, per_item = caption_metrics(preds, {k: refs[k] for k in preds})
        for r in scored:
            r["references"] = refs[str(r[key])]
            r.update(per_item[str(r[key])])
        metrics = dict(corpus, num_images=len(scored), num_missing=missing)
        metrics["agg_metrics"] = corpus["CIDEr"] + corpus["Bleu_4"]  # as LAVIS's task
        return metrics

    def _references(self, split: str) -> Tuple[Dict[str, List[str]], str]:
        path = self.cfg.caption_gt_files.get(split, self._gt_files.get(split))
        if path is not None:
            return load_coco_references(path), "image_id"
        if split in self._refs_by_instance:
            return self._refs_by_instance[split], "instance_id"
        raise UserError(
            f"captioning split {split!r} has no reference captions: its dataset annotations carry "
            f"no 'caption' field and run.caption_gt_files has no {split!r} entry. Add "
            f"run.caption_gt_files: {{{split}: <COCO-format caption file>}}, or set "
            "run.report_metric: false to only write predictions.")

    def _write_results(self, results, split, epoch) -> str:
        from lavis_plugins.runners.reporting import result_file_name

        path = os.path.join(registry.get_path("result_dir"),
                            result_file_name(split, epoch, "captions.json"))
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        logger.info("caption results written to %s", path)
        return path

    @staticmethod
    def _append_log(record: Dict[str, Any]) -> None:
        with open(os.path.join(registry.get_path("output_dir"), "evaluate.txt"), "a") as f:
            f.write(json.dumps(record) + "\n")


def load_coco_references(path: str) -> Dict[str, List[str]]:
    """``{str(image_id): [captions]}`` from a COCO caption annotation file."""
    if not os.path.isfile(path):
        raise UserError(f"run.caption_gt_files: {path} does not exist")
    with open(path) as f:
        data = json.load(f)
    anns = data.get("annotations") if isinstance(data, dict) else None
    if anns is None:
        raise UserError(f"{path} is not a COCO caption file: it has no 'annotations' list of "
                        "{'image_id', 'caption'} records")
    refs: Dict[str, List[str]] = {}
    for a in anns:
        refs.setdefault(str(_plain(a["image_id"])), []).append(a["caption"])
    return refs


def _plain(x: Any) -> Any:
    """A JSON-friendly id: tensors to Python numbers, digit strings to int (COCO ids)."""
    if hasattr(x, "item"):
        x = x.item()
    if isinstance(x, str) and x.isdigit():
        return int(x)
    return x


def _as_list(value: Any, n: int) -> Sequence[Any]:
    if value is None:
        return [None] * n
    if hasattr(value, "tolist"):
        value = value.tolist()
    return list(value)
