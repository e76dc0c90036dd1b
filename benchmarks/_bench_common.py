"""What the model benchmarks share: captions (uniform, COCO-like or full-length), the three sides
and their alternating subprocesses, memory readers, the timed training step, and LAVIS built on
the same image encoder as ours from LAVIS's own code.

Sides (``--sides``, each in its own process, run in turns):

- ``ours``: lavis_plugins in the project's environment (.venv, transformers 4.46);
- ``lavis``: LAVIS 1.0.2 in the environment it supports (``make bench-env``: .venv-lavis,
  transformers 4.26.1, the newest release it allows and so what pip installs), importing nothing
  of lavis_plugins: LAVIS as its users run it;
- ``lavis_kv``: the same with LAVIS's key/value cache restored: its vendored OPT's
  ``prepare_inputs_for_generation`` reads ``past``, but transformers 4.26 and later hand the cache
  over as ``past_key_values``, so LAVIS as installed recomputes the whole sequence at every
  generated token (this side is LAVIS at its best);
- ``lavis446``: LAVIS in the project's environment (transformers 4.46), cache restored the same
  way (its beam search fails there: 4.46 expands the query embeddings a second time).

This module imports only the standard library at import time: the ``lavis`` side runs it in an
environment without lavis_plugins.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
LAVIS_PYTHON = REPO / ".venv-lavis" / "bin" / "python"
SIDES = {
    "ours": "ours",
    "lavis": "LAVIS (4.26)",
    "lavis_kv": "LAVIS (4.26+KV)",
    "lavis446": "LAVIS (4.46+KV)",
}
LAVIS_ENV_SIDES = ("lavis", "lavis_kv")  # run by LAVIS's own environment's python
KV_RESTORED_SIDES = ("lavis_kv", "lavis446")
SIDE_HELP = ("ours = lavis_plugins; lavis = LAVIS 1.0.2 in .venv-lavis (transformers 4.26.1, "
             "`make bench-env`); lavis_kv = the same with its KV cache restored; lavis446 = "
             "LAVIS in our env (transformers 4.46) with its KV cache restored")

WORDS = """a an the of in on at with man woman dog cat car tree sky person sitting standing near
next above below under over red green blue yellow black white small large big two three little
table street road water grass field building train bus plate food pizza boy girl group people
riding holding playing walking looking wooden open parked""".split()
CAPTION_KINDS = ("uniform", "coco", "full")
CAPTION_LENGTHS = Path(__file__).resolve().parent / "caption_lengths_coco.json"


def caption_lengths() -> Dict[int, int]:
    """The COCO-like length histogram: words -> weight per 1000 captions."""
    data = json.loads(CAPTION_LENGTHS.read_text())
    return {int(k): int(v) for k, v in data["per_mille"].items()}


def captions(n: int, kind: str = "uniform", max_words: int = 32) -> List[str]:
    """``n`` random captions (fixed seed): "uniform" 5-15 words, "coco" lengths drawn from
    ``caption_lengths_coco.json``, "full" ``max_words`` words each (every caption fills
    max_txt_len: padding to the longest saves nothing). Each word is one BERT token."""
    rng = random.Random(0)
    if kind == "coco":
        hist = caption_lengths()
        lengths = rng.choices(list(hist), weights=list(hist.values()), k=n)
    elif kind == "full":
        lengths = [max_words] * n
    elif kind == "uniform":
        lengths = [rng.randint(5, 15) for _ in range(n)]
    else:
        raise ValueError(f"caption kind {kind!r}: choose one of {CAPTION_KINDS}")
    return [" ".join(rng.choice(WORDS) for _ in range(k)) for k in lengths]


def add_common_args(p, rounds: int = 2) -> None:
    """The options every model benchmark shares (sides, captions, rounds, threads)."""
    p.add_argument("--sides", default="ours,lavis,lavis446",
                   help=f"comma-separated sides to run, in turns ({SIDE_HELP})")
    p.add_argument("--lavis-python", default=str(LAVIS_PYTHON),
                   help="the python of LAVIS's own environment (made by `make bench-env`)")
    p.add_argument("--rounds", type=int, default=rounds,
                   help="alternating runs of each side (the order reverses every round)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--impl", choices=list(SIDES), help=argparse.SUPPRESS)


def sides_of(args) -> List[str]:
    """``--sides`` checked; exits with one line naming the fix when LAVIS's env is missing."""
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    bad = [s for s in sides if s not in SIDES]
    if bad or not sides:
        sys.exit(f"--sides {args.sides!r}: choose from {list(SIDES)}")
    own_env = [s for s in sides if s in LAVIS_ENV_SIDES]
    if own_env and not Path(args.lavis_python).is_file():
        sys.exit(f"--sides {','.join(own_env)} needs LAVIS's own environment at "
                 f"{args.lavis_python}: run `make bench-env` (or leave it out: --sides "
                 "ours,lavis446)")
    return sides


