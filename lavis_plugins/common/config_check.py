"""Checks of an experiment YAML's top level, ``run:`` and ``datasets:`` sections.

LAVIS reads these with ``cfg.get(key, default)``: a misspelt key (``run.max_epochs``) is silently
ignored and the default used, and a wrong type or range fails deep inside training or not at
all. Here every key must be known (with "did you mean" for typos) and every value of a known
kind must have the right type and range, before anything is built. ``model:`` keys are checked by
each model's config dataclass.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from lavis_plugins.common.errors import UserError

TOP_LEVEL = ("model", "datasets", "run")


@dataclass(frozen=True)
class Key:
    """What one ``run:`` key accepts. ``kind``: "int", "float", "bool", "str", "splits" (a list
    of split names), "any"; ``lo``/``hi`` bound numbers (``lo_open``: lo itself excluded);
    ``choices`` bounds strings (``pattern``: a regular expression instead)."""

    kind: str
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    choices: Tuple[str, ...] = ()
    pattern: str = ""
    doc: str = ""  # what the value means, shown in errors

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.pattern:
            return self.doc
        if self.kind in ("int", "float"):
            kind = "an integer" if self.kind == "int" else "a number"
            lo = "" if self.lo is None else f"{'>' if self.lo_open else '>='} {self.lo:g}"
            hi = "" if self.hi is None else f"{'<' if self.hi_open else '<='} {self.hi:g}"
            return kind + (" " + " and ".join(x for x in (lo, hi) if x) if lo or hi else "")
        return {"bool": "true or false", "str": "a string", "splits": "a list of split names"
                }.get(self.kind, "any value")


POS_INT, NONNEG_INT = Key("int", lo=1), Key("int", lo=0)

# run.strategy and its fsdp_ options (lavis_plugins/runners/fsdp.py; the first is the default)
STRATEGIES = ("ddp", "fsdp")
FSDP_SHARDING = ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard")
FSDP_MIXED_PRECISION = ("none", "bf16")
NONNEG = Key("float", lo=0)
SPLITS = Key("splits")

# every run: key the runner, the CLI or LAVIS's own runner/tasks read, with what it accepts
RUN_KEYS: Dict[str, Key] = {
    "task": Key("str"), "runner": Key("str"), "lr_sched": Key("str"),
    "init_lr": Key("float", lo=0, lo_open=True), "min_lr": NONNEG,
    "warmup_lr": Key("float", lo=-1), "warmup_steps": NONNEG_INT, "weight_decay": NONNEG,
    "lr_decay_rate": Key("float", lo=0, lo_open=True),
    "beta1": Key("float", lo=0, hi=1, hi_open=True),
    "beta2": Key("float", lo=0, hi=1, hi_open=True),
    "layer_decay": Key("float", lo=0, hi=1, lo_open=True),
    "max_grad_norm": Key("float", lo=0, lo_open=True),
    "max_epoch": POS_INT, "iters_per_epoch": POS_INT, "accum_grad_iters": POS_INT,
    "batch_size_train": POS_INT, "batch_size_eval": POS_INT, "num_workers": NONNEG_INT,
    "persistent_workers": Key("bool"), "prefetch_factor": POS_INT, "compile": Key("bool"),
    "seed": NONNEG_INT, "log_freq": POS_INT, "ckpt_freq": NONNEG_INT,
    "output_dir": Key("str"), "resume_ckpt_path": Key("str"), "force": Key("bool"),
    "evaluate": Key("bool"), "amp": Key("bool"),
    "amp_dtype": Key("str", choices=("bf16", "bfloat16", "fp16", "float16")),
    "train_splits": SPLITS, "valid_splits": SPLITS, "test_splits": SPLITS,
    "device": Key("str", pattern=r"auto|cpu|cuda(:\d+)?",
                  doc="auto, cpu, cuda or cuda:<index>"),
    "distributed": Key("bool"), "world_size": POS_INT, "dist_url": Key("str"),
    # set by the launcher (LAVIS's and ours) and saved with a run's config: accepted back
    "rank": NONNEG_INT, "gpu": NONNEG_INT, "dist_backend": Key("str"),
    "dist_timeout_s": Key("float", lo=0, lo_open=True),
    "find_unused_parameters": Key("bool"), "use_dist_eval_sampler": Key("bool"),
    "strategy": Key("str", choices=STRATEGIES),
    "fsdp_sharding": Key("str", choices=FSDP_SHARDING),
    "fsdp_mixed_precision": Key("str", choices=FSDP_MIXED_PRECISION),
    "fsdp_cpu_offload": Key("bool"),
    "on_nonfinite": Key("str", choices=("stop", "skip")), "max_nonfinite_skips": POS_INT,
    "on_bad_sample": Key("str", choices=("fail", "skip")),
    "max_bad_fraction": Key("float", lo=0, hi=1),
    # LAVIS 1.0.2's mixing ratios {dataset: ratio} (checked by lavis_plugins.runners.mixture)
    "train_dataset_ratios": Key("any"),
    # LAVIS tasks' keys the plugin's task configs do not declare
    "k_test": POS_INT, "apply_lemmatizer": Key("bool"), "sample_id_key": Key("str"),
    # reporting (lavis_plugins/runners/reporting.py, lp_retrieval's top-k file)
    "tensorboard": Key("bool"), "topk_save": POS_INT,
    # lp_capfilt's settings (checked key by key by lavis_plugins.capfilt.config.CapFiltConfig)
    "capfilt": Key("any"),
}

# dataset keys every builder accepts beyond those in its own default YAML
DATASET_EXTRA_KEYS = ("type", "data_type", "build_info", "vis_processor", "text_processor",
                      "dataset_card", "feature_cache", "feature_cache_views", "on_bad_video",
                      "sample_ratio")
BUILD_INFO_KEYS = ("annotations", "images", "videos", "features", "root", "storage", "splits",
                   "instance_id_key", "answer_list_splits")


def _unknown(what: str, key: str, known: Iterable[str]) -> UserError:
    known = sorted(set(known))
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.7)
    if close:  # the likely fix is enough; the full list only when nothing is close
        return UserError(f"{what}.{key} is not a known key (it would be ignored). Did you mean "
                         f"{' or '.join(close)}?")
    return UserError(f"{what}.{key} is not a known key (it would be ignored). Known {what} "
                     f"keys: {', '.join(known)}")


def _task_keys() -> Dict[str, Key]:
    """The run: keys of the plugin's task configs, typed from their defaults."""
    from lavis_plugins.tasks.captioning import CaptionTaskConfig
    from lavis_plugins.tasks.video_qa import VideoQATaskConfig
    from lavis_plugins.tasks.vqa import VQATaskConfig
    from lavis_plugins.tasks.zeroshot_classification import ZeroShotSettings

    kinds: Dict[str, set] = {}
    for cls in (CaptionTaskConfig, VideoQATaskConfig, VQATaskConfig, ZeroShotSettings):
        for f in dataclasses.fields(cls):
            d = f.default
            kinds.setdefault(f.name, set()).add(
                "bool" if isinstance(d, bool) else "int" if isinstance(d, int)
                else "float" if isinstance(d, float) else "any")
    # a key two tasks type differently (int in one, float in another) accepts the wider
    return {n: Key(k.pop()) if len(k) == 1 else Key("float" if k == {"int", "float"} else "any")
            for n, k in kinds.items()}


