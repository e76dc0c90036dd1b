"""Dataset classes for the built-in shapes dataset (``lavis_plugins.demo_data``).

They subclass LAVIS's own classes where those fit, so samples carry the keys LAVIS's tasks and
models read:

- captions: LAVIS's ``CaptionDataset`` (train: ``image``, ``text_input``, ``image_id``) and
  ``CaptionEvalDataset`` (``image``, ``image_id``, ``instance_id``), plus ``coco_gt_file``;
- retrieval: LAVIS's ``RetrievalDataset`` / ``RetrievalEvalDataset`` (``text``, ``image``,
  ``txt2img``, ``img2txt``);
- VQA: LAVIS's ``VQADataset`` semantics (answers with weights = their share of the answer list,
  collated into ``answer``/``weight``/``n_answers``) plus ``question_id``, ``question_type`` and
  ``instance_id``, and for evaluation ``answer_list`` and the VQAv2-format files LAVIS's
  ``VQATask`` scores with (``coco_fmt_qust_file``, ``coco_fmt_anno_file``);
- video QA: open-ended (``answer`` is the answer string), ``video`` (C, T, H, W) from the video
  processor, ``answer_list`` for answer ranking. LAVIS's ``VideoQADataset`` is a classification
  dataset (``answers`` = a class index) and does not fit, so this one subclasses ``BaseDataset``.

LAVIS tells a split's annotation files apart by their order in the YAML (its "TODO make this
order insensitive"); these classes tell them apart by content (:func:`load_annotation_files`).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from lavis.datasets.datasets.base_dataset import BaseDataset
from lavis.datasets.datasets.caption_datasets import CaptionDataset, CaptionEvalDataset
from lavis.datasets.datasets.retrieval_datasets import RetrievalDataset, RetrievalEvalDataset
from lavis.datasets.datasets.vqa_datasets import VQADataset

from lavis_plugins.common.errors import UserError
from lavis_plugins.datasets.validation import (
    check_image_file,
    check_text_fields,
    load_checked_image,
)


def resolve_inside(root: str | Path, rel: str | Path, what: str) -> Path:
    """``root / rel``, refusing a ``rel`` that is absolute or climbs out of ``root`` with "..".

    The check is lexical (no symlink resolution), so a root whose sub-folders are symlinks to
    another disk still works.
    """
    root_n = os.path.normpath(os.path.abspath(root))
    path_n = os.path.normpath(os.path.join(root_n, rel))
    if os.path.isabs(rel) or os.path.commonpath([root_n, path_n]) != root_n:
        raise UserError(
            f"{what} {str(rel)!r} escapes the dataset folder {root_n}; give a path relative to it "
            f"without '..'"
        )
    return Path(path_n)


@dataclass
class AnnotationFiles:
    """One split's annotation files, sorted by what they hold."""

    sample_paths: list = field(default_factory=list)  # JSON lists of sample dicts
    answer_list: Optional[list] = None  # candidate answers (a JSON list of strings)
    vqa_questions_file: Optional[str] = None  # VQAv2-format questions ({"questions": [...]})
    vqa_annotations_file: Optional[str] = None  # VQAv2-format answers ({"annotations": [...]})
    coco_gt_file: Optional[str] = None  # COCO caption ground truth ({"images", "annotations"})


def load_annotation_files(ann_paths: Sequence[str | Path]) -> AnnotationFiles:
    """Sort a split's annotation files by content; raise ``UserError`` on unreadable ones."""
    files = AnnotationFiles()
    for path in map(str, ann_paths):
        try:
            with open(path) as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise UserError(f"annotation file {path} does not exist; check the dataset's "
                            f"build_info.annotations storage paths") from None
        except ValueError as e:
            raise UserError(f"annotation file {path} is not valid JSON ({e}); regenerate the "
                            f"dataset or fix the file") from None
        if isinstance(data, list) and not data:
            raise UserError(f"annotation file {path} is an empty list: no samples; regenerate the "
                            "dataset or remove the file from build_info.annotations")
        if isinstance(data, list) and all(isinstance(x, dict) for x in data):
            files.sample_paths.append(path)
        elif isinstance(data, list) and all(isinstance(x, str) for x in data):
            files.answer_list = data
        elif isinstance(data, dict) and "questions" in data:
            files.vqa_questions_file = path
        elif isinstance(data, dict) and "annotations" in data and "images" in data:
            files.coco_gt_file = path
        elif isinstance(data, dict) and "annotations" in data:
            files.vqa_annotations_file = path
        else:
            raise UserError(
                f"annotation file {path} is none of: a list of samples, an answer list, VQAv2 "
                f"questions/annotations, COCO caption ground truth"
            )
    if not files.sample_paths:
        raise UserError(f"none of the annotation files {list(map(str, ann_paths))} holds a "
                        "non-empty list of samples")
    return files


def check_sample_paths(annotation: list[dict], key: str, vis_root: str) -> None:
    """Refuse samples whose ``key`` path is missing or escapes ``vis_root``."""
    for i, ann in enumerate(annotation):
        if key not in ann:
            raise UserError(f"annotation sample {i} has no {key!r} field: {ann}")
        resolve_inside(vis_root, ann[key], f"sample {i} {key} path")


