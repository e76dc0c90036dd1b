"""The temporal split of the shapes videos: questions whose answer shows in only a few frames.

Every clip (24 frames, 64x64, 8 fps, H.264 as the shapes videos) holds two moving shapes of
different kinds and colours, each in its own half of the frame: the *background* shape is
visible in every frame, the *brief* shape only in ``BRIEF_FRAMES`` consecutive frames starting at
a random frame. Both questions of a clip ask about the brief shape ("what color is the
triangle?", "which shape is purple?"), so a model only answers from frames that show it: uniform
sampling of k frames often misses them, question-aware selection of k among all frames can find
them. Each question also comes as multiple choice (colours: the answer, the background shape's
colour and two others; shapes: all three), with the answer at a random position.

Layout (generated once, deterministic for a seed; ``root`` holds ``manifest.json`` when
complete)::

    videos/test/<id>.mp4
    annotations/temporal_qa_test.json   [{question_id, video, question, answer, question_type,
                                          brief_frames: [first, last]}]   (MSRVTT-QA format)
    annotations/temporal_mc_test.json   [{question_id, video, question, options, answer,
                                          question_type}]   (multiple-choice JSON format)
    annotations/answer_list.json        every colour and shape (candidates for ranking)
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

FORMAT_VERSION = 1
DEFAULT_FOLDER = f"shapes_temporal_v{FORMAT_VERSION}"
BRIEF_FRAMES = 3  # frames in which the asked-about shape is visible (of VIDEO_FRAMES)
DEFAULT_VIDEOS = 100
VIDEO_ID_OFFSET = 3_000_000
MANIFEST = "manifest.json"


def default_root() -> Path:
    """Beside the shapes dataset: ``$LAVIS_PLUGINS_DATA/shapes_temporal_v1`` or the cache."""
    from lavis_plugins import demo_data

    return demo_data.default_root().parent / DEFAULT_FOLDER


def _clip_questions(rng: random.Random, video_id: int, rel: str, scene, first: int
                    ) -> List[Dict[str, Any]]:
    """The open and multiple-choice records of one clip (about its brief shape, scene[1])."""
    from lavis_plugins.demo_data import COLORS, SHAPES

    background, brief = scene
    out = []
    other_colors = [c for c in sorted(COLORS) if c not in (brief.color, background.color)]
    color_opts = [brief.color, background.color] + rng.sample(other_colors, 2)
    shape_opts = list(SHAPES)
    for j, (qtype, question, answer, options) in enumerate((
            ("color", f"what color is the {brief.shape}?", brief.color, color_opts),
            ("shape", f"which shape is {brief.color}?", brief.shape, shape_opts))):
        options = list(options)
        rng.shuffle(options)
        out.append({"question_id": video_id * 10 + j, "video": rel, "question": question,
                    "answer": answer, "question_type": qtype, "options": options,
                    "answer_index": options.index(answer),
                    "brief_frames": [first, first + BRIEF_FRAMES - 1]})
    return out


def generate_temporal_split(folder: Path, n_videos: int = DEFAULT_VIDEOS, seed: int = 0) -> Path:
    """Write the split into ``folder`` (which must not exist); returns it."""
    from lavis_plugins import demo_data as dd

    folder = Path(folder)
    (folder / "videos" / "test").mkdir(parents=True)
    (folder / "annotations").mkdir()
    rng = random.Random(f"temporal:{seed}")
    records: List[Dict[str, Any]] = []
    for i in range(n_videos):
        scene = dd._sample_scene(rng, 2, with_position=False)  # distinct shapes and colours
        tracks = dd._video_tracks(rng, scene)  # each shape in its own half: never overlapping
        first = rng.randint(0, dd.VIDEO_FRAMES - BRIEF_FRAMES)
        visible = [[True] * dd.VIDEO_FRAMES,
                   [first <= t < first + BRIEF_FRAMES for t in range(dd.VIDEO_FRAMES)]]
        video_id = VIDEO_ID_OFFSET + i
        rel = f"test/{video_id:07d}.mp4"
        dd._write_video(folder / "videos" / rel, scene, tracks, visible)
        records.extend(_clip_questions(rng, video_id, rel, scene, first))
    qa = [{k: r[k] for k in ("question_id", "video", "question", "answer", "question_type",
                             "brief_frames")} for r in records]
    mc = [{"question_id": r["question_id"], "video": r["video"], "question": r["question"],
           "options": r["options"], "answer": r["answer_index"],
           "question_type": r["question_type"]} for r in records]
    ann = folder / "annotations"
    (ann / "temporal_qa_test.json").write_text(json.dumps(qa, indent=1))
    (ann / "temporal_mc_test.json").write_text(json.dumps(mc, indent=1))
    (ann / "answer_list.json").write_text(json.dumps(sorted({*dd.COLORS, *dd.SHAPES})))
    (folder / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "seed": seed,
                                               "videos": n_videos, "questions": len(qa),
                                               "brief_frames": BRIEF_FRAMES}))
    return folder


def ensure_temporal_split(root: Optional[Path] = None, n_videos: int = DEFAULT_VIDEOS) -> Path:
    """The split's folder, generated first (a few seconds) when it has no manifest of this
    size; written into a temporary folder and moved into place, so a crash leaves no half."""
    root = Path(root) if root is not None else default_root()
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if manifest and manifest.get("format_version") == FORMAT_VERSION \
            and manifest.get("videos") == n_videos:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".temporal-", dir=root.parent))
    try:
        generate_temporal_split(tmp / "data", n_videos)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp / "data", root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def brief_frame_hits(indices: List[int], brief: List[int]) -> int:
    """How many of the sampled frame ``indices`` show the brief shape (frames brief[0]..[1])."""
    return sum(brief[0] <= i <= brief[1] for i in indices)
