"""Registered builders for MSRVTT-QA, MSVD-QA and MSRVTT retrieval: local files, no downloads.

YAML (``datasets.<name>``; defaults in ``configs/datasets/lp_msrvtt/`` and ``lp_msvd/``)::

    data_type: videos
    on_bad_video: fail            # or "skip": leave unreadable videos out, count and report them
    build_info:
      annotations:
        train: {storage: msrvtt/annotations/qa_train.json}   # one path or a list of paths
        test:  {storage: msrvtt/annotations/qa_test.json}
        val: null                     # null leaves out a split the default YAML lists
        answer_list: {storage: ...}   # optional (QA): JSON list of answers or LAVIS's ans2label
      answer_list_splits: [train, test]   # optional (QA): where a missing answer list comes from
      videos: {storage: msrvtt/videos}
    vis_processor: {eval: {name: lp_video_eval, n_frms: 4, image_size: 224}}
    text_processor: {eval: {name: blip_question}}

Relative storage paths are resolved as LAVIS's builders resolve them: under LAVIS's cache root
(``env.cache_root`` of ``lavis/configs/default.yaml``); absolute paths and ``~`` are used as
given. Every annotation file and the videos folder must exist (``UserError`` naming the YAML key
otherwise); annotation ``video`` paths must stay inside the videos folder.

The candidate answer list of the QA datasets (for ranking answers by LLM log-likelihood,
InstructBLIP's protocol) is, in order of precedence: the file under
``annotations.answer_list`` (or LAVIS's key ``annotations.ans2label``); else every distinct answer
of the splits named by ``answer_list_splits`` (default: train and test, when listed under
``annotations``), most frequent first. Every split's dataset carries the same list.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

from lavis.common.registry import registry
from lavis.common.utils import get_cache_path
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder

from lavis_plugins.common.errors import UserError, unknown_name
from lavis_plugins.datasets.video_datasets import (
    MultipleChoiceVideoQADataset,
    VideoQADataset,
    VideoRetrievalDataset,
    VideoRetrievalEvalDataset,
    answers_from_annotations,
    check_policy,
    load_annotation_list,
    load_answer_list,
)
from lavis_plugins.paths import config_path

SPLITS = ("train", "val", "test")
# annotation keys that name answer-list files rather than splits
ANSWER_LIST_KEYS = ("answer_list", "ans2label")
# splits whose answers make the candidate list when no answer-list file is given
DEFAULT_ANSWER_LIST_SPLITS = ("train", "test")


def resolve_storage(path: str) -> str:
    """A storage path from a dataset YAML, made absolute the way LAVIS's builders do it."""
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) else get_cache_path(path)


