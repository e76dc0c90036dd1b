"""Video QA and video-text retrieval datasets (LAVIS's MSRVTT/MSVD annotation formats).

Differences from LAVIS's ``VideoQADataset`` / ``VideoRetrieval*Dataset``:

- annotation files are validated when the dataset is built: a file that is not a JSON list of
  records, a record that lacks a required field, or a duplicate ``question_id`` is a ``UserError``
  naming the file, the record's position and the fix (LAVIS fails later with a ``KeyError``);
- a record's ``video`` path is joined onto the videos root and must stay inside it: absolute paths
  and ``..`` that climb out of the root are refused (``UserError``). The check is lexical (on the
  normalised path, not on symlink targets), so a videos root that is itself a symlink, or holds
  symlinked sub-folders, keeps working;
- a video that cannot be decoded (the video processors raise
  :class:`lavis_plugins.video.decode.VideoDecodeError`) follows the ``on_bad_video`` policy:
  ``"fail"`` re-raises the error (it names the file and the reason), ``"skip"`` replaces the
  sample by a *skip record* ``{"skipped": True, "key", "video", "kind", "reason"}``. The collater
  moves skip records out of the batch into ``batch["skipped"]`` (a list, always present), so they
  travel through DataLoader workers and distributed ranks with the results, and the evaluation
  task counts and reports them at the end (counting in the dataset object would lose counts made
  in worker processes);
- the QA answer is kept as a string (``answer``) instead of an ``ans2label`` class index, and an
  answer list (for ranking) is optional;
- batches keep ids as Python lists (not tensors), so string and integer ids both survive.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Any, Dict, Iterable, List, Literal, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

from lavis_plugins.common.errors import UserError
from lavis_plugins.datasets.validation import check_text_fields

logger = logging.getLogger(__name__)

BadVideoPolicy = Literal["fail", "skip"]
BAD_VIDEO_POLICIES = ("fail", "skip")


# ----------------------------------------------------------------------------------- helpers


def check_policy(policy: str, where: str = "on_bad_video") -> str:
    """``policy`` if it is a known bad-video policy, else a ``UserError`` naming ``where``."""
    if policy not in BAD_VIDEO_POLICIES:
        raise UserError(f"{where} is {policy!r}; use one of {', '.join(BAD_VIDEO_POLICIES)} "
                        "('fail' stops at the first unreadable video, 'skip' leaves it out and "
                        "counts it)")
    return policy


def video_path_in_root(vis_root: str, rel: Any, where: str) -> str:
    """``vis_root/rel``, refused (``UserError``) when ``rel`` is absolute or climbs out of it.

    Args:
        vis_root: the videos folder (``build_info.videos.storage``).
        rel: the annotation's ``video`` field.
        where: names the annotation file and record for the error message.
    """
    if not isinstance(rel, str) or not rel.strip():
        raise UserError(f"{where}: 'video' must be a non-empty path relative to the videos "
                        f"folder, got {rel!r}")
    if os.path.isabs(rel) or os.path.splitdrive(rel)[0]:
        raise UserError(f"{where}: video path {rel!r} is absolute; annotation paths must be "
                        f"relative to the videos folder {vis_root!r} "
                        "(set build_info.videos.storage to the common folder instead)")
    root = os.path.normpath(os.path.abspath(vis_root))
    path = os.path.normpath(os.path.join(root, rel))
    if os.path.commonpath([root, path]) != root:
        raise UserError(f"{where}: video path {rel!r} escapes the videos folder {vis_root!r}; "
                        "annotation paths must stay inside it (no '..' that climbs out)")
    return path


def load_annotation_list(path: str, required: Sequence[str], kind: str) -> List[Dict[str, Any]]:
    """The records of one annotation file: a JSON list of objects holding ``required`` fields."""
    if not os.path.isfile(path):
        raise UserError(f"{kind} annotation file not found: {path}. Set its "
                        "build_info.annotations.<split>.storage to a local file (no downloads "
                        "happen here).")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {kind} annotation file {path}: {e}") from e
    if not isinstance(data, list):
        raise UserError(f"{path}: a {kind} annotation file must be a JSON list of records "
                        f"({{{', '.join(required)}}}), got a {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: record {i} is a {type(rec).__name__}, not an object")
        missing = [k for k in required if k not in rec]
        if missing:
            raise UserError(f"{path}: record {i} lacks {missing} (a {kind} record needs "
                            f"{list(required)}; got {sorted(rec)})")
    return data


def load_answer_list(path: str) -> List[str]:
    """Candidate answers from a JSON list of strings, or from LAVIS's ``ans2label`` file (an
    object answer -> label; answers are ordered by label)."""
    if not os.path.isfile(path):
        raise UserError(f"answer list file not found: {path} "
                        "(build_info.annotations.answer_list.storage)")
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict):
        answers = [a for a, _ in sorted(data.items(), key=lambda kv: (kv[1], kv[0]))]
    elif isinstance(data, list) and all(isinstance(a, str) for a in data):
        answers = list(data)
    else:
        raise UserError(f"{path}: an answer list must be a JSON list of strings or an "
                        "{answer: label} object (LAVIS's ans2label)")
    if not answers:
        raise UserError(f"{path}: the answer list is empty")
    return list(dict.fromkeys(answers))  # unique, first occurrence kept


def answers_from_annotations(records: Iterable[Dict[str, Any]]) -> List[str]:
    """Candidate answers built from annotation records: every distinct answer, the most frequent
    first, ties in alphabetical order (deterministic whatever the file order)."""
    counts: Counter = Counter()
    for r in records:
        ans = r.get("answer")
        for a in ([ans] if isinstance(ans, str) else (ans or [])):
            counts[str(a)] += 1
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _skip_record(key: Any, path: str, err: Exception) -> Dict[str, Any]:
    return {"skipped": True, "key": key, "video": path,
            "kind": getattr(err, "kind", type(err).__name__), "reason": str(err)}


def collate_video_samples(samples: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Batch of video samples: tensors stacked (``video``: (B, C, T, H, W)), other fields as
    lists; skip records moved to ``batch["skipped"]`` (always present, maybe empty). A batch made
    only of skip records holds ``skipped`` and no ``video``."""
    kept = [s for s in samples if not s.get("skipped", False)]
    batch: Dict[str, Any] = {"skipped": [s for s in samples if s.get("skipped", False)]}
    if not kept:
        return batch
    for key in kept[0]:
        values = [s[key] for s in kept]
        if torch.is_tensor(values[0]):
            batch[key] = torch.stack(values, 0)
        else:
            batch[key] = values
    return batch