def run_side(cmd: List[str], side: str, args, env: Optional[dict] = None) -> dict:
    """Run the benchmark ``cmd`` (a script and its options) as ``side`` in a fresh process of
    that side's python; its last ``RESULT {json}`` line."""
    python = args.lavis_python if side in LAVIS_ENV_SIDES else sys.executable
    env = dict(os.environ if env is None else env)
    if side in LAVIS_ENV_SIDES:
        # the script's folder only: no lavis_plugins from the working tree on this side
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent)
    out = subprocess.run([python, *cmd, "--impl", side], capture_output=True, text=True, env=env)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"{side} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def alternate(cmd: List[str], args, show: Callable[[int, str, dict], None]) -> Dict[str, list]:
    """``args.rounds`` rounds of every side, one fresh process each, the order reversed every
    other round so that a drift in the machine's load hits every side alike."""
    sides = sides_of(args)
    results: Dict[str, list] = {s: [] for s in sides}
    for r in range(args.rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            res = run_side(cmd, side, args)
            results[side].append(res)
            show(r, side, res)
    return results


def child_argv(script: str, argv: Optional[List[str]], *extra: str) -> List[str]:
    """The command that re-runs ``script`` with the parent's options plus ``extra``."""
    return [script, *(argv if argv is not None else sys.argv[1:]), *extra]


def rss_kb(field: str) -> int:
    """A memory field of /proc/self/status (e.g. "VmRSS:", "VmHWM:") in kB."""
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


class PeakRss:
    """Peak resident memory of this (fresh) process: ``start`` records the resident size and
    resets the high-water mark (Linux ``clear_refs``); ``above`` is the peak since then minus
    that size (what the measured work added: activations, gradients, optimizer state), and
    ``process_mb`` the whole process's peak (``getrusage``: model, libraries, work)."""

    def start(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = rss_kb("VmRSS:")

    def above_mb(self) -> float:
        return (rss_kb("VmHWM:") - self.base) / 1024

    @staticmethod
    def process_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def lavis_single_process() -> None:
    """LAVIS's forward asks torch.distributed for the rank even in one process."""
    import torch

    torch.distributed.get_rank = lambda *a, **k: 0
    torch.distributed.get_world_size = lambda *a, **k: 1


def lavis_vision_encoder(vit: Dict[str, Any]) -> None:
    """Make LAVIS's ``Blip2Base.init_vision_encoder`` build, from LAVIS's own ``eva_vit``, the
    encoder ours builds from ``vit`` (sizes of the tiny one, or EVA ViT-g as LAVIS's
    ``create_eva_vit_g`` makes it) with random weights and no download."""
    from functools import partial

    from torch import nn
    from lavis.models import eva_vit
    from lavis.models.blip2_models.blip2 import Blip2Base

    def init_vision_encoder(cls, model_name, img_size, drop_path_rate, use_grad_checkpoint,
                            precision):
        if vit["vit_model"] == "tiny":
            t = vit["tiny_vit"]
            sizes = dict(patch_size=t["patch_size"], embed_dim=t["width"], depth=t["depth"],
                         num_heads=t["heads"], mlp_ratio=t["mlp_ratio"])
        else:  # create_eva_vit_g's settings, without its download
            sizes = dict(patch_size=14, use_mean_pooling=False, embed_dim=1408, depth=39,
                         num_heads=1408 // 88, mlp_ratio=4.3637)
        encoder = eva_vit.VisionTransformer(
            img_size=img_size, qkv_bias=True, drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=1e-6), use_checkpoint=use_grad_checkpoint,
            **sizes)
        if precision == "fp16":
            eva_vit.convert_weights_to_fp16(encoder)
        return encoder, nn.LayerNorm(encoder.num_features)

    Blip2Base.init_vision_encoder = classmethod(init_vision_encoder)


def restore_lavis_kv_cache() -> None:
    """Under transformers 4.26 and later, ``generate`` hands the cache to LAVIS's vendored OPT as
    ``past_key_values``, but its ``prepare_inputs_for_generation`` reads ``past``: the cache is
    dropped and every step recomputes the whole sequence. Pass it on under the name it reads."""
    from lavis.models.blip2_models import modeling_opt

    cls = modeling_opt.OPTForCausalLM
    original = cls.prepare_inputs_for_generation

    def prepare_inputs_for_generation(self, input_ids=None, query_embeds=None, past=None,
                                      attention_mask=None, use_cache=None, **kwargs):
        if past is None:
            past = kwargs.pop("past_key_values", None)
        return original(self, input_ids, query_embeds=query_embeds, past=past,
                        attention_mask=attention_mask, use_cache=use_cache, **kwargs)

    cls.prepare_inputs_for_generation = prepare_inputs_for_generation


def train_step(model, samples: Dict[str, Any], amp: bool) -> Callable[[], Any]:
    """One training step of ``model`` on ``samples`` as LAVIS's runner takes it: forward,
    backward and AdamW on the trainable weights, under fp16 autocast with loss scaling when
    ``amp`` (CUDA only). Returns the step; each call returns the loss."""
    import contextlib

    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), weight_decay=0.05)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def step():
        with torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext():
            loss = model(samples)["loss"]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def median(xs: List[float]) -> float:
    return statistics.median(xs)


def table(title: str, rows: List[List[str]], sides: List[str]) -> str:
    """A plain-text table: a label column and one column per side."""
    head = [""] + [SIDES[s] for s in sides]
    out = [title, "".join(f"{h:>18s}" if i else f"{h:34s}" for i, h in enumerate(head))]
    for row in rows:
        out.append("".join(f"{c:>18s}" if i else f"{c:34s}" for i, c in enumerate(row)))
    return "\n".join(out)
