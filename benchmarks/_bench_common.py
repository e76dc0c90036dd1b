"""What the stage-1 and stage-2 benchmarks share: caption words, random captions, the resident
memory reader, the timed training step, and LAVIS built on the same image encoder as ours."""
from __future__ import annotations

import random
from typing import Any, Callable, Dict, List, Optional

WORDS = """a an the of in on at with man woman dog cat car tree sky person sitting standing near
next above below under over red green blue yellow black white small large big two three little
table street road water grass field building train bus plate food pizza boy girl group people
riding holding playing walking looking wooden open parked""".split()


def captions(n: int, words_each: Optional[int] = None) -> List[str]:
    """``n`` random captions (fixed seed) of 5-15 words, or of exactly ``words_each`` words."""
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(words_each or rng.randint(5, 15)))
            for _ in range(n)]


def rss_kb(field: str) -> int:
    """A memory field of /proc/self/status (e.g. "VmRSS:", "VmHWM:") in kB."""
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def lavis_uses_our_encoder(vit: Dict[str, Any]) -> None:
    """Make LAVIS's ``Blip2Base.init_vision_encoder`` build the encoder ours builds from the
    settings ``vit`` (no download), but with LAVIS's own EVA attention."""
    from lavis.models.blip2_models.blip2 import Blip2Base

    from lavis_plugins.models.blip2_base import LPBlip2Base

    def init_vision_encoder(cls, model_name, img_size, drop_path_rate, use_grad_checkpoint,
                            precision):
        return LPBlip2Base.init_vision_encoder(
            vit["vit_model"], img_size, drop_path_rate, use_grad_checkpoint,
            vit["vit_precision"], vit_path=vit.get("vit_path"), tiny=vit.get("tiny_vit"),
            sdpa=False)

    Blip2Base.init_vision_encoder = classmethod(init_vision_encoder)


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
