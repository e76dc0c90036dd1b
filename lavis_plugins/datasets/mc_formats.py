"""Readers of the published multiple-choice video QA annotation formats.

Each reader turns one annotation file into records ``{video, video_id, question, options, answer,
question_id, question_type}`` (``answer``: the index of the correct option; ``video_id``: the
file's own video id; ``video``: the file name relative to the videos folder, from
``video_template``). Bad files give one ``UserError``
naming the file, the row and the fix.

Formats (``ann_format`` of the builders):

- ``nextqa``: NExT-QA's CSV (``train.csv`` / ``val.csv`` / ``test.csv``) with the header
  ``video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4``; ``answer`` is the
  option index. ``type`` is kept as ``question_type`` (CW, CH, TN, TC, TP, DC, DL, DO); the
  ``lp_video_mcqa`` task groups it into causal / temporal / descriptive (``NEXTQA_TYPES``).
  Video ids map to paths through ``map_vid_vidorID.json`` when the builder gives ``video_map``.
- ``star``: STAR's JSON (``STAR_val.json``): a list of ``{question_id, question, video_id, start,
  end, answer, choices: [{choice_id, choice}, ...]}``; the answer is the choice whose text equals
  ``answer``; ``question_type`` is the ``question_id`` prefix (Interaction, Sequence,
  Prediction, Feasibility). ``start`` / ``end`` (seconds) are kept in the record.
- ``how2qa``: How2QA's release CSV (no header): ``video_id, timestamps, wrong answer 1, wrong
  answer 2, wrong answer 3, question, correct answer``; the correct answer becomes option 0
  unless ``shuffle_seed`` orders the options (the published files fix no order).
- ``json``: a JSON list of ``{video, question, options: [...], answer: index}`` (or SeViLA's
  ``a0`` ... ``a4`` fields instead of ``options``), optional ``question_id`` / ``question_type``.
"""
from __future__ import annotations

import csv
import os
import random
from typing import Any, Callable, Dict, List, Optional

from lavis_plugins.common.errors import UserError, unknown_name
from lavis_plugins.datasets.video_datasets import load_annotation_list

NEXTQA_COLUMNS = ("video", "question", "answer", "qid", "type", "a0", "a1", "a2", "a3", "a4")
HOW2QA_COLUMNS = 7
MAX_OPTIONS = 10
Record = Dict[str, Any]


def _open_text(path: str, kind: str):
    if not os.path.isfile(path):
        raise UserError(f"{kind} annotation file not found: {path}. Set its "
                        "build_info.annotations.<split>.storage to a local file")
    return open(path, newline="", encoding="utf-8")


def _check(rec: Record, where: str) -> Record:
    """A normalised record, checked: 2..10 non-empty options and an answer index among them."""
    opts = rec["options"]
    if not 2 <= len(opts) <= MAX_OPTIONS or not all(isinstance(o, str) and o.strip()
                                                     for o in opts):
        raise UserError(f"{where}: a multiple-choice question needs 2 to {MAX_OPTIONS} non-empty "
                        f"options, got {opts!r}")
    if not isinstance(rec["question"], str) or not rec["question"].strip():
        raise UserError(f"{where}: the question is empty")
    ans = rec["answer"]
    if isinstance(ans, bool) or not isinstance(ans, int) or not 0 <= ans < len(opts):
        raise UserError(f"{where}: answer {ans!r} is not an option index in [0, {len(opts)}); "
                        "it must be the position of the correct option")
    return rec


