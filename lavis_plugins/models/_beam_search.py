"""Beam search for transformers' ``generate`` (4.x, the ``BeamSearchScorer`` path) with its
bookkeeping as tensor operations over (batch, beams), equal to transformers' to the bit.

transformers 4.46's ``_beam_search`` hands every step's top ``2 * num_beams`` candidates to
``BeamSearchScorer.process``, a Python loop over every image and candidate with an ``.item()``
and a tensor membership test each (about 0.1-0.15 s of a 0.9 s 5-beam call of the stage-2
benchmark). :func:`vectorised_beam_search` replaces that method for one ``generate`` call: the
model calls (``prepare_inputs_for_generation``, ``forward``, the cache reorder), the logits
processors and the stopping criteria are transformers' own, called as its loop calls them; only
the choice of the next beams and the store of finished hypotheses are ours:

- the next beams: per image, the first ``num_beams`` candidates (in score order) that are not an
  end-of-sequence token; a finished image's beams take token ``pad`` from row 0 with score 0, as
  transformers' do;
- the finished hypotheses: per image, a (num_beams,) store of scores (float64: transformers keeps
  them as Python floats), token rows and insertion numbers. A step's end-of-sequence candidates
  among the first ``num_beams`` are merged into it by one sort over (kept?, score, tie-break);
  the tie-break reproduces ``BeamHypotheses.add`` one by one: an earlier hypothesis beats a new
  one of equal score, an older one is evicted before a newer one, and within a step an earlier
  candidate beats a later one (``add`` rejects a score equal to the worst);
- the stop: transformers' early-stopping rules (``False``, ``True``, ``"never"``) for every image
  at once, one host read per step (the loop's stopping check);
- the result: ``finalize``'s, including its length-penalised scores (``sum / len ** penalty``,
  divided in float64 as Python does, then rounded to float32), its padding, and the end token it
  appends to hypotheses shorter than the longest.

Anything else (sampling with beams, beam groups, constraints, ``low_memory``, ``synced_gpus``,
attentions or hidden states in the output, a call without a maximum length) runs transformers'
own ``_beam_search``. transformers >= 4.50 has no ``beam_scorer`` argument (its beam search is
already vectorised): there the model runs as it is.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def unsupported(beam_scorer: Any, generation_config: Any, stopping_criteria: Any,
                synced_gpus: bool) -> Optional[str]:
    """Why this call needs transformers' own beam search, or None when ours does it."""
    from transformers.generation.beam_search import BeamSearchScorer

    if not hasattr(generation_config, "_eos_token_tensor"):
        return "an older transformers (generate prepares no special-token tensors)"
    if type(beam_scorer) is not BeamSearchScorer:
        return f"scorer {type(beam_scorer).__name__}"
    if beam_scorer.num_beam_groups != 1:
        return "beam groups"
    if generation_config.do_sample:
        return "beam sampling"
    if generation_config.low_memory:
        return "low_memory"
    if synced_gpus:
        return "synced_gpus"
    if generation_config.return_dict_in_generate and (
            generation_config.output_attentions or generation_config.output_hidden_states):
        return "attentions or hidden states in the output"
    if stopping_criteria.max_length is None:
        return "no maximum length"
    return None


@contextlib.contextmanager
def vectorised_beam_search(llm: nn.Module) -> Iterator[None]:
    """Within the block, ``llm.generate``'s beam search runs :func:`beam_search` (see the module
    docstring); what it does not implement, and transformers without the 4.x ``beam_scorer``
    path, run transformers' own."""
    plain = getattr(llm, "_beam_search", None)
    if plain is None or "beam_scorer" not in inspect.signature(plain).parameters:
        yield
        return

    def run(input_ids, beam_scorer, logits_processor, stopping_criteria, generation_config,
            synced_gpus, **model_kwargs):
        if unsupported(beam_scorer, generation_config, stopping_criteria, synced_gpus):
            return plain(input_ids, beam_scorer, logits_processor, stopping_criteria,
                         generation_config, synced_gpus, **model_kwargs)
        return beam_search(llm, input_ids, beam_scorer, logits_processor, stopping_criteria,
                           generation_config, **model_kwargs)

    llm._beam_search = run
    try:
        yield
    finally:
        del llm._beam_search  # the class's method again


