"""The temporal split of the shapes videos: the asked-about shape is visible only in the frames
its record names, and both builders (open-ended, multiple choice) read the split."""
from __future__ import annotations

import json

import numpy as np
from omegaconf import OmegaConf


def test_the_brief_shape_shows_only_in_its_frames_and_builders_read_the_split(lp, tmp_path):
    from lavis.common.registry import registry

    from lavis_plugins.datasets.shapes_temporal import ensure_temporal_split
    from lavis_plugins.demo_data import COLORS, VIDEO_FRAMES
    from lavis_plugins.video import read_frames

    root = ensure_temporal_split(tmp_path / "temporal", n_videos=3)
    qa = json.loads((root / "annotations" / "temporal_qa_test.json").read_text())
    mc = json.loads((root / "annotations" / "temporal_mc_test.json").read_text())
    assert len(qa) == len(mc) == 6
    for q in qa[::2]:  # the colour question of each clip: its answer is the brief shape's colour
        frames = read_frames(root / "videos" / q["video"], VIDEO_FRAMES, "uniform").frames
        target = np.array(COLORS[q["answer"]], dtype=np.int16)
        lo, hi = q["brief_frames"]
        for t, frame in enumerate(frames):
            bottom = frame.numpy().astype(np.int16)[32:]  # the brief shape's half
            shown = int((np.abs(bottom - target).max(-1) < 40).sum())
            assert (shown > 10) == (lo <= t <= hi), (q["video"], t, shown)
    for m, q in zip(mc, qa):
        assert (m["options"][m["answer"]] == q["answer"]
                and len(set(m["options"])) == len(m["options"]))

    for name, n in (("lp_shapes_temporal_qa", 6), ("lp_shapes_temporal_mc", 6)):
        cls = registry.get_builder_class(name)
        cfg = OmegaConf.load(cls.default_config_path()).datasets[name]
        cfg.build_info.root = str(root)
        ds = cls(cfg).build_datasets()["test"]
        assert len(ds) == n and ds[0]["video"].shape[:2] == (3, 2)
    assert ds[1]["options"] == mc[1]["options"] and ds[1]["answer"] == mc[1]["answer"]