class _ShapesAnnotations:
    """What every shapes dataset does first: sort the split's annotation files by content (kept
    as ``ann_files``), hand LAVIS's dataset class (the next base) only the sample lists, and
    refuse samples whose ``MEDIA_KEY`` path is missing or escapes ``vis_root``."""

    MEDIA_KEY = "image"  # sample field holding the path of the image (or video)
    # text fields every record must hold as a non-empty string (True: or a list of them)
    TEXT_FIELDS: Dict[str, bool] = {"caption": True}

    def __init__(self, vis_processor, text_processor, vis_root, ann_paths):
        files = load_annotation_files(ann_paths)
        super().__init__(vis_processor, text_processor, vis_root, files.sample_paths)
        check_sample_paths(self.annotation, self.MEDIA_KEY, vis_root)
        check_text_fields(self.annotation, self.TEXT_FIELDS, ", ".join(files.sample_paths))
        self.ann_files = files

    def __getitem__(self, index: int):
        if self.MEDIA_KEY == "image":  # missing, empty, truncated or non-image: BadSample
            check_image_file(os.path.join(self.vis_root, self.annotation[index]["image"]))
        return super().__getitem__(index)


class ShapesCaptionDataset(_ShapesAnnotations, CaptionDataset):
    """Training captions: one sample per (image, caption); LAVIS's ``CaptionDataset`` items."""


class ShapesCaptionEvalDataset(_ShapesAnnotations, CaptionEvalDataset):
    """Captioning evaluation: one sample per image; ``coco_gt_file`` holds its references."""

    def __init__(self, vis_processor, text_processor, vis_root, ann_paths):
        super().__init__(vis_processor, text_processor, vis_root, ann_paths)
        # COCO-format ground truth for pycocoevalcap (LAVIS's captioning task downloads COCO's)
        self.coco_gt_file = self.ann_files.coco_gt_file


class ShapesRetrievalDataset(_ShapesAnnotations, RetrievalDataset):
    """Retrieval training pairs: LAVIS's ``RetrievalDataset`` over the caption annotations."""


class ShapesRetrievalEvalDataset(_ShapesAnnotations, RetrievalEvalDataset):
    """Retrieval evaluation: each image with its reference captions (``text``, ``img2txt``, ...)."""


def answer_weights(answers: Sequence[str]) -> tuple[list[str], list[float]]:
    """Distinct answers in first-seen order, each weighted by its share of ``answers``.

    The weighting of LAVIS's ``COCOVQADataset.__getitem__`` (a test checks they agree).
    """
    counts = Counter(answers)
    distinct = list(dict.fromkeys(answers))
    return distinct, [counts[a] / len(answers) for a in distinct]


class ShapesVQADataset(_ShapesAnnotations, VQADataset):
    """Image VQA for training and evaluation.

    Item: ``image`` (C, H, W), ``text_input`` (question), ``answers`` (list of str), ``weights``
    (list of float), ``question_id`` (int), ``question_type`` (str), ``instance_id`` (str).
    Batch: LAVIS's VQA training keys ``image`` (B, C, H, W), ``text_input``, ``answer`` (all
    answers, flat), ``weight`` (flat), ``n_answers`` (B,), plus ``question_id`` (B,) and lists
    ``question_type`` and ``instance_id``.
    """

    TEXT_FIELDS = {"question": False, "answer": True}

    def __init__(self, vis_processor, text_processor, vis_root, ann_paths):
        super().__init__(vis_processor, text_processor, vis_root, ann_paths)
        # attribute names read by LAVIS's VQATask.build_datasets
        self.answer_list = self.ann_files.answer_list
        self.coco_fmt_qust_file = self.ann_files.vqa_questions_file
        self.coco_fmt_anno_file = self.ann_files.vqa_annotations_file

    def __getitem__(self, index: int) -> dict[str, Any]:
        ann = self.annotation[index]
        # missing, empty, truncated or non-image: BadSample
        image = load_checked_image(os.path.join(self.vis_root, ann["image"]))
        answers, weights = answer_weights(ann["answer"])
        return {
            "image": self.vis_processor(image),
            "text_input": self.text_processor(ann["question"]),
            "answers": answers,
            "weights": weights,
            "question_id": ann["question_id"],
            "question_type": ann["question_type"],
            "instance_id": ann["instance_id"],
        }

    def collater(self, samples: list[dict]) -> dict[str, Any]:
        batch = super().collater(samples)
        batch["question_id"] = torch.tensor([s["question_id"] for s in samples])
        batch["question_type"] = [s["question_type"] for s in samples]
        batch["instance_id"] = [s["instance_id"] for s in samples]
        return batch


class ShapesVideoQADataset(_ShapesAnnotations, BaseDataset):
    """Open-ended video QA in LAVIS's MSRVTT-QA annotation format.

    Item: ``video`` (C, T, H, W) from the video processor (called with the file path),
    ``text_input`` (question), ``answer`` (str), ``question_id`` (int), ``question_type`` (str),
    ``instance_id`` (str). Batch: ``video`` (B, C, T, H, W), ``question_id`` (B,), lists for the
    rest.
    """

    MEDIA_KEY = "video"
    TEXT_FIELDS = {"question": False, "answer": True}

    def __init__(self, vis_processor, text_processor, vis_root, ann_paths):
        super().__init__(vis_processor, text_processor, vis_root, ann_paths)
        self.answer_list = self.ann_files.answer_list  # candidates for answer ranking (or None)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ann = self.annotation[index]
        return {
            "video": self.vis_processor(os.path.join(self.vis_root, ann["video"])),
            "text_input": self.text_processor(ann["question"]),
            "answer": ann["answer"],
            "question_id": ann["question_id"],
            "question_type": ann.get("question_type", "all"),
            "instance_id": ann["instance_id"],
        }

    def collater(self, samples: list[dict]) -> dict[str, Any]:
        return {
            "video": torch.stack([s["video"] for s in samples]),
            "text_input": [s["text_input"] for s in samples],
            "answer": [s["answer"] for s in samples],
            "question_id": torch.tensor([s["question_id"] for s in samples]),
            "question_type": [s["question_type"] for s in samples],
            "instance_id": [s["instance_id"] for s in samples],
        }