def _lexsort_desc(keys: List[torch.Tensor]) -> torch.Tensor:
    """Per row, the order (B, N) that sorts by ``keys`` (each (B, N), most significant first),
    largest first: stable sorts from the least significant key up."""
    b, n = keys[0].shape
    perm = torch.arange(n, device=keys[0].device).expand(b, n)
    for key in reversed(keys):
        order = key.gather(1, perm).sort(dim=1, descending=True, stable=True).indices
        perm = perm.gather(1, order)
    return perm


class _Finished:
    """Per image, the ``num_beams`` best finished hypotheses (``BeamHypotheses``, batched).

    scores (B, K) float64 length-penalised log-probabilities; valid (B, K) slot in use; seq (B, K)
    insertion number (later = larger); tokens (B, K, W) the hypothesis' ids (``pad`` after
    ``lengths``); lengths (B, K); steps (B, K, S) the beam row of each generated step (-1 after
    its last), for ``beam_indices``."""

    def __init__(self, batch: int, beams: int, width: int, steps: int, pad: int,
                 device: torch.device) -> None:
        self.k = beams
        self.scores = torch.zeros(batch, beams, dtype=torch.float64, device=device)
        self.valid = torch.zeros(batch, beams, dtype=torch.bool, device=device)
        self.seq = torch.full((batch, beams), -1, dtype=torch.long, device=device)
        self.tokens = torch.full((batch, beams, width), pad, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch, beams, dtype=torch.long, device=device)
        self.steps = torch.full((batch, beams, steps), -1, dtype=torch.long, device=device)
        self.added = 0  # insertion numbers handed out so far
        # within a step the candidates arrive best first: an earlier one wins a tie, and every
        # new one loses a tie to a stored one (``add`` needs ``score > worst``)
        self._new_tiebreak = -1 - torch.arange(beams, device=device)

    def add(self, scores: torch.Tensor, valid: torch.Tensor, tokens: torch.Tensor,
            lengths: torch.Tensor, steps: torch.Tensor) -> None:
        """Offer (B, K) candidates in ``add``'s order along dim 1: scores float64, valid bool,
        tokens (B, K, W), lengths (B, K), steps (B, K, S)."""
        b, k = scores.shape
        all_valid = torch.cat([self.valid, valid], 1)  # (B, 2K)
        all_scores = torch.cat([self.scores, scores], 1)
        tiebreak = torch.cat([self.seq, self._new_tiebreak[:k].expand(b, k)], 1)
        keep = _lexsort_desc([all_valid, all_scores, tiebreak])[:, :self.k]  # (B, K)
        new_seq = self.added + torch.arange(k, device=scores.device).expand(b, k)
        self.added += k

        def pick(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            both = torch.cat([old, new], 1)
            index = keep.view(b, self.k, *([1] * (both.dim() - 2))).expand(
                b, self.k, *both.shape[2:])
            return both.gather(1, index)

        self.valid, self.scores = pick(self.valid, valid), pick(self.scores, scores)
        self.seq = pick(self.seq, new_seq)
        self.tokens, self.lengths = pick(self.tokens, tokens), pick(self.lengths, lengths)
        self.steps = pick(self.steps, steps)

    def full(self) -> torch.Tensor:
        return self.valid.all(1)

    def worst(self) -> torch.Tensor:
        """(B,) the lowest stored score (that of a full store)."""
        return self.scores.masked_fill(~self.valid, float("inf")).min(1).values

    def best(self, n: int) -> torch.Tensor:
        """(B, n) slots of the ``n`` best, best first; ties: the later added (``finalize``
        sorts by score, stable, and pops from the end)."""
        return _lexsort_desc([self.valid, self.scores, self.seq])[:, :n]

    def output(self, n: int, max_length: int, pad: Optional[torch.Tensor],
               eos: Optional[torch.Tensor]
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``finalize``'s result for the ``n`` best of each image: ids (B * n, T) (``pad`` after
        a hypothesis, the end token right after one shorter than T), their scores (B * n,)
        float32, and beam indices (B * n, T) (-1 after the last step). T is one more than the
        longest hypothesis, at most ``max_length``; one host read."""
        b = self.scores.shape[0]
        chosen = self.best(n)  # (B, n)

        def take(t: torch.Tensor) -> torch.Tensor:
            index = chosen.view(b, n, *([1] * (t.dim() - 2))).expand(b, n, *t.shape[2:])
            return t.gather(1, index).flatten(0, 1)

        lengths, tokens = take(self.lengths), take(self.tokens)  # (B*n,), (B*n, W)
        longest, shortest = (int(x) for x in torch.stack([lengths.max(), lengths.min()]).tolist())
        width = min(longest + 1, max_length)
        if shortest != longest and pad is None:
            raise ValueError("`pad_token_id` has to be defined")
        pad_id = int(pad) if pad is not None else 0
        column = torch.arange(width, device=tokens.device)
        decoded = _rows_to_width(tokens, width, pad_id).masked_fill(
            column >= lengths[:, None], pad_id)
        if eos is not None:  # the end token after a hypothesis shorter than the output
            decoded = decoded.masked_fill((column == lengths[:, None]) & (lengths[:, None] < width),
                                          int(eos[0]))
        return decoded, take(self.scores).float(), _rows_to_width(take(self.steps), width, -1)


def _rows_to_width(rows: torch.Tensor, width: int, fill: int) -> torch.Tensor:
    """(..., L) -> (..., width) padded with ``fill`` on the right."""
    return F.pad(rows, (0, width - rows.shape[-1]), value=fill)


def beam_search(model: nn.Module, input_ids: torch.LongTensor, beam_scorer: Any,
                logits_processor: Any, stopping_criteria: Any, generation_config: Any,
                **model_kwargs: Any):
    """transformers 4.46's ``GenerationMixin._beam_search`` for one ``BeamSearchScorer`` without
    groups or sampling, with the scorer's work done by tensor operations (module docstring).

    Args:
        input_ids: (B * K, L) the prompt rows, each repeated for the K beams.
        beam_scorer: the scorer ``generate`` built; read for its settings only.
    Returns:
        what transformers' method returns: (B * R, T) ids, or a ``GenerateBeam*Output``.
    """
    from transformers.generation.utils import (
        GenerateBeamDecoderOnlyOutput, GenerateBeamEncoderDecoderOutput)

    pad = generation_config._pad_token_tensor
    eos = generation_config._eos_token_tensor
    return_dict = generation_config.return_dict_in_generate
    output_scores = return_dict and generation_config.output_scores
    output_logits = return_dict and generation_config.output_logits
    k = beam_scorer.num_beams
    batch = len(beam_scorer._beam_hyps)
    keep_n = beam_scorer.num_beam_hyps_to_keep
    penalty = beam_scorer.length_penalty
    early = beam_scorer.do_early_stopping
    max_length = stopping_criteria.max_length
    hyp_max_length = beam_scorer._beam_hyps[0].max_length  # "never"'s horizon
    rows, prompt_len = input_ids.shape
    if rows != batch * k:
        raise ValueError(f"Batch dimension of `input_ids` should be {batch * k}, but is {rows}.")
    device = input_ids.device
    model_kwargs = model._get_initial_cache_position(input_ids, model_kwargs)
    pad_id = int(pad) if pad is not None else 0

    # sum / len ** penalty as transformers computes it (Python floats: float64), one divisor per
    # generated length; a divisor tensor on the device (not a Python scalar: CUDA would multiply
    # by its reciprocal, which differs in the last bit)
    steps_max = max(max_length - prompt_len, 1)
    divisor = torch.tensor([1.0] + [g ** penalty for g in range(1, steps_max + 2)],
                           dtype=torch.float64, device=device)  # [generated length]
    never_divisor = (None if early != "never" or penalty <= 0.0 else
                     torch.tensor((hyp_max_length - prompt_len) ** penalty, dtype=torch.float64,
                                  device=device))
    eos_ids = eos if eos is not None else torch.empty(0, dtype=torch.long, device=device)
    n_keep = max(2, 1 + eos_ids.shape[0]) * k
    image_row = torch.arange(batch, device=device)[:, None] * k  # (B, 1) first beam's row
    ranks = torch.arange(n_keep, device=device)
    finished = _Finished(batch, k, max(max_length, prompt_len + 1), steps_max + 1, pad_id,
                         device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    beam_steps = torch.full((rows, steps_max + 1), -1, dtype=torch.long, device=device)

    beam_scores = torch.zeros(batch, k, dtype=torch.float, device=device)
    beam_scores[:, 1:] = -1e9  # only the first beam's tokens at the first step
    beam_scores = beam_scores.view(-1)
    scores = () if output_scores else None
    raw_logits = () if output_logits else None
    while True:
        model_inputs = model.prepare_inputs_for_generation(input_ids, **model_kwargs)
        outputs = model(**model_inputs, return_dict=True)
        model_kwargs = model._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=model.config.is_encoder_decoder)
        logits = outputs.logits[:, -1, :].clone().float().to(device)  # (B * K, V)
        processed = logits_processor(input_ids, F.log_softmax(logits, dim=-1))
        if output_scores:
            scores += (processed,)
        if output_logits:
            raw_logits += (logits,)
        vocab = processed.shape[-1]
        total = (processed + beam_scores[:, None].expand_as(processed)).view(batch, k * vocab)
        top_scores, top = torch.topk(total, n_keep, dim=1, largest=True, sorted=True)
        top_beam = torch.div(top, vocab, rounding_mode="floor")  # (B, n_keep)
        top_token = top % vocab
        cur_len = input_ids.shape[-1] + 1
        generated = cur_len - prompt_len
        is_eos = torch.isin(top_token, eos_ids)

        # finished hypotheses: end tokens among the first K candidates of unfinished images
        offered = is_eos[:, :k] & ~done[:, None]
        from_row = image_row + top_beam[:, :k]  # (B, K) the beam each one extends
        steps = beam_steps[from_row.view(-1)].view(batch, k, -1)
        steps[:, :, generated - 1] = from_row
        finished.add(top_scores[:, :k].double() / divisor[generated], offered,
                     _rows_to_width(input_ids[from_row.view(-1)], finished.tokens.shape[-1],
                                    pad_id).view(batch, k, -1),
                     torch.full_like(from_row, cur_len - 1), steps)

        # next beams: the first K candidates that are not an end token
        first = (is_eos.long() * n_keep + ranks).argsort(dim=1)[:, :k]  # (B, K) in rank order
        next_scores = top_scores.gather(1, first)
        next_tokens = top_token.gather(1, first)
        next_rows = image_row + top_beam.gather(1, first)
        stopped = done[:, None]  # images done before this step: pad from row 0, score 0
        next_scores = next_scores.masked_fill(stopped, 0.0).view(-1)
        next_tokens = next_tokens.masked_fill(stopped, pad_id).view(-1)
        beam_idx = next_rows.masked_fill(stopped, 0).view(-1)

        # early stopping, per image, with the best candidate score of this step
        best = top_scores.max(dim=1).values.double()
        if early is True:
            stop_now = finished.full()
        else:
            reach = best / (never_divisor if never_divisor is not None else divisor[generated])
            stop_now = finished.full() & (finished.worst() >= reach)
        done = done | stop_now

        beam_scores = next_scores
        input_ids = torch.cat([input_ids[beam_idx, :], next_tokens.unsqueeze(-1)], dim=-1)
        beam_steps = beam_steps[beam_idx]
        beam_steps[:, generated - 1] = beam_idx
        del outputs
        if model_kwargs.get("past_key_values", None) is not None:
            model_kwargs["past_key_values"] = model._temporary_reorder_cache(
                model_kwargs["past_key_values"], beam_idx)
        # the loop's one host read: every image done, or a stopping criterion (max length) met
        if bool(done.all() | stopping_criteria(input_ids, scores).all()):
            break

    # finalize: unfinished images offer their K beams, best first, at their full length
    generated = input_ids.shape[-1] - prompt_len
    finished.add(beam_scores.view(batch, k).double() / divisor[generated],
                 (~done)[:, None].expand(batch, k),
                 _rows_to_width(input_ids, finished.tokens.shape[-1], pad_id).view(batch, k, -1),
                 torch.full((batch, k), input_ids.shape[-1], dtype=torch.long, device=device),
                 beam_steps.view(batch, k, -1))
    decoded, sequence_scores, beam_indices = finished.output(keep_n, max_length, pad, eos)
    if not return_dict:
        return decoded
    fields: Dict[str, Any] = dict(
        sequences=decoded, sequences_scores=sequence_scores if output_scores else None,
        scores=scores, logits=raw_logits, beam_indices=beam_indices if output_scores else None,
        past_key_values=model_kwargs.get("past_key_values"))
    if model.config.is_encoder_decoder:
        return GenerateBeamEncoderDecoderOutput(**fields)
    return GenerateBeamDecoderOnlyOutput(**fields)