def _int(value: Any, where: str, name: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise UserError(f"{where}: {name} {value!r} is not an integer") from None


def read_nextqa(path: str, video_template: str) -> List[Record]:
    with _open_text(path, "NExT-QA") as f:
        rows = list(csv.DictReader(f))
        header = rows[0].keys() if rows else []
    missing = [c for c in NEXTQA_COLUMNS if c not in header]
    if missing:
        raise UserError(f"{path}: a NExT-QA CSV needs the columns {list(NEXTQA_COLUMNS)}; "
                        f"missing {missing} (is this NExT-QA's train/val/test.csv?)")
    out = []
    for i, row in enumerate(rows):
        where = f"{path}: row {i + 2}"
        vid = row["video"].strip()
        out.append(_check({
            "video": video_template.format(video=vid), "video_id": vid,
            "question": row["question"].strip(),
            "options": [row[f"a{j}"].strip() for j in range(5)],
            "answer": _int(row["answer"], where, "answer"),
            "question_id": f"{vid}_{row['qid'].strip()}",
            "question_type": row["type"].strip() or None,
        }, where))
    return out


def read_star(path: str, video_template: str) -> List[Record]:
    data = load_annotation_list(path, ("question_id", "question", "video_id", "answer", "choices"),
                                "STAR")
    out = []
    for i, rec in enumerate(data):
        where = f"{path}: record {i}"
        choices = sorted(rec["choices"], key=lambda c: c.get("choice_id", 0))
        options = [str(c.get("choice", "")).strip() for c in choices]
        answer = str(rec["answer"]).strip()
        if answer not in options:
            raise UserError(f"{where}: answer {answer!r} is none of the choices {options}")
        out.append(_check({
            "video": video_template.format(video=rec["video_id"]), "video_id": rec["video_id"],
            "question": str(rec["question"]).strip(), "options": options,
            "answer": options.index(answer), "question_id": rec["question_id"],
            "question_type": str(rec["question_id"]).split("_")[0],
            "start": rec.get("start"), "end": rec.get("end"),
        }, where))
    return out


def read_how2qa(path: str, video_template: str, shuffle_seed: Optional[int] = None
                ) -> List[Record]:
    with _open_text(path, "How2QA") as f:
        rows = list(csv.reader(f))
    out = []
    for i, row in enumerate(rows):
        where = f"{path}: row {i + 1}"
        if len(row) != HOW2QA_COLUMNS:
            raise UserError(f"{where} has {len(row)} columns; How2QA's release CSV has "
                            f"{HOW2QA_COLUMNS} (video_id, timestamps, 3 wrong answers, question, "
                            "correct answer), no header")
        vid, ts, w1, w2, w3, question, correct = (c.strip() for c in row)
        options = [correct, w1, w2, w3]
        order = list(range(4))
        if shuffle_seed is not None:
            random.Random(f"{shuffle_seed}:{i}").shuffle(order)
        out.append(_check({
            "video": video_template.format(video=vid), "video_id": vid, "question": question,
            "options": [options[j] for j in order], "answer": order.index(0),
            "question_id": f"{vid}_{i}", "question_type": None, "timestamps": ts,
        }, where))
    return out


def read_json(path: str, video_template: str) -> List[Record]:
    data = load_annotation_list(path, ("video", "question", "answer"), "multiple-choice")
    out = []
    for i, rec in enumerate(data):
        where = f"{path}: record {i}"
        if "options" in rec:
            options = rec["options"]
        else:
            options = [rec[f"a{j}"] for j in range(MAX_OPTIONS) if f"a{j}" in rec]
        if not isinstance(options, list):
            raise UserError(f"{where}: options must be a list (or give a0..a4), got "
                            f"{type(options).__name__}")
        out.append(_check({
            "video": video_template.format(video=rec["video"]), "video_id": rec["video"],
            "question": rec["question"], "options": [str(o).strip() for o in options],
            "answer": rec["answer"], "question_id": rec.get("question_id", rec.get("qid", i)),
            "question_type": rec.get("question_type", rec.get("type")),
        }, where))
    return out


READERS: Dict[str, Callable[..., List[Record]]] = {
    "nextqa": read_nextqa, "star": read_star, "how2qa": read_how2qa, "json": read_json}


def read_mc_annotations(path: str, ann_format: str, video_template: str = "{video}.mp4",
                        shuffle_seed: Optional[int] = None) -> List[Record]:
    """The normalised records of one annotation file of ``ann_format`` (module docstring)."""
    if ann_format not in READERS:
        raise unknown_name("multiple-choice ann_format", ann_format, READERS)
    try:
        video_template.format(video="x")
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"video_template {video_template!r}: only '{{video}}' may be "
                        "substituted (e.g. '{video}.mp4')") from e
    if ann_format == "how2qa":
        return read_how2qa(path, video_template, shuffle_seed)
    return READERS[ann_format](path, video_template)


def apply_video_map(records: List[Record], video_map: Dict[str, str], template: str,
                    path: str) -> None:
    """NExT-QA's ``map_vid_vidorID.json``: each record's video id (``video_id``, as the file
    gives it; the map's keys are strings) -> its path (in place)."""
    for rec in records:
        vid = str(rec["video_id"])
        if vid not in video_map:
            raise UserError(f"video {vid!r} is not in the video map {path}")
        rec["video"] = template.format(video=video_map[vid])