class VideoBuilderBase(BaseDatasetBuilder):
    """Builds ``{split: dataset}`` from local annotation files and a videos folder."""

    def _name(self) -> str:
        for name, cls in registry.mapping["builder_name_mapping"].items():
            if cls is type(self):
                return name
        return type(self).__name__

    def build_datasets(self) -> Dict[str, Any]:
        # LAVIS downloads on the main process, then waits at a barrier; nothing is downloaded here,
        # and every rank checks its own paths (multi-node runs may not share a disk)
        return self.build()

    @staticmethod
    def _build_proc_from_cfg(cfg):
        if cfg is None:
            return None
        cls = registry.get_processor_class(cfg.name)
        if cls is None:
            raise unknown_name("processor", cfg.name, registry.mapping["processor_name_mapping"],
                               hint="A plugin processor registers when lavis_plugins is imported.")
        return cls.from_config(cfg)

    def resolve(self, path: str) -> str:
        """A storage path of this dataset's YAML, made absolute (``resolve_storage``)."""
        return resolve_storage(path)

    def _paths(self, key: str, storage: Any) -> List[str]:
        if storage is None:
            raise UserError(f"datasets.{self._name()}.{key}.storage is not set")
        storage = [storage] if isinstance(storage, str) else list(storage)
        out = [self.resolve(p) for p in storage]
        for p in out:
            if not os.path.isfile(p):
                raise UserError(f"datasets.{self._name()}.{key}: file not found: {p}. Set "
                                f"datasets.{self._name()}.{key}.storage to a local file (no "
                                "downloads happen here; relative paths are under LAVIS's "
                                "cache root).")
        return out

    def _videos_root(self) -> str:
        info = self.config.build_info.get("videos")
        if info is None or info.get("storage") is None:
            raise UserError(f"datasets.{self._name()}.build_info.videos.storage is not set")
        root = self.resolve(info.storage)
        if not os.path.isdir(root):
            raise UserError(f"datasets.{self._name()}.build_info.videos.storage: folder not "
                            f"found: {root}")
        return root

    def split_annotation_paths(self) -> Dict[str, List[str]]:
        """``{split: [annotation file, ...]}`` for the splits listed under build_info."""
        anns = self.config.build_info.get("annotations") or {}
        out = {}
        for split, info in anns.items():
            if split in ANSWER_LIST_KEYS or info is None:  # null: a default split left out
                continue
            if split not in SPLITS:
                raise UserError(f"datasets.{self._name()}.build_info.annotations.{split}: unknown "
                                f"split; use {', '.join(SPLITS)} (or answer_list)")
            out[split] = self._paths(f"build_info.annotations.{split}", (info or {}).get("storage"))
        if not out:
            raise UserError(f"datasets.{self._name()}.build_info.annotations lists no split")
        return out

    def dataset_kwargs(self, paths: Dict[str, List[str]]) -> Dict[str, Any]:
        """Extra constructor arguments shared by every split's dataset."""
        return {}

    def build(self) -> Dict[str, Any]:
        self.build_processors()
        policy = check_policy(str(self.config.get("on_bad_video", "fail")),
                              f"datasets.{self._name()}.on_bad_video")
        vis_root = self._videos_root()
        paths = self.split_annotation_paths()
        extra = self.dataset_kwargs(paths)
        datasets = {}
        for split, ann_paths in paths.items():
            mode = "train" if split == "train" else "eval"
            if self.vis_processors[mode] is None:
                raise UserError(f"datasets.{self._name()}.vis_processor.{mode} is not set but "
                                f"split {split!r} needs it (e.g. name: lp_video_{mode})")
            cls = self.train_dataset_cls if split == "train" else self.eval_dataset_cls
            datasets[split] = cls(vis_processor=self.vis_processors[mode],
                                  text_processor=self.text_processors[mode], vis_root=vis_root,
                                  ann_paths=ann_paths, on_bad_video=policy, **extra)
        return datasets


class VideoQABuilder(VideoBuilderBase):
    """Video QA (LAVIS's MSRVTT-QA / MSVD-QA format) with an optional candidate answer list."""

    train_dataset_cls = VideoQADataset
    eval_dataset_cls = VideoQADataset

    def answer_list(self, paths: Dict[str, List[str]]) -> Optional[List[str]]:
        """The candidate answers (see the module docstring), or None when no source exists."""
        anns = self.config.build_info.get("annotations") or {}
        for key in ANSWER_LIST_KEYS:
            if anns.get(key) is not None:
                files = self._paths(f"build_info.annotations.{key}", anns[key].get("storage"))
                merged: List[str] = []
                for f in files:
                    merged.extend(load_answer_list(f))
                return list(dict.fromkeys(merged))
        splits: Sequence[str] = self.config.build_info.get("answer_list_splits",
                                                           DEFAULT_ANSWER_LIST_SPLITS)
        unknown = [s for s in splits if s not in SPLITS]
        if unknown:
            raise UserError(f"datasets.{self._name()}.build_info.answer_list_splits names "
                            f"{unknown}; use {', '.join(SPLITS)}")
        records = [r for s in splits if s in paths for p in paths[s]
                   for r in load_annotation_list(p, ("answer",), "video QA")]
        return answers_from_annotations(records) or None

    def dataset_kwargs(self, paths):
        return {"answer_list": self.answer_list(paths)}


class VideoRetrievalBuilder(VideoBuilderBase):
    """Text-video retrieval (LAVIS's MSRVTT retrieval format)."""

    train_dataset_cls = VideoRetrievalDataset
    eval_dataset_cls = VideoRetrievalEvalDataset


@registry.register_builder("lp_msrvtt_qa")
class MSRVTTQABuilder(VideoQABuilder):
    """MSRVTT-QA: ~243K QA pairs over 10K clips (LAVIS's annotation files)."""

    DATASET_CONFIG_DICT = {"default": config_path("datasets/lp_msrvtt/defaults_qa.yaml")}


@registry.register_builder("lp_msvd_qa")
class MSVDQABuilder(VideoQABuilder):
    """MSVD-QA: ~50.5K QA pairs over 1,970 clips (LAVIS's annotation files)."""

    DATASET_CONFIG_DICT = {"default": config_path("datasets/lp_msvd/defaults_qa.yaml")}


