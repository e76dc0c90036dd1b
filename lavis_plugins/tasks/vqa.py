"""Visual question answering: answer generation (or answer-list ranking), VQAv2 accuracy or exact
match, per-question results.

Compared with LAVIS's ``vqa``/``gqa`` tasks:
- one task for multi-answer datasets (VQAv2, OK-VQA: the official VQAv2 accuracy, see
  :mod:`lavis_plugins.common.vqa_eval`) and single-answer ones (GQA, video QA: exact match after
  the same answer normalisation); ``run.metric`` picks, ``auto`` decides per question from the
  number of reference answers;
- reference answers come from the dataset's official annotation file when it has one (VQAv2:
  answer types too), else from its annotation list, matched by ``question_id``;
- results are gathered from every rank in memory and de-duplicated by ``question_id``; two files
  are written: ``<split>_vqa_result.json`` (``[{question_id, answer}]``, the official submission
  format) and ``<split>_vqa_scored.json`` (question_id, prediction, answers, correct);
- training accepts LAVIS's VQA batches (``text_input`` question, ``answer``/``weight``/
  ``n_answers``): the question is put in ``run.prompt`` and the most-agreed answer becomes
  ``text_output`` (BLIP-2's open-ended answer generation loss).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

import torch
from lavis.common.registry import registry
from lavis.tasks.base_task import BaseTask

from lavis_plugins.common import dist
from lavis_plugins.common.errors import UserError
from lavis_plugins.common.vqa_eval import accuracy_by, exact_match, mean_percent, vqa_accuracy
from lavis_plugins.tasks.captioning import gather_unique

logger = logging.getLogger(__name__)


@dataclass
class VQATaskConfig:
    """The ``run:`` keys this task reads (others belong to the runner)."""

    num_beams: int = 5  # beam width (BLIP-2 zero-shot VQA: 5)
    max_len: int = 10  # most new tokens per answer
    min_len: int = 1  # fewest new tokens per answer
    length_penalty: float = -1.0  # beam length exponent; -1 favours short answers (BLIP-2)
    # "generate": open-ended answers; "rank": pick from the dataset's answer list by LLM
    # log-likelihood (needs an answer list)
    inference_method: Literal["generate", "rank"] = "generate"
    num_ans_candidates: int = 128  # "rank": answers kept after the first-token pre-selection
    # question template, e.g. "Question: {} Answer:" (OPT) / "Question: {} Short answer:"
    # (FlanT5); null: the model's own (its VQA_PROMPT); "": the bare question
    prompt: Optional[str] = None
    # instruction templates for training (InstructBLIP's instruction tuning): each training
    # question is put in one drawn at random (torch's RNG: seeded, restored on resume); null:
    # ``prompt`` for training too. Evaluation always uses ``prompt``
    train_prompts: Optional[List[str]] = None
    # "vqa_acc": VQAv2 accuracy over several human answers; "exact_match": one answer;
    # "auto": per question, vqa_acc when it has 2+ reference answers, else exact_match
    metric: Literal["auto", "vqa_acc", "exact_match"] = "auto"

    @classmethod
    def from_run_cfg(cls, run_cfg) -> "VQATaskConfig":
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: run_cfg[k] for k in names if k in run_cfg and run_cfg[k] is not None})
        if cfg.inference_method not in ("generate", "rank"):
            raise UserError(f"run.inference_method is {cfg.inference_method!r}; use 'generate' "
                            "or 'rank'")
        if cfg.train_prompts is not None:
            cfg.train_prompts = [str(t) for t in cfg.train_prompts]
        bad = [t for t in (cfg.train_prompts or []) if "{}" not in t]
        if bad or cfg.train_prompts == []:
            raise UserError(f"run.train_prompts: give a list of templates, each with '{{}}' where "
                            f"the question goes (not so: {bad or '[]'})")
        if cfg.metric not in ("auto", "vqa_acc", "exact_match"):
            raise UserError(f"run.metric is {cfg.metric!r}; use 'auto', 'vqa_acc' or "
                            "'exact_match'")
        return cfg


@dataclass
class _Reference:
    answers: List[str]  # the human answers (one for single-answer datasets)
    answer_type: Optional[str] = None  # VQAv2's "yes/no" / "number" / "other"


@registry.register_task("lp_vqa")
class LPVQATask(BaseTask):
    """VQA fine-tuning (answer generation loss) and evaluation."""

    def __init__(self, cfg: Optional[VQATaskConfig] = None) -> None:
        super().__init__()
        self.cfg = cfg or VQATaskConfig()
        self.answer_list: Optional[List[str]] = None
        # {split: {str(question_id): reference}}
        self._refs: Dict[str, Dict[str, _Reference]] = {}

    @classmethod
    def setup_task(cls, cfg=None, **kwargs) -> "LPVQATask":
        return cls(VQATaskConfig.from_run_cfg(cfg.run_cfg)) if cfg is not None else cls()

    def build_datasets(self, cfg):
        datasets = super().build_datasets(cfg)
        train_splits = set(cfg.run_cfg.get("train_splits", None) or ["train"])
        for per_split in datasets.values():
            for split, ds in per_split.items():
                if getattr(ds, "answer_list", None) is not None:
                    self.answer_list = list(ds.answer_list)
                if split in train_splits:  # references matter only where predictions are scored
                    continue
                refs = self.references_from_dataset(ds)
                if refs:
                    self._refs.setdefault(split, {}).update(refs)
        if self.cfg.inference_method == "rank" and self.answer_list is None:
            raise UserError("run.inference_method is 'rank' but no dataset provides an answer "
                            "list (LAVIS VQA eval datasets read it from their second annotation "
                            "file). Add it, or use inference_method: generate.")
        return datasets

    @staticmethod
    def references_from_dataset(dataset) -> Dict[str, _Reference]:
        """Reference answers by question id: from the official annotation file when the dataset
        names one (``coco_fmt_anno_file``), else from its annotation list (``answer`` /
        ``answers``: a string or a list)."""
        official = getattr(dataset, "coco_fmt_anno_file", None)
        if official and os.path.isfile(official):
            with open(official) as f:
                anns = json.load(f)["annotations"]
            return {str(a["question_id"]): _Reference([x["answer"] for x in a["answers"]],
                                                      a.get("answer_type"))
                    for a in anns}
        refs = {}
        for ann in getattr(dataset, "annotation", []) or []:
            if not isinstance(ann, dict) or "question_id" not in ann:
                continue
            ans = ann.get("answer", ann.get("answers"))
            if ans is None:
                continue
            refs[str(ann["question_id"])] = _Reference([ans] if isinstance(ans, str) else list(ans),
                                                       ann.get("answer_type"))
        return refs

    # ------------------------------------------------------------------ training
    def prompt_for(self, model) -> str:
        """``run.prompt``, else the model's VQA prompt (DDP-wrapped or not), else ""."""
        if self.cfg.prompt is not None:
            return self.cfg.prompt
        return getattr(getattr(model, "module", model), "VQA_PROMPT", "")

    def train_step(self, model, samples):
        prompt: Union[str, List[str]] = self.prompt_for(model)
        templates = self.cfg.train_prompts
        if templates:  # one template per question
            picks = torch.randint(len(templates), (len(samples["text_input"]),)).tolist()
            prompt = [templates[i] for i in picks]
        return model(self.to_generation_targets(samples, prompt))["loss"]

    def to_generation_targets(self, samples: Dict[str, Any],
                              prompt: Union[str, Sequence[str]] = "") -> Dict[str, Any]:
        """A VQA batch as ``text_input`` (question put in ``prompt``, or in ``prompt[i]`` when
        it is a list with one template per question) / ``text_output`` (answer).

        LAVIS's VQA collater gives ``answer`` (all answers of the batch, flattened),
        ``weight`` (their agreement) and ``n_answers`` (answers per question); the answer with the
        largest weight (first on ties) becomes the target.
        """
        out = dict(samples)
        if "text_output" not in out:
            if "answer" not in samples or "n_answers" not in samples:
                raise UserError(
                    "a VQA training batch needs 'text_output' (the answer) or LAVIS's VQA "
                    f"collated fields 'answer', 'weight', 'n_answers'; got {sorted(samples)}. "
                    "Use a VQA dataset builder (coco_vqa, ok_vqa, gqa) or add text_output.")
            answers, counts = list(samples["answer"]), samples["n_answers"].tolist()
            weights = samples.get("weight")
            weights = weights.tolist() if weights is not None else [1.0] * len(answers)
            targets, start = [], 0
            for n in counts:
                best = max(range(start, start + n), key=lambda i: (weights[i], -i))
                targets.append(answers[best])
                start += n
            out["text_output"] = targets
        if prompt:
            questions = samples["text_input"]
            per_question = [prompt] * len(questions) if isinstance(prompt, str) else list(prompt)
            for p in set(per_question):
                if "{}" not in p:
                    raise UserError(f"run.prompt {p!r} has no '{{}}' where the question goes")
            out["text_input"] = [p.format(q) for p, q in zip(per_question, questions)]
        return out

    # ------------------------------------------------------------------ evaluation
    def valid_step(self, model, samples) -> List[Dict[str, Any]]:
        c = self.cfg
        answers = model.predict_answers(
            samples=samples, answer_list=self.answer_list, inference_method=c.inference_method,
            num_beams=c.num_beams, max_len=c.max_len, min_len=c.min_len,
            num_ans_candidates=c.num_ans_candidates, prompt=self.prompt_for(model),
            length_penalty=c.length_penalty)
        qids = samples["question_id"]
        qids = qids.tolist() if torch.is_tensor(qids) else list(qids)
        return [{"question_id": q, "answer": a} for q, a in zip(qids, answers)]

    def after_evaluation(self, val_result, split_name, epoch=None, **kwargs) -> Dict[str, Any]:
        results = gather_unique(list(val_result), "question_id")
        metrics: Dict[str, Any] = {}
        if dist.is_main_process():
            scored, metrics = self.score(results, split_name)
            self._write(results, scored, split_name, epoch)
            if "agg_metrics" in metrics:
                with open(os.path.join(registry.get_path("output_dir"), "evaluate.txt"), "a") as f:
                    f.write(json.dumps({split_name: metrics}) + "\n")
        dist.barrier()
        return metrics

    def score(self, results: List[Dict[str, Any]], split: str):
        """Per-question records ``{question_id, prediction, answers, correct, ...}`` and the
        split's metrics (percentages, as the official script reports them)."""
        refs = self._refs.get(split, {})
        scored, scores, types, metric_used = [], [], [], set()
        for r in results:
            ref = refs.get(str(r["question_id"]))
            rec = {"question_id": r["question_id"], "prediction": r["answer"]}
            if ref is not None:
                metric = self._metric_for(ref)
                metric_used.add(metric)
                score = (vqa_accuracy(r["answer"], ref.answers) if metric == "vqa_acc"
                         else exact_match(r["answer"], ref.answers[0]))
                rec.update(answers=ref.answers, correct=score)
                if ref.answer_type is not None:
                    rec["answer_type"] = ref.answer_type
                    types.append(ref.answer_type)
                scores.append(score)
            scored.append(rec)
        if not scores:
            logger.warning("VQA split %s: no reference answers (a test split?); predictions are "
                           "written for submission, no accuracy is computed", split)
            return scored, {"num_questions": len(results), "num_scored": 0}
        missing_pred = len(refs) - len(scores)
        if missing_pred > 0:
            logger.warning("VQA split %s: %d of %d questions have no prediction; accuracy covers "
                           "the %d predicted", split, missing_pred, len(refs), len(scores))
        acc = mean_percent(scores)
        metrics: Dict[str, Any] = {"agg_metrics": acc, "acc": acc, "num_scored": len(scores),
                                   "num_missing": max(missing_pred, 0),
                                   "metric": "+".join(sorted(metric_used))}
        if types and len(types) == len(scores):
            metrics["per_answer_type"] = accuracy_by(scores, types)
        return scored, metrics

    def _metric_for(self, ref: _Reference) -> str:
        if self.cfg.metric != "auto":
            if self.cfg.metric == "vqa_acc" and len(ref.answers) < 2:
                # leave-one-out over a single answer leaves nobody to agree with: always 0
                raise UserError("run.metric is 'vqa_acc' but a question has a single reference "
                                "answer; use metric: exact_match (or auto)")
            return self.cfg.metric
        return "vqa_acc" if len(ref.answers) > 1 else "exact_match"

    def _write(self, results, scored, split, epoch=None) -> None:
        from lavis_plugins.runners.reporting import result_file_name

        result_dir = registry.get_path("result_dir")
        official = os.path.join(result_dir, result_file_name(split, epoch, "vqa_result.json"))
        with open(official, "w") as f:
            json.dump([{"question_id": r["question_id"], "answer": r["answer"]}
                       for r in results], f)
        detail = os.path.join(result_dir, result_file_name(split, epoch, "vqa_scored.json"))
        with open(detail, "w") as f:
            json.dump(scored, f, indent=1)
        logger.info("VQA results written to %s and %s", official, detail)
