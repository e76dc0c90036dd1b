"""Zero-shot multiple-choice video QA (NExT-QA, STAR, How2QA): ``lp_video_mcqa``.

Two protocols, each reported (``run.protocols``; the first one's accuracy is ``agg_metrics``):

- ``loglik``: every option is scored by the LLM's log-likelihood of its text after the prompted
  question (``run.prompt``, default the model's VQA prompt), exactly as scoring that option
  alone; the best option is the prediction;
- ``letter``: the question and its options are put in ``run.letter_prompt`` ("... Options: (A)
  ... (B) ... Answer:") and the option letter the LLM finds most likely is the prediction: greedy
  generation restricted to the option letters (SeViLA answers by generating the letter).

With ``model.frame_selection``, frames are scored against the question joined with each option
(``run.select_with_options``; a frame that supports any option is informative), else against the
question alone.

Reported per split: accuracy overall, per ``question_type`` and, for NExT-QA's type codes, per
group (causal / temporal / descriptive); skipped / missing counts as ``lp_video_qa``. Files:
``<split>_video_mcqa_<protocol>.json`` (question_id, question, options, scores, prediction index
and text, answer index, correct).
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Sequence

import torch
from lavis.common.registry import registry
from lavis.tasks.base_task import BaseTask

from lavis_plugins.common.errors import UserError
from lavis_plugins.tasks.video_qa import VideoQATask, _as_list, _plain_id, protocol_metrics

MC_PROTOCOLS = ("loglik", "letter")
LETTERS = string.ascii_uppercase
NEXTQA_TYPES = {"CW": "causal", "CH": "causal", "TN": "temporal", "TC": "temporal",
                "TP": "temporal", "DC": "descriptive", "DL": "descriptive", "DO": "descriptive"}
DEFAULT_LETTER_PROMPT = ("Question: {question} Options: {options} Answer with the option's "
                         "letter. Answer:")


@dataclass
class VideoMCQATaskConfig:
    """The ``run:`` keys this task reads (others belong to the runner)."""

    # scoring protocols to run, in order: "loglik" and/or "letter" (module docstring)
    protocols: List[str] = field(default_factory=lambda: list(MC_PROTOCOLS))
    # "loglik": question template ("Question: {} Answer:"); None: the model's VQA prompt
    prompt: Any = None
    # "letter": the prompt holding the question and the lettered options ("(A) ... (B) ...")
    letter_prompt: str = DEFAULT_LETTER_PROMPT
    # frame selection scores frames against "question option" for each option (else question)
    select_with_options: bool = True

    @classmethod
    def from_run_cfg(cls, run_cfg) -> "VideoMCQATaskConfig":
        names = {f.name for f in fields(cls)}
        kw = {k: run_cfg[k] for k in names if k in run_cfg and run_cfg[k] is not None}
        if isinstance(kw.get("protocols"), str):
            kw["protocols"] = [kw["protocols"]]
        cfg = cls(**kw)
        cfg.protocols = [str(p) for p in cfg.protocols]
        bad = [p for p in cfg.protocols if p not in MC_PROTOCOLS]
        if bad or not cfg.protocols or len(set(cfg.protocols)) != len(cfg.protocols):
            raise UserError(f"run.protocols is {cfg.protocols}; give a non-empty list of distinct "
                            f"protocols from {list(MC_PROTOCOLS)}")
        try:
            cfg.letter_prompt.format(question="q", options="o")
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"run.letter_prompt {cfg.letter_prompt!r}: only '{{question}}' and "
                            "'{options}' may be substituted") from e
        if "letter" in cfg.protocols and "{options}" not in cfg.letter_prompt:
            raise UserError("run.letter_prompt has no '{options}': the LLM cannot answer with a "
                            "letter it was not shown")
        return cfg


def lettered(options: Sequence[str]) -> str:
    """"(A) first (B) second ..." """
    return " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))


@registry.register_task("lp_video_mcqa")
class VideoMCQATask(VideoQATask):
    """Zero-shot multiple-choice video QA: options ranked by log-likelihood, and the letter."""

    RESULT_NAME = "video_mcqa"

    def __init__(self, cfg: "VideoMCQATaskConfig | None" = None) -> None:
        BaseTask.__init__(self)
        self.cfg = cfg or VideoMCQATaskConfig()
        self._file_answer_list = None
        self.answer_list = None
        self._expected_ids = None

    @classmethod
    def setup_task(cls, cfg=None, **kwargs) -> "VideoMCQATask":
        return cls(VideoMCQATaskConfig.from_run_cfg(cfg.run_cfg)) if cfg is not None else cls()

    def build_datasets(self, cfg):
        return BaseTask.build_datasets(self, cfg)

    def train_step(self, model, samples):
        raise UserError("lp_video_mcqa evaluates zero-shot; set run.evaluate: True")

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def option_scores(self, model, video: torch.Tensor, question: str, options: Sequence[str]
                      ) -> Dict[str, List[float]]:
        """``{protocol: [score per option]}`` for one video (1, C, T, H, W) and question."""
        c = self.cfg
        sel = ([f"{question} {o}" for o in options] if c.select_with_options else [question])
        out: Dict[str, List[float]] = {}
        for protocol in c.protocols:
            if protocol == "loglik":
                samples = {"video": video, "text_input": [question], "selection_text": [sel]}
                scores = model.score_candidates(samples, list(options), prompt=c.prompt)
            else:
                if len(options) > len(LETTERS):
                    raise UserError(f"{len(options)} options: more than there are letters")
                text = c.letter_prompt.format(question=question, options=lettered(options))
                samples = {"video": video, "text_input": [text], "selection_text": [sel]}
                scores = model.score_candidates(samples, list(LETTERS[:len(options)]),
                                                prompt="{}")
            out[protocol] = scores[0].float().cpu().tolist()
        return out

    def valid_step(self, model, samples) -> List[Dict[str, Any]]:
        """Per-question records ``{question_id, question, question_type, options, answer,
        scores: {protocol: [...]}, predictions: {protocol: index}}`` and skip records."""
        records = [{"question_id": _plain_id(s["key"]), "skipped": True, "kind": s["kind"],
                    "reason": s["reason"], "video": s["video"]}
                   for s in samples.get("skipped", []) or []]
        if "video" not in samples:
            return records
        video = samples["video"]
        n = video.shape[0]
        qids = _as_list(samples.get("question_id"), n)
        questions = _as_list(samples.get("text_input"), n)
        types = _as_list(samples.get("question_type"), n)
        answers = _as_list(samples.get("answer"), n)
        options = list(samples["options"])
        for i in range(n):  # options differ per question: one scoring call per video
            scores = self.option_scores(model, video[i:i + 1], questions[i], options[i])
            preds = {p: max(range(len(s)), key=lambda j: (s[j], -j)) for p, s in scores.items()}
            records.append({"question_id": _plain_id(qids[i]), "question": questions[i],
                            "question_type": types[i], "options": list(options[i]),
                            "answer": int(answers[i]), "scores": scores, "predictions": preds})
        return records

    @staticmethod
    def result_rows(protocol: str, answered: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        return [{"question_id": r["question_id"], "question": r.get("question"),
                 "question_type": r.get("question_type"), "options": r["options"],
                 "scores": r["scores"][protocol], "prediction": r["predictions"][protocol],
                 "predicted_option": r["options"][r["predictions"][protocol]],
                 "answer": r["answer"], "correct": r["predictions"][protocol] == r["answer"]}
                for r in answered]

    @staticmethod
    def protocol_metrics(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        """Accuracy overall and per question type; per NExT-QA group when every type is one of
        NExT-QA's codes."""
        out = protocol_metrics(rows)
        types = [r.get("question_type") for r in rows]
        if types and all(t in NEXTQA_TYPES for t in types):
            out["per_question_group"] = protocol_metrics(
                [dict(r, question_type=NEXTQA_TYPES[r["question_type"]]) for r in rows]
            )["per_question_type"]
        return out