def _is_decode_error(err: BaseException) -> bool:
    from lavis_plugins.video.decode import VideoDecodeError

    return isinstance(err, VideoDecodeError)


# ----------------------------------------------------------------------------------- datasets


class _VideoDataset(Dataset):
    """Annotation list + videos root + processors + bad-video policy (shared by QA/retrieval)."""

    required_fields: Sequence[str] = ("video",)
    kind = "video"
    # fields that must be non-empty strings (True: or lists of them), checked at build time
    text_fields: Dict[str, bool] = {}

    def __init__(
        self,
        vis_processor=None,
        text_processor=None,
        vis_root: str = "",
        ann_paths: Sequence[str] = (),
        on_bad_video: BadVideoPolicy = "fail",
    ) -> None:
        self.vis_root = vis_root
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.on_bad_video = check_policy(on_bad_video)
        self.annotation: List[Dict[str, Any]] = []
        self.video_paths: List[str] = []
        for ann_path in ann_paths:
            records = self.read_annotations(ann_path)
            for i, rec in enumerate(records):
                self.video_paths.append(
                    video_path_in_root(vis_root, rec["video"], f"{ann_path}: record {i}"))
                self.annotation.append(rec)
        if ann_paths and not self.annotation:
            raise UserError(f"{self.kind} annotation files {list(ann_paths)} hold no records; "
                            "give files with at least one record")
        for idx, ann in enumerate(self.annotation):
            ann["instance_id"] = str(idx)  # as LAVIS's BaseDataset

    def read_annotations(self, ann_path: str) -> List[Dict[str, Any]]:
        """The records of one annotation file (LAVIS's JSON list by default), their text fields
        checked."""
        records = load_annotation_list(ann_path, self.required_fields, self.kind)
        check_text_fields(records, self.text_fields, ann_path)
        return records

    def __len__(self) -> int:
        return len(self.annotation)

    def set_processors(self, vis_processor, text_processor) -> None:
        self.vis_processor = vis_processor
        self.text_processor = text_processor

    def _text(self, text: str) -> str:
        return self.text_processor(text) if self.text_processor is not None else text

    def _video(self, index: int, key: Any) -> Union[torch.Tensor, Dict[str, Any]]:
        """The processed video ``(C, T, H, W)``, or a skip record under the ``skip`` policy."""
        path = self.video_paths[index]
        if self.vis_processor is None:
            raise UserError(f"{type(self).__name__} has no video processor: set "
                            "vis_processor.train/eval in the dataset config (lp_video_eval)")
        try:
            return self.vis_processor(path)
        except Exception as e:  # noqa: BLE001 - only decode errors are skippable, others re-raise
            if self.on_bad_video == "skip" and _is_decode_error(e):
                logger.warning("skipping %s (%s): %s", path, getattr(e, "kind", "error"), e)
                return _skip_record(key, path, e)
            raise

    def collater(self, samples):
        return collate_video_samples(samples)


