"""``run.compile: true`` for the stage-2 models (``lp_blip2_opt``, ``lp_blip2_t5``).

``torch.compile`` is applied in place to the parts of a training step that are tensors in,
tensors out, so parameter names, checkpoints and DDP are unchanged and ``forward`` keeps its
host-side work (prompts, tokenisation when the loader did not ``pretokenize``) outside the graphs:

- the frozen image encoder, fixed shapes (B, 3, S, S) -> (B, N, Dv);
- the Q-Former query pass ``query_output`` (B, N, Dv) -> (B, Nq, D) (fixed shapes), and the
  question-aware pass ``query_text_output`` (dynamic: the question's length varies);
- the frozen LLM's training forward, with dynamic shapes so that captions of every length share
  one graph: OPT's decoder (its layerdrop draw and mask check are bypassed by
  :func:`~lavis_plugins.models.blip2_opt.sync_free_opt_decoder` when ``layerdrop`` is 0) and the
  LM head + loss (``_lm_loss``); T5's whole encoder-decoder forward.

Stage 1 (``lp_blip2_qformer``) compiles its own Q-Former step (``compile_for_training`` in
:mod:`~lavis_plugins.models.blip2_qformer`).
"""
from __future__ import annotations

import torch
from torch import nn

# torch.compile backends: "inductor" generates kernels (what training uses); "aot_eager" traces
# forward and backward the same way but runs them with eager kernels (tests of graph breaks and
# recompiles, without minutes of code generation on a CPU)
DEFAULT_BACKEND = "inductor"


def compile_stage2(model: nn.Module, backend: str = DEFAULT_BACKEND) -> None:
    """Compile the frozen image encoder, the Q-Former passes and the LLM's training forward of a
    :class:`~lavis_plugins.models._blip2_llm.Blip2LLMBase` model, in place."""
    if model._vit_frozen:  # an encoder being fine-tuned is left eager, as in stage 1
        model.visual_encoder.compile(dynamic=False, backend=backend)
    # instance attributes shadow the methods: prompt_from_features calls these
    model.query_output = torch.compile(model.query_output, dynamic=False, backend=backend)
    model.query_text_output = torch.compile(model.query_text_output, dynamic=True,
                                            backend=backend)
    llm = model.llm
    if llm.config.is_encoder_decoder:  # T5: encoder, decoder and loss in one forward
        llm.compile(dynamic=True, backend=backend)
    else:  # OPT: forward calls the decoder and the LM head (``_lm_loss``) separately
        llm.get_decoder().compile(dynamic=True, backend=backend)
        model._lm_loss = torch.compile(model._lm_loss, dynamic=True, backend=backend)
