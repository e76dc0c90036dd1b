"""``run.compile: true`` for the stage-2 models (``lp_blip2_opt``, ``lp_blip2_t5``).

``torch.compile`` is applied in place to the parts of a training step that are tensors in,
tensors out, so parameter names, checkpoints and DDP are unchanged and ``forward`` keeps its
host-side work (prompts, tokenisation when the loader did not ``pretokenize``) outside the graphs:

- the frozen image encoder, fixed shapes (B, 3, S, S) -> (B, N, Dv);
- the Q-Former query pass ``query_output`` (B, N, Dv) -> (B, Nq, D) (fixed shapes), and the
  question-aware pass ``query_text_output`` (dynamic: the question's length varies);
- the frozen LLM's training forward, with dynamic shapes so that captions of every length share
  one graph: for OPT, the decoder without its padding rows, LM head and loss in one
  (``_loss_without_padding``, see :mod:`~lavis_plugins.models._opt_packed`), and for the cases
  that keep transformers' forward its decoder (its layerdrop draw and mask check are bypassed
  by :func:`~lavis_plugins.models.blip2_opt.sync_free_opt_decoder` when ``layerdrop`` is 0) and
  the LM head + loss (``_lm_loss``); T5's whole encoder-decoder forward.

Stage 1 (``lp_blip2_qformer``) compiles its own Q-Former step (``compile_for_training`` in
:mod:`~lavis_plugins.models.blip2_qformer`). Every ``torch.compile`` call takes its arguments from
:func:`compile_kwargs`, which carries the work-around for a wrong-gradient bug of inductor's CPU
code generation in torch < 2.7 (see there).
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

# torch.compile backends: "inductor" generates kernels (what training uses); "aot_eager" traces
# forward and backward the same way but runs them with eager kernels (tests of graph breaks and
# recompiles, without minutes of code generation on a CPU)
DEFAULT_BACKEND = "inductor"

# torch < 2.7, inductor's C++ (CPU) code: a vectorised kernel specialised for one thread writes an
# accumulating scatter (index_put with accumulate=True: the backward of an embedding or of a row
# gather) as a plain vector store, so when an index repeats (a token twice in a batch) only the
# last row's gradient survives. Fixed by pytorch/pytorch#147961 (issues #146390, #147848), first
# released in 2.7.0. With ``cpp.dynamic_threads`` no kernel is specialised for one thread and the
# scatter goes through ``atomic_add_vec``, which adds.
# Repro: benchmarks/repro_inductor_scatter_add.py
_INDUCTOR_CPU_SCATTER_FIX = {"cpp.dynamic_threads": True}
# torch < 2.7, dynamic shapes: inductor's pattern matcher, when it checks a candidate match,
# de-duplicates the match's symbolic sizes with guarding comparisons, so every pair of sizes of
# every candidate (each matrix product) becomes a shape guard (T5: Ne(8*L, L**2), Ne(8*L, 4*S),
# Ne(L, S), ...) and a batch whose lengths make one of them equal (a target of d_kv = 8 tokens)
# recompiles. Fixed by pytorch/pytorch#147557 (first in 2.7.0). With the pattern matcher off, those
# graphs lose its rewrites; the Q-Former, OPT and the ViT call SDPA themselves, T5's attention
# (matmul, softmax, matmul) is left unfused.
_INDUCTOR_DYNAMIC_GUARDS_FIX = {"pattern_matcher": False}
_FIXED_IN = (2, 7)  # both bugs


def compile_kwargs(dynamic: bool, backend: str = DEFAULT_BACKEND) -> Dict[str, Any]:
    """Keyword arguments of ``torch.compile`` / ``nn.Module.compile`` for one part of a training
    step: ``dynamic`` shapes or not, the ``backend``, and for inductor in torch < 2.7 the options
    that keep its CPU gradients of repeated-index scatters exact (``_INDUCTOR_CPU_SCATTER_FIX``;
    C++ code only, GPU kernels are unaffected) and, for ``dynamic`` graphs, keep lengths from
    being guarded against each other (``_INDUCTOR_DYNAMIC_GUARDS_FIX``). Other backends take no
    inductor options."""
    kwargs: Dict[str, Any] = {"dynamic": dynamic, "backend": backend}
    if backend == "inductor" and torch.__version__ < _FIXED_IN:
        kwargs["options"] = {**_INDUCTOR_CPU_SCATTER_FIX,
                             **(_INDUCTOR_DYNAMIC_GUARDS_FIX if dynamic else {})}
    return kwargs


def compile_stage2(model: nn.Module, backend: str = DEFAULT_BACKEND) -> None:
    """Compile the frozen image encoder, the Q-Former passes and the LLM's training forward of a
    :class:`~lavis_plugins.models._blip2_llm.Blip2LLMBase` model, in place."""
    if model._vit_frozen:  # an encoder being fine-tuned is left eager, as in stage 1
        model.visual_encoder.compile(**compile_kwargs(False, backend))
    # instance attributes shadow the methods: prompt_from_features calls these
    model.query_output = torch.compile(model.query_output, **compile_kwargs(False, backend))
    model.query_text_output = torch.compile(model.query_text_output,
                                            **compile_kwargs(True, backend))
    llm = model.llm
    if llm.config.is_encoder_decoder:  # T5: encoder, decoder and loss in one forward
        llm.compile(**compile_kwargs(True, backend))
    else:  # OPT: forward calls the decoder and the LM head (``_lm_loss``) separately, or
        # (training, OPT) the two in one without padding rows (``_loss_without_padding``)
        llm.get_decoder().compile(**compile_kwargs(True, backend))
        model._lm_loss = torch.compile(model._lm_loss, **compile_kwargs(True, backend))
        if hasattr(model, "_loss_without_padding"):
            model._loss_without_padding = torch.compile(model._loss_without_padding,
                                                        **compile_kwargs(True, backend))