class VideoQADataset(_VideoDataset):
    """Video QA records ``{video, question, answer, question_id[, question_type]}``.

    A sample is ``{"video": (C, T, H, W), "text_input": processed question, "answer": str,
    "question_id", "question_type" (None when absent), "instance_id"}``; ``question_id`` defaults
    to the record's position when the file has none, and must be unique.
    """

    required_fields = ("video", "question", "answer")
    kind = "video QA"
    text_fields = {"question": False, "answer": True}

    def __init__(self, vis_processor=None, text_processor=None, vis_root: str = "",
                 ann_paths: Sequence[str] = (), on_bad_video: BadVideoPolicy = "fail",
                 answer_list: Optional[List[str]] = None) -> None:
        super().__init__(vis_processor, text_processor, vis_root, ann_paths, on_bad_video)
        seen: Dict[str, int] = {}
        for idx, ann in enumerate(self.annotation):
            ann.setdefault("question_id", idx)
            qid = str(ann["question_id"])
            if qid in seen:
                raise UserError(f"video QA annotations {list(ann_paths)}: question_id {qid!r} "
                                f"appears twice (records {seen[qid]} and {idx}); question ids "
                                "must be unique (results are merged by them)")
            seen[qid] = idx
        # candidate answers for ranking (None: the builder/task provides them)
        self.answer_list = answer_list

    def __getitem__(self, index: int) -> Dict[str, Any]:
        ann = self.annotation[index]
        video = self._video(index, ann["question_id"])
        if isinstance(video, dict):
            return video
        return {
            "video": video,
            "text_input": self._text(ann["question"]),
            "answer": ann["answer"],
            "question_id": ann["question_id"],
            "question_type": ann.get("question_type"),
            "instance_id": ann["instance_id"],
        }


