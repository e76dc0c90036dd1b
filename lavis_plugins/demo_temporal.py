"""The demo's temporal-split rows: uniform vs question-aware frame selection at the same k.

Four evaluations of the VQA-fine-tuned model on :mod:`lavis_plugins.datasets.shapes_temporal`
(every question about a shape visible in 3 of 24 frames): open-ended (generate, rank) and
multiple choice (option log-likelihood), each with ``TEMPORAL_K`` uniformly sampled frames and
with ``TEMPORAL_K`` frames chosen among all 24 by the answering model itself: its LLM's
probability of "yes" to SeViLA's localizer prompt about each frame and the question (``llm``).
The report shows each accuracy beside its chance level, and how often the frames the model read
showed the asked-about shape.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

TEMPORAL_K = 2  # frames the model reads, in both rows
CANDIDATES = 24  # frames selection chooses from (every frame of the 24-frame clips)
# the answering LLM's "yes" to SeViLA's localizer prompt. Measured 2026-12-05 on one demo run
# (stage 1 with itm_negatives: mixed), % of questions whose 2 read frames show the asked-about
# shape: llm 86, itc 32, itm 26, uniform 25 (the earlier stage 1, whose ITM head learned almost
# nothing, gave itm 71-84 and itc 35); llm also needs no stage-1 checkpoint. itc with
# model.selection_aggregate: spread (multiple choice only) reached 60%, multiple choice 23.0
# vs 19.0 uniform and 34.0 llm (docs/benchmarks.md)
SELECTOR = "llm"
# stage key -> (dataset name, selects frames)
TEMPORAL_STAGES = {
    "temporal_uniform": ("lp_shapes_temporal_qa", False),
    "temporal_select": ("lp_shapes_temporal_qa", True),
    "temporal_mc_uniform": ("lp_shapes_temporal_mc", False),
    "temporal_mc_select": ("lp_shapes_temporal_mc", True),
}


def temporal_options(key: str, stage1_ckpt: str) -> List[str]:
    """The ``--options`` that make stage ``key`` uniform or selecting (beyond the model paths)."""
    dataset, select = TEMPORAL_STAGES[key]
    n = CANDIDATES if select else TEMPORAL_K
    opts = [f"datasets.{dataset}.vis_processor.eval.n_frms={n}"]
    if select:
        opts += [f"model.frame_selection={SELECTOR}", f"model.selection_k={TEMPORAL_K}"]
        if SELECTOR in ("itc", "itm"):  # scored by the stage-1 Q-Former
            opts.append(f"model.selector_checkpoint={stage1_ckpt}")
    return opts


def _result_rows(job_dir: Path, name: str) -> List[Dict[str, Any]]:
    path = job_dir / "result" / f"test_{name}.json"
    return json.loads(path.read_text()) if path.is_file() else []


def frame_hit_rate(rows: List[Dict[str, Any]], brief: Dict[Any, List[int]], select: bool) -> float:
    """% of questions whose read frames include one that shows the asked-about shape."""
    from lavis_plugins.datasets.shapes_temporal import brief_frame_hits
    from lavis_plugins.demo_data import VIDEO_FRAMES
    from lavis_plugins.video.decode import sample_indices

    uniform = sample_indices(VIDEO_FRAMES, TEMPORAL_K, "uniform")
    hits = []
    for r in rows:
        frames = r.get("selected_frames") if select else uniform
        if frames is None:
            continue
        if select:  # positions among the candidates -> frame numbers
            cand = sample_indices(VIDEO_FRAMES, CANDIDATES, "uniform")
            frames = [cand[i] for i in frames]
        hits.append(brief_frame_hits(frames, brief[r["question_id"]]) > 0)
    return 100.0 * sum(hits) / max(len(hits), 1)


def temporal_rows(results: Dict[str, Any], row_cls, qa_chance) -> Tuple[List[Any], List[str]]:
    """Metric rows (``row_cls`` = demo.MetricRow) and notes of the temporal stages present."""
    from lavis_plugins.datasets.shapes_temporal import ensure_temporal_split

    if not any(k in results for k in TEMPORAL_STAGES):
        return [], []
    ann = ensure_temporal_split() / "annotations"
    qa = json.loads((ann / "temporal_qa_test.json").read_text())
    mc = json.loads((ann / "temporal_mc_test.json").read_text())
    brief = {q["question_id"]: q["brief_frames"] for q in qa}
    c = qa_chance(qa)
    mc_chance = 100.0 * sum(1.0 / len(q["options"]) for q in mc) / len(mc)
    rows, notes = [], []
    how = {False: f"uniform {TEMPORAL_K} frames",
           True: f"{SELECTOR.upper()}-selected {TEMPORAL_K} of {CANDIDATES}"}
    for key, (dataset, select) in TEMPORAL_STAGES.items():
        if key not in results:
            continue
        m = results[key].metrics
        if dataset == "lp_shapes_temporal_qa":
            for proto in ("generate", "rank"):
                if isinstance(m.get(proto), dict):
                    rows.append(row_cls(
                        f"temporal split video QA, {proto}, {how[select]} (%)",
                        float(m[proto]["accuracy"]), c["majority"],
                        f"majority class: always answering {c['majority_answer']!r}",
                        comparison=True))
            hit = frame_hit_rate(_result_rows(results[key].job_dir, "video_qa_generate"), brief,
                                 select)
            notes.append(f"temporal split, {how[select]}: {hit:.0f}% of questions had a frame "
                         "showing the asked-about shape among the frames read")
        elif isinstance(m.get("loglik"), dict):
            rows.append(row_cls(f"temporal split multiple choice, {how[select]} (%)",
                                float(m["loglik"]["accuracy"]), mc_chance,
                                "random option: mean of 1 / number of options", comparison=True))
    return rows, notes