@registry.register_builder("lp_msrvtt_retrieval")
class MSRVTTRetrievalBuilder(VideoRetrievalBuilder):
    """MSRVTT text-video retrieval (LAVIS's annotation files; 1K-A test split)."""

    DATASET_CONFIG_DICT = {"default": config_path("datasets/lp_msrvtt/defaults_ret.yaml")}


class MultipleChoiceVideoQABuilder(VideoBuilderBase):
    """Multiple-choice video QA from a published annotation format
    (:mod:`lavis_plugins.datasets.mc_formats`). ``build_info`` keys besides annotations/videos:
    ``ann_format`` (default: the benchmark's), ``video_template`` (file of a video id, default
    ``"{video}.mp4"``), ``video_map`` (NExT-QA's ``map_vid_vidorID.json``: ``{storage: ...}``),
    ``shuffle_seed`` (How2QA: option order; null keeps the correct answer first)."""

    train_dataset_cls = MultipleChoiceVideoQADataset
    eval_dataset_cls = MultipleChoiceVideoQADataset
    ANN_FORMAT = "json"

    def dataset_kwargs(self, paths: Dict[str, List[str]]) -> Dict[str, Any]:
        import json

        info = self.config.build_info
        kw: Dict[str, Any] = {"ann_format": str(info.get("ann_format") or self.ANN_FORMAT),
                              "video_template": str(info.get("video_template") or "{video}.mp4")}
        vmap = info.get("video_map")
        if vmap is not None:
            (path,) = self._paths("build_info.video_map", vmap.get("storage"))
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise UserError(f"datasets.{self._name()}.build_info.video_map {path}: must be a "
                                "JSON object {video id: path} (NExT-QA's map_vid_vidorID.json)")
            kw["video_map"] = {str(k): str(v) for k, v in data.items()}
        if info.get("shuffle_seed") is not None:
            kw["shuffle_seed"] = int(info.shuffle_seed)
        return kw


@registry.register_builder("lp_nextqa")
class NExTQABuilder(MultipleChoiceVideoQABuilder):
    """NExT-QA (5 options; causal / temporal / descriptive questions), its published CSVs."""

    ANN_FORMAT = "nextqa"
    DATASET_CONFIG_DICT = {"default": config_path("datasets/lp_nextqa/defaults_mc.yaml")}


@registry.register_builder("lp_star")
class STARBuilder(MultipleChoiceVideoQABuilder):
    """STAR situated reasoning (4 options; interaction / sequence / prediction / feasibility)."""

    ANN_FORMAT = "star"
    DATASET_CONFIG_DICT = {"default": config_path("datasets/lp_star/defaults_mc.yaml")}


@registry.register_builder("lp_how2qa")
class How2QABuilder(MultipleChoiceVideoQABuilder):
    """How2QA (4 options), its release CSVs."""

    ANN_FORMAT = "how2qa"
    DATASET_CONFIG_DICT = {"default": config_path("datasets/lp_how2qa/defaults_mc.yaml")}


@registry.register_builder("lp_video_mcqa")
class VideoMCQABuilder(MultipleChoiceVideoQABuilder):
    """Any multiple-choice video QA as a JSON list of {video, question, options, answer}."""

    DATASET_CONFIG_DICT = {"default": config_path("datasets/lp_video_mcqa/defaults_mc.yaml")}


class ShapesTemporalMixin:
    """Storage paths relative to the temporal split's folder (``build_info.root``: ``default``
    generates it on first use, :mod:`lavis_plugins.datasets.shapes_temporal`)."""

    def resolve(self, path: str) -> str:
        from lavis_plugins.datasets.shapes_temporal import ensure_temporal_split

        if getattr(self, "_root", None) is None:
            root = self.config.build_info.get("root", "default")
            self._root = (ensure_temporal_split() if root in (None, "default")
                          else os.path.abspath(os.path.expanduser(str(root))))
        return os.path.join(str(self._root), os.path.expanduser(str(path)))


@registry.register_builder("lp_shapes_temporal_qa")
class ShapesTemporalQABuilder(ShapesTemporalMixin, VideoQABuilder):
    """Open-ended video QA on the temporal split of the shapes videos (MSRVTT-QA format)."""

    DATASET_CONFIG_DICT = {"default": config_path("datasets/lp_shapes/defaults_temporal_qa.yaml")}


@registry.register_builder("lp_shapes_temporal_mc")
class ShapesTemporalMCBuilder(ShapesTemporalMixin, VideoMCQABuilder):
    """Multiple-choice video QA on the temporal split of the shapes videos."""

    DATASET_CONFIG_DICT = {"default": config_path("datasets/lp_shapes/defaults_temporal_mc.yaml")}
