"""Zero-shot video QA evaluated under both published scoring protocols at once.

Numbers from the two protocols are not comparable, so every evaluation reports both (or the ones
``run.protocols`` names):

- ``generate`` (BLIP's): the model generates an open-ended answer (beam search); it is correct
  when it equals the reference after VQA answer normalisation
  (:func:`lavis_plugins.common.vqa_eval.exact_match`: punctuation, lower case, number words to
  digits, articles, contractions);
- ``rank`` (InstructBLIP's): the model scores every candidate answer by the LLM's log-likelihood
  and picks the best; correct when it equals the reference after the same normalisation.
  Candidates come from ``run.answer_list`` (a JSON list of answers, or LAVIS's ``ans2label``
  file) when set, else from the evaluated dataset's ``answer_list`` (the lp_msrvtt_qa /
  lp_msvd_qa builders read an answer-list file, or build the list from the train+test answers;
  see ``lavis_plugins/datasets/builders/video_builders.py``).

A record whose ``answer`` is a list counts as correct when the prediction matches any of them.

Reported per split (``after_evaluation``): accuracy in percent overall and per ``question_type``
(when the annotations carry one), the number of questions answered, skipped (unreadable videos
under ``on_bad_video: skip``, by reason) and missing (in the dataset but in no rank's results).
Files in the run's ``result`` folder: ``<split>_video_qa_<protocol>.json`` (one record per
question: question_id, question, question_type, prediction, answer, correct) and, when videos were
skipped, ``<split>_video_qa_skipped.json``.

Distributed evaluation: the runner shards samples ``rank::world`` without padding; each rank's
results are gathered in memory (``all_gather_object``) and de-duplicated by ``question_id``
anyway (a padding sampler would repeat samples), so the merged set has no duplicates; questions
that no rank answered or skipped are counted as missing and logged.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lavis.common.registry import registry
from lavis.tasks.base_task import BaseTask

from lavis_plugins.common import dist
from lavis_plugins.common.errors import UserError
from lavis_plugins.common.vqa_eval import accuracy_by, exact_match, mean_percent

logger = logging.getLogger(__name__)

PROTOCOLS = ("generate", "rank")


@dataclass
class VideoQATaskConfig:
    """The ``run:`` keys this task reads (others belong to the runner)."""

    # scoring protocols to run, in order; the first one's accuracy is ``agg_metrics``
    protocols: List[str] = field(default_factory=lambda: list(PROTOCOLS))
    # question template, e.g. OPT "Question: {} Answer:", FlanT5 "Question: {} Short answer:";
    # None: the model's own zero-shot VQA prompt; "": the bare question
    prompt: Optional[str] = None
    num_beams: int = 5  # "generate": beam width (BLIP-2 zero-shot VQA: 5)
    max_len: int = 10  # "generate": most new tokens per answer
    min_len: int = 1  # "generate": fewest new tokens per answer
    length_penalty: float = -1.0  # "generate": beam length exponent; -1 favours short answers
    # "rank": candidates kept by the model's first-token pre-selection before they are scored
    # in full; None scores every candidate (InstructBLIP's protocol)
    num_ans_candidates: Optional[int] = None
    # "rank": candidate answers file (JSON list of strings or {answer: label}); None = the
    # evaluated dataset's answer list
    answer_list: Optional[str] = None

    @classmethod
    def from_run_cfg(cls, run_cfg) -> "VideoQATaskConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: run_cfg[k] for k in names if k in run_cfg and run_cfg[k] is not None}
        if "protocols" in kw:
            protos = kw["protocols"]
            kw["protocols"] = [protos] if isinstance(protos, str) else [str(p) for p in protos]
        cfg = cls(**kw)
        bad = [p for p in cfg.protocols if p not in PROTOCOLS]
        if bad or not cfg.protocols or len(set(cfg.protocols)) != len(cfg.protocols):
            raise UserError(f"run.protocols is {cfg.protocols}; give a non-empty list of distinct "
                            f"protocols from {list(PROTOCOLS)}")
        return cfg


def is_correct(prediction: str, answer: Any) -> bool:
    """Exact match after VQA normalisation; a list of answers matches when any one does."""
    answers = [answer] if isinstance(answer, str) else list(answer)
    return any(exact_match(prediction, str(a)) == 1.0 for a in answers)


def protocol_metrics(records: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """``{"accuracy", "num_correct", ["per_question_type"]}`` of per-question ``records``
    (``correct``: bool, ``question_type``: str or None). Types are reported when any record has
    one; records without a type are grouped as ``"unknown"``."""
    scores = [float(r["correct"]) for r in records]
    out: Dict[str, Any] = {"accuracy": mean_percent(scores), "num_correct": int(sum(scores))}
    types = [r.get("question_type") for r in records]
    if any(t is not None for t in types):
        out["per_question_type"] = accuracy_by(scores, ["unknown" if t is None else str(t)
                                                        for t in types])
    return out


def merge_results(parts: Sequence[Sequence[Dict[str, Any]]]
                  ) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]], int]:
    """Every rank's records merged: (answered, skipped, duplicates dropped).

    Answered records are de-duplicated by ``question_id`` (first kept, in rank order); a skip
    record is kept only when no rank answered its question (and once).
    """
    answered: Dict[str, Dict[str, Any]] = {}
    skipped: Dict[str, Dict[str, Any]] = {}
    dup = 0
    for part in parts:
        for r in part:
            key = str(r["question_id"])
            target = skipped if r.get("skipped") else answered
            if key in target:
                dup += 1
                continue
            target[key] = r
    skipped = {k: v for k, v in skipped.items() if k not in answered}
    return list(answered.values()), list(skipped.values()), dup


def _as_list(value: Any, n: int) -> List[Any]:
    if value is None:
        return [None] * n
    if torch.is_tensor(value):
        value = value.tolist()
    return list(value)


def _plain_id(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


@registry.register_task("lp_video_qa")
class VideoQATask(BaseTask):
    """Zero-shot video QA: open-ended generation and answer ranking, both scored."""

    def __init__(self, cfg: Optional[VideoQATaskConfig] = None) -> None:
        super().__init__()
        self.cfg = cfg or VideoQATaskConfig()
        self._file_answer_list: Optional[List[str]] = None
        if self.cfg.answer_list is not None:
            from lavis_plugins.datasets.video_datasets import load_answer_list

            self._file_answer_list = load_answer_list(os.path.expanduser(self.cfg.answer_list))
        # set by before_evaluation for the split being evaluated
        self.answer_list: Optional[List[str]] = self._file_answer_list
        self._expected_ids: Optional[List[str]] = None

    @classmethod
    def setup_task(cls, cfg=None, **kwargs) -> "VideoQATask":
        return cls(VideoQATaskConfig.from_run_cfg(cfg.run_cfg)) if cfg is not None else cls()

    # ------------------------------------------------------------------ set-up
    def build_datasets(self, cfg):
        datasets = super().build_datasets(cfg)
        if "rank" in self.cfg.protocols and self._file_answer_list is None:
            lacking = [f"{name}/{split}" for name, per in datasets.items()
                       for split, ds in per.items()
                       if split != "train" and not getattr(ds, "answer_list", None)]
            if lacking:
                raise UserError(
                    f"run.protocols includes 'rank' but {lacking} have no candidate answer list. "
                    "Set run.answer_list to a JSON list of answers, add "
                    "build_info.annotations.answer_list to the dataset, or list a split with "
                    "answers under build_info.annotations (answer_list_splits), or drop 'rank' "
                    "from run.protocols.")
        return datasets

    def before_evaluation(self, model, dataset, **kwargs) -> None:
        super().before_evaluation(model, dataset, **kwargs)
        if self._file_answer_list is None:
            self.answer_list = _dataset_attr(dataset, "answer_list")
            if "rank" in self.cfg.protocols and not self.answer_list:
                raise UserError("run.protocols includes 'rank' but the evaluated dataset has no "
                                "answer list; set run.answer_list")
        anns = _dataset_attr(dataset, "annotation")
        self._expected_ids = None
        if anns and all(isinstance(a, dict) and "question_id" in a for a in anns):
            self._expected_ids = [str(_plain_id(a["question_id"])) for a in anns]

    def train_step(self, model, samples):
        """Answer-generation loss: the prompted question is the input, the answer the target."""
        out = dict(samples, text_output=list(samples["answer"]))
        if self.cfg.prompt:
            out["text_input"] = [self.cfg.prompt.format(q) for q in samples["text_input"]]
        return model(out)["loss"]

    # ------------------------------------------------------------------ evaluation
    def valid_step(self, model, samples) -> List[Dict[str, Any]]:
        """Per-question records ``{question_id, question, question_type, answer, predictions:
        {protocol: answer}}`` and skip records ``{question_id, skipped, kind, reason, video}``."""
        records = [{"question_id": _plain_id(s["key"]), "skipped": True, "kind": s["kind"],
                    "reason": s["reason"], "video": s["video"]}
                   for s in samples.get("skipped", []) or []]
        if "video" not in samples:  # every sample of the batch was skipped
            return records
        c = self.cfg
        preds: Dict[str, List[str]] = {}
        for protocol in c.protocols:
            preds[protocol] = list(model.predict_answers(
                samples=samples, answer_list=self.answer_list, inference_method=protocol,
                num_beams=c.num_beams, max_len=c.max_len, min_len=c.min_len,
                num_ans_candidates=(c.num_ans_candidates if c.num_ans_candidates is not None
                                    else len(self.answer_list or ())),
                prompt=c.prompt,
                length_penalty=c.length_penalty))
        n = len(samples["video"])
        qids = _as_list(samples.get("question_id"), n)
        questions = _as_list(samples.get("text_input"), n)
        answers = _as_list(samples.get("answer"), n)
        types = _as_list(samples.get("question_type"), n)
        # frame selection (model.frame_selection): the kept candidates' positions, per video
        chosen = getattr(model, "last_frame_selection", None)
        for i in range(n):
            records.append({"question_id": _plain_id(qids[i]), "question": questions[i],
                            "question_type": types[i], "answer": answers[i],
                            "predictions": {p: preds[p][i] for p in c.protocols}})
            if chosen is not None and chosen.shape[0] == n:
                records[-1]["selected_frames"] = chosen[i].tolist()
        return records

    def after_evaluation(self, val_result, split_name, epoch=None, **kwargs) -> Dict[str, Any]:
        parts = dist.all_gather_object(list(val_result))
        metrics: Dict[str, Any] = {}
        if dist.is_main_process():
            answered, skipped, dup = merge_results(parts)
            metrics = self.score(answered, skipped, split_name, duplicates=dup, epoch=epoch)
            with open(os.path.join(registry.get_path("output_dir"), "evaluate.txt"), "a") as f:
                f.write(json.dumps({split_name: metrics}) + "\n")
        dist.barrier()
        return metrics

    RESULT_NAME = "video_qa"  # result files: <split>_<RESULT_NAME>_<protocol>.json

    @staticmethod
    def result_rows(protocol: str, answered: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """One scored row per answered question for ``protocol``."""
        return [{"question_id": r["question_id"], "question": r.get("question"),
                 "question_type": r.get("question_type"),
                 "prediction": r["predictions"][protocol], "answer": r["answer"],
                 "correct": is_correct(r["predictions"][protocol], r["answer"]),
                 **({"selected_frames": r["selected_frames"]} if "selected_frames" in r else {})}
                for r in answered]

    @staticmethod
    def protocol_metrics(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        return protocol_metrics(rows)

    def score(self, answered: List[Dict[str, Any]], skipped: List[Dict[str, Any]], split: str,
              duplicates: int = 0, epoch: Any = None) -> Dict[str, Any]:
        """Metrics of the merged records of ``split``; writes the per-question files."""
        answered = sorted(answered, key=lambda r: str(r["question_id"]))
        metrics: Dict[str, Any] = {"num_questions": len(answered), "num_skipped": len(skipped)}
        if skipped:
            metrics["skipped_by_kind"] = dict(sorted(Counter(r["kind"] for r in skipped).items()))
        if self._expected_ids is not None:
            done = {str(r["question_id"]) for r in answered} | {str(r["question_id"])
                                                              for r in skipped}
            missing = [q for q in self._expected_ids if q not in done]
            metrics["num_missing"] = len(missing)
            if missing:
                logger.error("video QA %s: %d questions have no result from any process (first: "
                             "%s); accuracy covers the %d answered", split, len(missing),
                             missing[:5], len(answered))
        if duplicates:
            logger.warning("video QA %s: %d duplicate results dropped (by question_id)", split,
                           duplicates)
        from lavis_plugins.runners.reporting import result_file_name

        result_dir = registry.get_path("result_dir")
        for protocol in self.cfg.protocols:
            rows = self.result_rows(protocol, answered)
            if rows:
                metrics[protocol] = self.protocol_metrics(rows)
            path = os.path.join(result_dir, result_file_name(
                split, epoch, f"{self.RESULT_NAME}_{protocol}.json"))
            with open(path, "w") as f:
                json.dump(rows, f, indent=1)
        if skipped:
            path = os.path.join(result_dir, result_file_name(
                split, epoch, f"{self.RESULT_NAME}_skipped.json"))
            with open(path, "w") as f:
                json.dump(sorted(skipped, key=lambda r: str(r["question_id"])), f, indent=1)
            logger.warning("video QA %s: %d questions skipped because their video could not be "
                           "read (%s); listed in %s", split, len(skipped),
                           metrics["skipped_by_kind"], path)
        first = self.cfg.protocols[0]
        metrics["agg_metrics"] = metrics[first]["accuracy"] if first in metrics else 0.0
        summary = " | ".join(f"{p} {metrics[p]['accuracy']:.2f}%" for p in self.cfg.protocols
                             if p in metrics)
        logger.info("video QA %s: %s over %d questions (%d skipped)", split, summary or "-",
                    len(answered), len(skipped))
        return metrics


def _dataset_attr(dataset, name: str):
    """``dataset.<name>``, looking through LAVIS's ConcatDataset (first dataset's value for a
    list attribute such as ``answer_list``; concatenated for ``annotation``)."""
    if hasattr(dataset, name):
        return getattr(dataset, name)
    inner = getattr(dataset, "datasets", None)
    if not inner:
        return None
    values = [getattr(d, name, None) for d in inner]
    if name == "annotation":
        return [a for v in values if v for a in v]
    return next((v for v in values if v), None)
