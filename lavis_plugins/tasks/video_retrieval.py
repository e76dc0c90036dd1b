"""Zero-shot text-video retrieval: ``lp_video_retrieval``.

LAVIS's ``retrieval`` task with three differences:
- it asks the model for its skipped videos (``compute_sim_matrix(..., return_skipped=True)``,
  see ``lp_blip2_video_qformer``): videos that could not be read under ``on_bad_video: skip``
  are left out of the metrics together with their captions, and counted
  (``num_skipped_videos``, ``num_skipped_texts``, ``skipped_by_kind``);
- works under lp_runner's sharded evaluation (the model gathers what it needs; LAVIS's task
  assumes each process sees the whole dataset);
- the metrics also carry direction-named copies: ``t2v_r1/5/10`` (text -> video, LAVIS's
  ``img_r*``) and ``v2t_r1/5/10`` (video -> text, LAVIS's ``txt_r*``).

``run.k_test`` (default 128) is the number of ITC candidates re-ranked by ITM per query.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from lavis.common.registry import registry
from lavis.tasks.retrieval import RetrievalTask

from lavis_plugins.common import dist
from lavis_plugins.common.errors import UserError
from lavis_plugins.tasks.retrieval import write_retrieval_topk

logger = logging.getLogger(__name__)


def drop_videos(score_i2t: np.ndarray, score_t2i: np.ndarray, txt2img: Mapping[int, int],
                img2txt: Mapping[int, Sequence[int]], dropped: Sequence[int]
                ) -> Tuple[np.ndarray, np.ndarray, Dict[int, int], Dict[int, List[int]]]:
    """The score matrices and index maps without the ``dropped`` videos and their captions,
    renumbered (videos and texts keep their order)."""
    dropped_set = set(int(v) for v in dropped)
    keep_v = [v for v in range(score_i2t.shape[0]) if v not in dropped_set]
    keep_t = [t for t in range(score_i2t.shape[1]) if int(txt2img[t]) not in dropped_set]
    new_v = {v: i for i, v in enumerate(keep_v)}
    new_t = {t: i for i, t in enumerate(keep_t)}
    i2t = score_i2t[np.ix_(keep_v, keep_t)]
    t2i = score_t2i[np.ix_(keep_t, keep_v)]
    t2v = {new_t[t]: new_v[int(txt2img[t])] for t in keep_t}
    v2t = {new_v[v]: [new_t[t] for t in img2txt[v]] for v in keep_v}
    return i2t, t2i, t2v, v2t


@registry.register_task("lp_video_retrieval")
class VideoRetrievalTask(RetrievalTask):
    """Text-video retrieval evaluation (R@1/5/10 both ways) with skipped-video accounting."""

    @classmethod
    def setup_task(cls, cfg=None, **kwargs) -> "VideoRetrievalTask":
        return cls(cfg=cfg.run_cfg if cfg is not None else {})

    def evaluation(self, model, data_loader, **kwargs) -> Optional[Dict[str, Any]]:
        compute = getattr(model, "compute_sim_matrix", None)
        if compute is None:
            raise UserError(f"run.task lp_video_retrieval needs a model with compute_sim_matrix "
                            f"(lp_blip2_video_qformer); {type(model).__name__} has none")
        score_i2t, score_t2i, skipped = compute(data_loader, task_cfg=self.cfg,
                                                return_skipped=True)
        if not dist.is_main_process():
            return None
        dataset = data_loader.dataset
        dropped = sorted({int(s["key"]) for s in skipped})
        i2t, t2i, txt2img, img2txt = drop_videos(score_i2t, score_t2i, dataset.txt2img,
                                                 dataset.img2txt, dropped)
        if not len(i2t) or not len(t2i):
            raise UserError(f"no video of the {len(dataset)} could be read (all skipped); "
                            "nothing to evaluate")
        metrics = self._report_metrics(i2t, t2i, txt2img, img2txt)  # LAVIS's, logs evaluate.txt
        for lavis_name, name in (("img", "t2v"), ("txt", "v2t")):
            for k in ("r1", "r5", "r10"):
                metrics[f"{name}_{k}"] = metrics[f"{lavis_name}_{k}"]
        metrics.update(num_videos=int(i2t.shape[0]), num_texts=int(i2t.shape[1]),
                       num_skipped_videos=len(dropped),
                       num_skipped_texts=int(score_i2t.shape[1] - i2t.shape[1]))
        if dropped:
            metrics["skipped_by_kind"] = dict(sorted(Counter(s["kind"] for s in skipped).items()))
            logger.warning("video retrieval: %d videos could not be read and are left out with "
                           "their %d captions (%s): %s", len(dropped),
                           metrics["num_skipped_texts"], metrics["skipped_by_kind"],
                           [s["video"] for s in skipped][:5])
        # after_evaluation writes the top-k file over the readable videos (renumbered, in order)
        gone = set(dropped)
        kept_v = [v for v in range(score_i2t.shape[0]) if v not in gone]
        kept_t = [t for t in range(score_i2t.shape[1]) if int(dataset.txt2img[t]) not in gone]
        self._last = (i2t, t2i, [str(dataset.image[v]) for v in kept_v],
                      [dataset.text[t] for t in kept_t], img2txt, txt2img)
        return metrics

    def after_evaluation(self, val_result, split_name=None, epoch=None, **kwargs):
        last, self._last = getattr(self, "_last", None), None
        if val_result is not None and dist.is_main_process():
            with open(os.path.join(registry.get_path("output_dir"), "evaluate.txt"), "a") as f:
                f.write(json.dumps({split_name: val_result}) + "\n")
            if last is not None:
                i2t, t2i, videos, texts, img2txt, txt2img = last
                write_retrieval_topk(self.cfg, split_name, epoch, i2t, t2i, videos, texts,
                                     img2txt, txt2img, item="video")
        return val_result