def check_value(where: str, value: Any, key: Key) -> None:
    """``UserError`` naming ``where``, ``value`` and what ``key`` accepts, if they disagree."""
    if value is None or key.kind == "any":
        return
    bad = UserError(f"{where} is {value!r}; it must be {key.describe()}")
    if key.kind == "bool":
        if not isinstance(value, bool):
            raise bad
    elif key.kind in ("int", "float"):
        if isinstance(value, bool):
            raise bad
        try:
            number = float(value)  # YAML reads 1e-3 as a string; the runner float()s it
        except (TypeError, ValueError):
            raise bad from None
        if key.kind == "int" and (number != int(number) or isinstance(value, str)
                                  and not re.fullmatch(r"[+-]?\d+", value.strip())):
            raise bad
        if number != number or (key.lo is not None and (number < key.lo or key.lo_open
                                                        and number == key.lo)) \
                or (key.hi is not None and (number > key.hi or key.hi_open and number == key.hi)):
            raise bad
    elif key.kind == "str":
        if not isinstance(value, str):
            raise bad
        if key.choices and value.lower() not in key.choices:
            close = difflib.get_close_matches(value, key.choices, n=1)
            raise UserError(f"{where} is {value!r}; it must be {key.describe()}"
                            + (f" (did you mean {close[0]}?)" if close else ""))
        if key.pattern and not re.fullmatch(key.pattern, value.lower()):
            raise bad
    elif key.kind == "splits":
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{where} is {value!r}; it must be a list of split names, "
                            "e.g. [train]")


def check_run(run: Mapping[str, Any]) -> None:
    """Every ``run:`` key known, of the right type and range."""
    keys = {**_task_keys(), **RUN_KEYS}
    for name, value in run.items():
        if name not in keys:
            raise _unknown("run", str(name), keys)
        check_value(f"run.{name}", value, keys[name])


def check_top_level(raw: Mapping[str, Any]) -> None:
    for name in raw:
        if name not in TOP_LEVEL:
            close = difflib.get_close_matches(str(name), TOP_LEVEL, n=1, cutoff=0.6)
            raise UserError(f"unknown top-level section {name!r} (it would be ignored); an "
                            f"experiment YAML has {', '.join(TOP_LEVEL)}"
                            + (f". Did you mean {close[0]}?" if close else ""))


def check_dataset(name: str, ds_cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """Keys of ``datasets.<name>`` (and its ``build_info``) against the builder's default YAML
    (``defaults``: that YAML's ``datasets.<name>`` section) and the keys every builder reads."""
    known = set(defaults) | set(DATASET_EXTRA_KEYS)
    for key in ds_cfg or {}:
        if key not in known:
            raise _unknown(f"datasets.{name}", str(key), known)
    info = (ds_cfg or {}).get("build_info") or {}
    if not isinstance(info, Mapping):
        raise UserError(f"datasets.{name}.build_info must be a mapping, got {info!r}")
    known_info = set((defaults or {}).get("build_info") or {}) | set(BUILD_INFO_KEYS)
    for key in info:
        if key not in known_info:
            raise _unknown(f"datasets.{name}.build_info", str(key), known_info)
