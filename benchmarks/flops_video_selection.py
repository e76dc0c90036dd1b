"""Real-size projection of frame selection's cost from FLOP counts: an estimate, not a measurement.

    .venv/bin/python benchmarks/flops_video_selection.py                 # select 4 of 32, grid 8
    .venv/bin/python benchmarks/flops_video_selection.py --selection 32 4 --grid 8 4 0
    .venv/bin/python benchmarks/flops_video_selection.py --proportions --grid 8 4

``bench_video_qa.py --selection`` measures the small config on this machine, where the 4-layer
Q-Former costs about as much per frame as the 2-layer tiny ViT at 112 px; at BLIP-2's size the ViT
dominates. This script counts the multiply-adds of the matrix products (x 2 = FLOP) of one video
at real size: EVA ViT-g/14 (1408 wide, 39 blocks, MLP 6144; 1 + g^2 tokens for a g x g grid, 257
at 224 px), the BERT-base Q-Former (12 x 768, FFN 3072, 32 queries, cross-attention to the
1408-wide image features every 2nd layer), OPT-2.7B (32 x 2560, FFN 10240, vocabulary 50272): the
prompt (K x 32 query tokens + the question) prefilled, then ``--new-tokens`` tokens with 5 beams.
Selection adds N candidates through the ViT at the scoring grid and the selector's Q-Former
(its first self-attention once per batch, as ``frame_query_output``), and for ``itm`` the ITM
pass over the re-ranked pool; ``llm`` runs the stage-2 Q-Former and an LLM prefill of the frame's
32 tokens and the localizer prompt per candidate. Left out: decoding and resizing the frames
(dataloader workers on a GPU machine), norms and activations (a few % of the matrix products).
``tests/test_benchmarks.py`` checks the ViT and Q-Former counts against torch's FLOP counter on
small sizes.

``PROPORTIONAL`` is the CPU-sized model of ``bench_video_qa.py --proportions real`` whose parts
cost, relative to one another, what they cost at real size by these counts; ``proportion_rows``
lists both sets of ratios side by side.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Sizes:
    """Model sizes of the projection (defaults: BLIP-2 ViT-g + OPT-2.7B)."""

    vit_width: int = 1408
    vit_depth: int = 39  # LAVIS's eva_vit_g drops the 40th block
    vit_mlp: int = 6144
    patch: int = 14
    full_grid: int = 16  # 224 px / 14
    q_layers: int = 12
    q_width: int = 768
    q_ffn: int = 3072
    q_heads: int = 12
    queries: int = 32
    cross_every: int = 2
    llm_layers: int = 32
    llm_width: int = 2560
    llm_ffn: int = 10240
    vocab: int = 50272
    question_tokens: int = 12  # "Question: what is moving in the video? Answer:" (OPT's BPE)
    selection_prompt_tokens: int = 20  # "Does the information in this frame help answer: ...?"
    text_tokens: int = 9  # "what is moving in the video?" in the Q-Former's tokens ([CLS], [SEP])
    beams: int = 5


# BLIP-2's proportions on a CPU-sized model (``bench_video_qa.py --proportions real``): each
# part's multiply-adds relative to one frame through the ViT at 224 px as in ``Sizes()`` (within
# PROPORTION_TOLERANCE; ``proportion_rows``), with the real token counts (257 image tokens, 32
# queries, the prompts' lengths in the small tokenizers given the prompts' words), about 1/200 of
# the work. Widths and depths chosen by a search over these formulas:
# - ViT 256 wide, 2 blocks: its wide MLP (15.5x, ViT-g's 4.4x) keeps attention's share of a
#   block (the t^2 term, what makes a 257-token frame cost 4.0x a 65-token one) as at ViT-g's
#   width, where narrow blocks of 4x would overweight it (4.3x);
# - Q-Former 5 x 64, 1 head of 64 (BERT-base: heads of 64), cross-attention in blocks 0 and 3:
#   query pass / ViT frame as BERT-base's 12 blocks (6 crossing) / ViT-g's 39;
# - OPT 3 x 576 (FFN 4x, heads of 64): a 4-frame prompt's prefill / ViT frame as OPT-2.7B's.
PROPORTIONAL = Sizes(
    vit_width=256, vit_depth=2, vit_mlp=3968,
    q_layers=5, q_width=64, q_ffn=512, q_heads=1, cross_every=3,
    llm_layers=3, llm_width=576, llm_ffn=2304, vocab=527,
    question_tokens=12, selection_prompt_tokens=19, text_tokens=9)
PROPORTION_TOLERANCE = 0.10  # largest relative difference of any ratio to the real size's
# OPT positions of the proportional model: uniform 32 needs 32 x 32 + prompt + answer (OPT-2.7B's)
PROPORTIONAL_LLM_POSITIONS = 2048


def vit_macs(s: Sizes, grid: int) -> float:
    """One frame through the ViT at ``grid`` x ``grid`` patches: patch embedding + blocks."""
    t, d = 1 + grid * grid, s.vit_width
    block = 4 * t * d * d + 2 * t * t * d + 2 * t * d * s.vit_mlp  # projections, attention, MLP
    return grid * grid * 3 * s.patch ** 2 * d + s.vit_depth * block


def qformer_macs(s: Sizes, features: int, text: int = 0, first_self_once: bool = False) -> float:
    """One frame's Q-Former pass: the queries (and ``text`` tokens, ITM) in self-attention, the
    queries cross-attending to ``features`` image tokens. A query-only pass attends to the image
    features directly where that is cheaper, as ``QFormerSelfAttention.folding_pays`` decides
    (the ITM pass projects keys/values, shared by its texts). ``first_self_once``: the first
    layer's self-attention (of the constant queries) is not counted (shared by the batch)."""
    d, r, q, c, n = s.q_width, s.queries + text, s.queries, s.vit_width, features
    self_attn = 4 * r * d * d + 2 * r * r * d
    layer = self_attn + 2 * r * d * s.q_ffn
    keys_values = 2 * n * c * d + 2 * q * n * d
    folded = 2 * q * d * c + 2 * s.q_heads * q * n * c
    cross = 2 * q * d * d + (min(folded, keys_values) if not text else keys_values)
    crossing = -(-s.q_layers // s.cross_every)  # blocks 0, f, 2f, ... (i % f == 0)
    total = s.q_layers * layer + crossing * cross
    return total - (self_attn if first_self_once and not text else 0)


def llm_macs(s: Sizes, prompt: int, new_tokens: int = 0, beams: int = 1) -> float:
    """OPT: prefill ``prompt`` tokens (LM head on the last one), then ``new_tokens`` steps of
    ``beams`` sequences (each one token against the growing context, LM head each)."""
    d, layers = s.llm_width, s.llm_layers
    per_token = layers * (4 * d * d + 2 * d * s.llm_ffn)
    head = d * s.vocab
    prefill = prompt * per_token + layers * 2 * d * prompt * (prompt + 1) / 2 + head
    steps = sum(beams * (per_token + layers * 2 * d * (prompt + i + 1) + head)
                for i in range(new_tokens))
    return prefill + steps


def video_macs(s: Sizes, frames: int, new_tokens: int, beams: Optional[int] = None) -> float:
    """Answering from ``frames`` frames at full resolution (uniform sampling, or the kept
    frames after selection); ``beams``: default ``s.beams``."""
    full = 1 + s.full_grid ** 2
    return (frames * (vit_macs(s, s.full_grid) + qformer_macs(s, full))
            + llm_macs(s, frames * s.queries + s.question_tokens, new_tokens, beams or s.beams))


def selection_macs(s: Sizes, n: int, k: int, scorer: str, grid: int, itm_pool: int,
                   new_tokens: int, beams: Optional[int] = None) -> float:
    """Select ``k`` of ``n`` candidates scored at ``grid`` (0: full resolution, each frame
    encoded once) with ``scorer``, then answer from the k kept frames."""
    g = s.full_grid if grid == 0 or grid >= s.full_grid else grid
    feats = 1 + g * g
    # at full resolution the kept frames' ViT features (itc/itm) or tokens (llm) are reused
    vit = n * vit_macs(s, g) + (0 if g == s.full_grid else k * vit_macs(s, s.full_grid))
    answer = llm_macs(s, k * s.queries + s.question_tokens, new_tokens, beams or s.beams)
    stage2_q = k * qformer_macs(s, 1 + s.full_grid ** 2)
    if scorer == "llm":
        score = n * (qformer_macs(s, feats) + llm_macs(s, s.queries + s.selection_prompt_tokens))
        if g == s.full_grid:
            stage2_q = 0  # the candidates' stage-2 tokens are the kept frames' tokens
    else:
        text = s.text_tokens
        itm = qformer_macs(s, feats, text=text)
        itc = n * qformer_macs(s, feats, first_self_once=True) + s.q_layers * text * (
            4 * s.q_width ** 2 + 2 * s.q_width * s.q_ffn)
        if scorer == "itc":
            score = itc
        elif itm_pool:
            score = itc + min(n, itm_pool * k) * itm
        else:
            score = n * itm
    return vit + stage2_q + score + answer


def projection(n: int, k: int, scorers: Sequence[str], grids: Sequence[int], itm_pool: int,
               new_tokens: int, s: Sizes = Sizes()) -> List[Tuple[str, float]]:
    """(row name, GFLOP per video) for uniform k, uniform n and each scorer x grid."""
    rows = [(f"uniform {k}", 2 * video_macs(s, k, new_tokens) / 1e9),
            (f"uniform {n}", 2 * video_macs(s, n, new_tokens) / 1e9)]
    for scorer in scorers:
        for grid in grids:
            pool = f", ITM re-ranks {itm_pool} x {k}" if scorer == "itm" and itm_pool else ""
            name = f"select {k} of {n} ({scorer}, grid {grid or 'full'}{pool})"
            rows.append((name, 2 * selection_macs(s, n, k, scorer, grid, itm_pool,
                                                  new_tokens) / 1e9))
    return rows


def proportion_rows(n: int, k: int, scorers: Sequence[str], grids: Sequence[int],
                    itm_pool: int, new_tokens: int, beams: int, real: Sizes = Sizes(),
                    scaled: Sizes = PROPORTIONAL) -> List[Tuple[str, float, float]]:
    """(what, real-size ratio, scaled ratio): each part's cost relative to one frame through the
    ViT at full resolution, then each video's total relative to uniform ``k`` (the LLM with
    ``beams`` beams and ``new_tokens`` answer tokens, as the benchmark runs it)."""
    def parts(s: Sizes) -> List[Tuple[str, float]]:
        frame = vit_macs(s, s.full_grid)
        full = 1 + s.full_grid ** 2
        rows = []
        for g in grids:
            if 0 < g < s.full_grid:
                rows += [(f"ViT, 1 frame at grid {g} ({1 + g * g} tokens)", vit_macs(s, g))]
            if any(x in scorers for x in ("itc", "itm")):
                feats = 1 + min(g or s.full_grid, s.full_grid) ** 2
                rows += [(f"selector query pass, 1 frame, grid {g or 'full'}",
                          qformer_macs(s, feats, first_self_once=True))]
                if "itm" in scorers:
                    rows += [(f"ITM pass, 1 frame, grid {g or 'full'}",
                              qformer_macs(s, feats, text=s.text_tokens))]
        rows += [(f"Q-Former query pass, 1 frame ({full} tokens)", qformer_macs(s, full))]
        if "llm" in scorers:
            rows += [("LLM scorer prefill, 1 frame",
                      llm_macs(s, s.queries + s.selection_prompt_tokens))]
        for frames in (k, n):
            rows += [(f"LLM answer, {frames} frames",
                      llm_macs(s, frames * s.queries + s.question_tokens, new_tokens, beams))]
        rows = [(name, macs / frame) for name, macs in rows]
        base = video_macs(s, k, new_tokens, beams)
        rows += [(f"video: uniform {n} / uniform {k}", video_macs(s, n, new_tokens, beams) / base)]
        for scorer, g in ((x, g) for x in scorers for g in grids):
            rows += [(f"video: select {k} of {n} ({scorer}, grid {g or 'full'}) / uniform {k}",
                      selection_macs(s, n, k, scorer, g, itm_pool, new_tokens, beams) / base)]
        return rows

    return [(name, a, b) for (name, a), (_, b) in zip(parts(real), parts(scaled))]


def describe(s: Sizes = PROPORTIONAL) -> str:
    """The sizes in a few words (layers x width)."""
    return (f"ViT {s.vit_depth} x {s.vit_width} (MLP {s.vit_mlp}), Q-Former {s.q_layers} x "
            f"{s.q_width} (cross-attention every {s.cross_every}), OPT {s.llm_layers} x "
            f"{s.llm_width}")


def print_proportions(rows: List[Tuple[str, float, float]]) -> float:
    """Print ``proportion_rows`` side by side; returns the largest relative difference."""
    worst = max(abs(b / a - 1) for _, a, b in rows)
    print("\n# PROPORTIONS (FLOP counts of this script): parts per ViT frame at 224 px, videos per "
          "uniform K; real size (EVA ViT-g, Q-Former 12 x 768, OPT-2.7B) vs the proportional "
          f"model ({describe()}); largest difference {100 * worst:.1f}% (tolerance "
          f"{100 * PROPORTION_TOLERANCE:.0f}%)")
    print("| part | real size | proportional | proportional / real |")
    print("|---|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:.4g} | {b:.4g} | {b / a:.3f} |")
    return worst


def print_projection(n: int, k: int, scorers: Sequence[str], grids: Sequence[int],
                     itm_pool: int, new_tokens: int) -> None:
    rows = projection(n, k, scorers, grids, itm_pool, new_tokens)
    base = rows[0][1]
    print(f"\n# FLOP ESTIMATE at real size (EVA ViT-g/14, Q-Former 12 x 768, OPT-2.7B; prompt "
          f"prefill + {new_tokens} answer tokens with 5 beams; decoding and resizing left out): "
          "arithmetic, not a measurement")
    print(f"| frames | GFLOP / video | total / uniform {k} | extra / uniform {k} |")
    print("|---|---|---|---|")
    for name, gflop in rows:
        print(f"| {name} | {gflop:,.0f} | {gflop / base:.2f} | {gflop / base - 1:.2f} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--selection", type=int, nargs=2, default=[32, 4], metavar=("N", "K"))
    p.add_argument("--scorer", nargs="+", default=["itc", "itm", "llm"],
                   choices=["itc", "itm", "llm"])
    p.add_argument("--grid", type=int, nargs="+", default=[8], help="scoring grids (0: full)")
    p.add_argument("--itm-pool", type=int, default=None,
                   help="model.selection_itm_pool (default: the model's default)")
    p.add_argument("--new-tokens", type=int, default=5)
    p.add_argument("--proportions", action="store_true",
                   help="instead: the real size's and the proportional model's cost ratios side "
                        "by side (bench_video_qa.py --proportions real; greedy answer)")
    args = p.parse_args(argv)
    pool = args.itm_pool
    if pool is None:
        from lavis_plugins.models._frame_selection import FrameSelectionFields

        pool = FrameSelectionFields.selection_itm_pool
    if args.proportions:
        print_proportions(proportion_rows(*args.selection, args.scorer, args.grid, pool,
                                          args.new_tokens, beams=1))
        return
    print_projection(*args.selection, args.scorer, args.grid, pool, args.new_tokens)


if __name__ == "__main__":
    main()
