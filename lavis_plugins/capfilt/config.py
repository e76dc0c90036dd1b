"""CapFilt's settings: the ``run.capfilt:`` section of an ``lp_capfilt`` YAML."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from lavis_plugins.common.errors import UserError

# ITM matched probability, ITC similarity (max over queries) of the filter model; CLIP image-text
# cosine similarity of the ranker (BLIP-2 ranked by CLIP ViT-L/14)
SCORE_HEADS = ("itm", "itc", "clip")


@dataclass
class CapFiltConfig:
    """Every CapFilt setting (each default is written here only).

    The filter is the run's ``model:``; the captioner is ``captioner`` (a model config) or, when
    that is empty, the same model (``lp_blip2_qformer`` captions with its ITG decoder).
    """

    # folder of the partial outputs, the merged annotation files and the report; a run into a
    # folder that holds an unfinished run with the same settings continues it
    output: str = ""
    num_captions: int = 10  # synthetic captions per image (BLIP-2: 10); 0: filter the web text only
    top_p: float = 0.9  # nucleus sampling mass (BLIP: 0.9)
    max_len: int = 30  # most tokens per synthetic caption (as the captioner counts them)
    min_len: int = 5  # fewest tokens per synthetic caption
    repetition_penalty: float = 1.0  # >1 discourages repeated tokens
    prompt: Optional[str] = None  # text the captioner continues ("a photo of"); LLM captioners
    # the captioner's model config ({arch, model_type, other model keys}); empty: the filter model
    captioner: Dict[str, Any] = field(default_factory=dict)
    scores: List[str] = field(default_factory=lambda: ["itm", "itc"])  # filter scores computed
    # the CLIP model of the "clip" score (lavis_plugins.capfilt.clip_ranker): {arch:
    # clip_feature_extractor, model_type, pretrained, model_config}; empty: no CLIP
    ranker: Dict[str, Any] = field(default_factory=dict)
    rank_by: str = "itc"  # the score top_k keeps the best of (BLIP-2: image-text similarity)
    top_k: Optional[int] = 2  # captions kept per image (BLIP-2: 2); null: no limit
    itm_threshold: Optional[float] = None  # drop captions whose ITM probability is below (BLIP)
    shards: Optional[str] = None  # also write the kept captions as a shard set into this folder
    shard_size: int = 1000  # images per output shard
    report_examples: int = 8  # images in the report's example grid

    @classmethod
    def from_mapping(cls, cfg: Optional[Mapping[str, Any]]) -> "CapFiltConfig":
        """From ``run.capfilt``; an unknown key or a bad value is a ``UserError`` naming it."""
        if cfg is None:
            raise UserError("run.capfilt is missing: lp_capfilt needs at least "
                            "run.capfilt.output (the output folder)")
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf comes with LAVIS
            pass
        if not isinstance(cfg, Mapping):
            raise UserError(f"run.capfilt must be a mapping of settings, got {cfg!r}")
        accepted = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(cfg) - set(accepted))
        if unknown:
            import difflib

            hints = [m for k in unknown for m in difflib.get_close_matches(k, accepted, n=1)]
            raise UserError(f"run.capfilt: unknown key(s) {unknown}"
                            + (f" (did you mean {hints}?)" if hints else "")
                            + f". Accepted: {accepted}")
        values = dict(cfg)
        for key in ("captioner", "ranker"):
            if values.get(key) is None:
                values[key] = {}
        out = cls(**values)
        out.check()
        return out

    def check(self) -> None:
        """Each value's type and range, and that the selection is possible."""
        def bad(key: str, what: str) -> UserError:
            return UserError(f"run.capfilt.{key} = {getattr(self, key)!r}: {what}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not isinstance(self.output, str) or not self.output.strip():
            raise bad("output", "give the output folder (e.g. output/capfilt/coco)")
        if not is_int(self.num_captions) or self.num_captions < 0:
            raise bad("num_captions", "must be an integer >= 0")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be a number in (0, 1]")
        for key in ("max_len", "min_len", "shard_size"):
            if not is_int(getattr(self, key)) or getattr(self, key) < (0 if key == "min_len"
                                                                       else 1):
                raise bad(key, f"must be an integer >= {0 if key == 'min_len' else 1}")
        if self.min_len > self.max_len:
            raise bad("min_len", f"must not exceed max_len ({self.max_len})")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be a number > 0")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise bad("prompt", "must be a string or null")
        if not isinstance(self.captioner, Mapping) or (self.captioner and
                                                       "arch" not in self.captioner):
            raise bad("captioner", "must be a model config with arch (and model_type), or "
                                   "empty to caption with the filter model")
        if isinstance(self.scores, str):
            self.scores = [self.scores]
        if not isinstance(self.scores, list) or not self.scores or any(
                s not in SCORE_HEADS for s in self.scores):
            raise bad("scores", f"must be a non-empty list of {list(SCORE_HEADS)}")
        if not isinstance(self.ranker, Mapping):
            raise bad("ranker", "must be a CLIP model config (arch, model_type, pretrained) or "
                                "empty")
        if ("clip" in self.scores) != bool(self.ranker):
            raise UserError("run.capfilt: the clip score needs run.capfilt.ranker (a CLIP model "
                            "config) and a ranker needs clip in run.capfilt.scores; set both or "
                            "neither")
        if self.rank_by not in self.scores:
            raise bad("rank_by", f"must be one of the computed scores {self.scores}")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise bad("top_k", "must be an integer >= 1, or null for no limit")
        if self.itm_threshold is not None:
            if not is_num(self.itm_threshold) or not 0 <= self.itm_threshold <= 1:
                raise bad("itm_threshold", "must be a probability in [0, 1], or null")
            if "itm" not in self.scores:
                raise bad("itm_threshold", "needs the ITM score: add itm to run.capfilt.scores")
        if self.top_k is None and self.itm_threshold is None:
            raise UserError("run.capfilt: set top_k and/or itm_threshold (with neither every "
                            "caption would be kept)")
        if self.shards is not None and (not isinstance(self.shards, str) or not self.shards):
            raise bad("shards", "must be a folder path or null")
        if not is_int(self.report_examples) or self.report_examples < 0:
            raise bad("report_examples", "must be an integer >= 0")

    def settings(self) -> Dict[str, Any]:
        """What decides the output (a resume must not mix two settings in one folder)."""
        d = dataclasses.asdict(self)
        for key in ("output", "shards", "shard_size", "report_examples"):
            d.pop(key)
        return d