class VideoRetrievalDataset(_VideoDataset):
    """Training records ``{video, caption}`` (one caption each): ``{"video", "text_input",
    "image_id"}`` where ``image_id`` numbers the distinct videos (as LAVIS's, for ITC)."""

    required_fields = ("video", "caption")
    kind = "video retrieval"
    text_fields = {"caption": True}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.img_ids: Dict[str, int] = {}
        for ann in self.annotation:
            self.img_ids.setdefault(ann["video"], len(self.img_ids))

    def __getitem__(self, index: int) -> Dict[str, Any]:
        ann = self.annotation[index]
        video = self._video(index, self.img_ids[ann["video"]])
        if isinstance(video, dict):
            return video
        return {"video": video, "text_input": self._text(ann["caption"]),
                "image_id": self.img_ids[ann["video"]], "instance_id": ann["instance_id"]}


class VideoRetrievalEvalDataset(_VideoDataset):
    """Evaluation records ``{video, caption: [captions]}``, LAVIS's layout: ``text`` holds every
    caption, ``txt2img[t]`` the video of caption ``t`` and ``img2txt[v]`` the captions of video
    ``v``; a sample is ``{"video", "index"}`` (a skip record's ``key`` is the index)."""

    required_fields = ("video", "caption")
    kind = "video retrieval"
    text_fields = {"caption": True}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.text: List[str] = []
        self.image: List[str] = []
        self.txt2img: Dict[int, int] = {}
        self.img2txt: Dict[int, List[int]] = {}
        for vid, ann in enumerate(self.annotation):
            captions = ann["caption"]
            captions = [captions] if isinstance(captions, str) else list(captions)
            self.image.append(ann["video"])
            self.img2txt[vid] = []
            for cap in captions:
                self.img2txt[vid].append(len(self.text))
                self.txt2img[len(self.text)] = vid
                self.text.append(self._text(cap))

    def __getitem__(self, index: int) -> Dict[str, Any]:
        video = self._video(index, index)
        if isinstance(video, dict):
            return video
        return {"video": video, "index": index}


class MultipleChoiceVideoQADataset(_VideoDataset):
    """Multiple-choice video QA (NExT-QA, STAR, How2QA, or a plain JSON list): the records of
    :mod:`lavis_plugins.datasets.mc_formats`. A sample is ``{"video", "text_input": processed
    question, "options": [option texts], "answer": correct index, "question_id",
    "question_type", "instance_id"}``."""

    kind = "multiple-choice video QA"

    def __init__(self, vis_processor=None, text_processor=None, vis_root: str = "",
                 ann_paths: Sequence[str] = (), on_bad_video: BadVideoPolicy = "fail",
                 ann_format: str = "json", video_template: str = "{video}.mp4",
                 video_map: Optional[Dict[str, str]] = None, shuffle_seed: Optional[int] = None
                 ) -> None:
        self.ann_format, self.video_template = ann_format, video_template
        self.video_map, self.shuffle_seed = video_map, shuffle_seed
        super().__init__(vis_processor, text_processor, vis_root, ann_paths, on_bad_video)
        seen: Dict[str, int] = {}
        for idx, ann in enumerate(self.annotation):
            qid = str(ann["question_id"])
            if qid in seen:
                raise UserError(f"{self.kind} annotations {list(ann_paths)}: question_id {qid!r} "
                                f"appears twice (records {seen[qid]} and {idx})")
            seen[qid] = idx

    def read_annotations(self, ann_path: str) -> List[Dict[str, Any]]:
        from lavis_plugins.datasets.mc_formats import apply_video_map, read_mc_annotations

        records = read_mc_annotations(ann_path, self.ann_format, self.video_template,
                                      self.shuffle_seed)
        if self.video_map is not None:
            apply_video_map(records, self.video_map, self.video_template, ann_path)
        return records

    def __getitem__(self, index: int) -> Dict[str, Any]:
        ann = self.annotation[index]
        video = self._video(index, ann["question_id"])
        if isinstance(video, dict):
            return video
        return {"video": video, "text_input": self._text(ann["question"]),
                "options": list(ann["options"]), "answer": ann["answer"],
                "question_id": ann["question_id"], "question_type": ann.get("question_type"),
                "instance_id": ann["instance_id"]}
