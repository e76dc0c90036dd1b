"""``bench_video_qa.py --proportions real``: the CPU-sized model with BLIP-2's cost ratios.

Its sizes are ``flops_video_selection.PROPORTIONAL``; this module builds its folders (BERT, OPT
with their small tokenizers) and encoder settings as ``bench_video_qa`` passes them to the models,
and checks, before measuring, that the ratios and the prompts' token counts are those counted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict

import bench_stage2
import flops_video_selection


# the proportional model's prompts in its small tokenizers' vocabularies, so that they
# tokenise to their lengths in OPT's and BERT's tokenizers (flops_video_selection.PROPORTIONAL)
PROPORTIONAL_OPT_WORDS = ["moving", "Does", "information", "help"]
PROPORTIONAL_BERT_WORDS = ["moving"]


def vit_settings(args) -> dict:
    """The image encoder: ``bench_stage2``'s, or the proportional model's (``--proportions``)."""
    if args.proportions != "real":
        return bench_stage2.vit_settings(args)
    s = flops_video_selection.PROPORTIONAL
    return dict(vit_model="tiny", vit_precision="fp32", image_size=224,
                tiny_vit=dict(width=s.vit_width, depth=s.vit_depth, heads=s.vit_width // 64,
                              patch_size=s.patch, mlp_dim=s.vit_mlp))


def qformer_settings(args) -> dict:
    """The Q-Former's cross-attention spacing (the proportional model's; else the default)."""
    if args.proportions != "real":
        return {}
    return dict(cross_attention_freq=flops_video_selection.PROPORTIONAL.cross_every)


def make_folders(args, root: Path) -> None:
    """The BERT and OPT folders: ``bench_stage2``'s, or the proportional model's."""
    if args.proportions != "real":
        return bench_stage2.make_folders(argparse.Namespace(**vars(args)), root)
    from lavis_plugins.common.tiny_bert import make_tiny_bert
    from lavis_plugins.common.tiny_llm import make_tiny_opt

    s = flops_video_selection.PROPORTIONAL
    make_tiny_bert(root / "bert-base-uncased", words=PROPORTIONAL_BERT_WORDS,
                   hidden_size=s.q_width, num_hidden_layers=s.q_layers,
                   num_attention_heads=s.q_heads, intermediate_size=s.q_ffn,
                   max_position_embeddings=512)
    make_tiny_opt(root / "opt", words=PROPORTIONAL_OPT_WORDS, hidden_size=s.llm_width,
                  num_hidden_layers=s.llm_layers, num_attention_heads=s.llm_width // 64,
                  ffn_dim=s.llm_ffn, vocab_size=s.vocab,
                  max_position_embeddings=flops_video_selection.PROPORTIONAL_LLM_POSITIONS)


def token_counts(root: Path, prompt: str, question: str) -> Dict[str, int]:
    """The lengths of the answering ``prompt``, the LLM scorer's prompt about ``question`` and
    the ``question`` alone (the stage-1 selector's text) in the tokenizers of the folders under
    ``root``, and the LLM's vocabulary, as the ``flops_video_selection.Sizes`` fields that count
    them."""
    from transformers import AutoTokenizer, BertTokenizer

    from lavis_plugins.models._frame_selection import DEFAULT_SELECTION_PROMPT

    opt = AutoTokenizer.from_pretrained(str(root / "opt"))
    bert = BertTokenizer.from_pretrained(str(root / "bert-base-uncased"))
    return {"question_tokens": len(opt(prompt).input_ids),
            "selection_prompt_tokens": len(opt(DEFAULT_SELECTION_PROMPT.format(
                question=question)).input_ids),
            "text_tokens": len(bert(question).input_ids),
            "vocab": len(opt)}


def check_proportions(args, root: Path, prompt: str, question: str) -> None:
    """Print the real-size and proportional cost ratios side by side (FLOP counts); exit when
    they differ by more than the tolerance or the built folders do not tokenise as counted."""
    fv = flops_video_selection
    counts = token_counts(root, prompt, question)
    wanted = {k: getattr(fv.PROPORTIONAL, k) for k in counts}
    if counts != wanted:
        sys.exit(f"--proportions real: the small tokenizers give {counts}, "
                 f"flops_video_selection.PROPORTIONAL counts {wanted}: update one of them")
    from lavis_plugins.models._frame_selection import FrameSelectionFields

    n, k = args.selection
    grids = args.selection_grid or [FrameSelectionFields.selection_grid]
    pool = (args.itm_pool or [FrameSelectionFields.selection_itm_pool])[0]
    worst = fv.print_proportions(fv.proportion_rows(n, k, args.scorer, grids, pool,
                                                    args.new_tokens, beams=1))
    if worst > fv.PROPORTION_TOLERANCE:
        sys.exit(f"--proportions real: a cost ratio differs from the real size's by "
                 f"{100 * worst:.1f}% (> {100 * fv.PROPORTION_TOLERANCE:.0f}%) for these "
                 "--selection / --selection-grid values; the table above names it")
