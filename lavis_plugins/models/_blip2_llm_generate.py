"""Generation and answer ranking of the stage-2 models (:class:`Blip2LLMBase`): prompts,
captioning / VQA by the LLM's ``generate``, and ranking candidate answers by log-likelihood."""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch

from lavis_plugins.common.errors import UserError
from lavis_plugins.models._beam_search import vectorised_beam_search


class Blip2LLMGeneration:
    """Generation and ranking, mixed into
    :class:`~lavis_plugins.models._blip2_llm.Blip2LLMBase` (which supplies ``llm``,
    ``llm_tokenizer``, ``prompt``, ``cfg``, ``visual_prompt`` and ``autocast``); the LLM family
    subclasses supply ``_llm_inputs`` and the ranking hooks."""

    @staticmethod
    def batch_prompts(prompt: Any, batch_size: int, field: str = "prompt") -> List[str]:
        """A prompt for each sample: a string is repeated; a list must have one per sample."""
        if isinstance(prompt, str):
            return [prompt] * batch_size
        prompts = list(prompt)
        if len(prompts) != batch_size:
            raise UserError(f"samples[{field!r}] has {len(prompts)} prompts for {batch_size} "
                            "images; give one string or one per image")
        return prompts

    def postprocess_answers(self, answers: List[str]) -> List[str]:
        """Generated answers, lemmatised when ``apply_lemmatizer`` (LAVIS's OK-VQA protocol)."""
        if not self.cfg.apply_lemmatizer:
            return answers
        nlp = self._lemmatizer()
        return [" ".join(t.lemma_ if t.pos_ in ("NOUN", "VERB") else t.text for t in nlp(a))
                for a in answers]

    def _lemmatizer(self):
        if getattr(self, "_spacy", None) is None:
            try:
                import spacy

                self._spacy = spacy.load("en_core_web_sm")
            except (ImportError, OSError) as e:
                raise UserError(
                    "model.apply_lemmatizer needs spaCy and its en_core_web_sm model: "
                    "`pip install spacy && python -m spacy download en_core_web_sm`, or set "
                    f"model.apply_lemmatizer: false ({e})") from e
        return self._spacy

    @staticmethod
    def format_questions(questions: Any, prompt: str) -> List[str]:
        """Questions put in ``prompt`` ("Question: {} Answer:"); "" keeps them as they are."""
        if isinstance(questions, str):
            questions = [questions]
        if prompt and "{}" not in prompt:
            raise UserError(f"the VQA prompt {prompt!r} has no '{{}}' where the question goes")
        return [prompt.format(q) for q in questions] if prompt else list(questions)

    # ------------------------------------------------------------------ generation
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The LLM's input embeddings of token ids (B, L) -> (B, L, H)."""
        return self.llm.get_input_embeddings()(ids)

    def _llm_inputs(self, inputs_llm: torch.Tensor, atts_llm: torch.Tensor,
                    prompts: Sequence[str], max_new_tokens: int = 0
                    ) -> Tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """``[visual prompt][prompt tokens]`` embeddings (B, Nq + P, H) and mask (B, Nq + P),
        checked against ``context_length`` (with room for ``max_new_tokens`` where generated
        tokens share that context)."""
        raise NotImplementedError

    def _generation_kwargs(self) -> Dict[str, Any]:
        """Extra ``generate`` arguments of the LLM family (e.g. its stop token)."""
        return {}

    def _generation_context(self, rows: int, copies: int, new_tokens: int
                            ) -> ContextManager[None]:
        """What the LLM family changes around one ``generate`` call of ``rows`` inputs that
        transformers repeats ``copies`` times (beams, or samples per image) and that makes at
        most ``new_tokens`` tokens, e.g. a prefill shared by the copies
        (:mod:`~lavis_plugins.models._shared_prefill`)."""
        return contextlib.nullcontext()

    @torch.no_grad()
    def generate(self, samples: Dict[str, Any], use_nucleus_sampling: bool = False,
                 num_beams: int = 5, max_length: int = 30, min_length: int = 1,
                 top_p: float = 0.9, repetition_penalty: float = 1.0,
                 length_penalty: float = 1.0, num_captions: int = 1,
                 temperature: float = 1.0) -> List[str]:
        """Captions (or prompted text) for a batch of images.

        Args:
            samples: ``image`` (B, 3, H, W); optional ``prompt``: one string or B strings
                (default ``model.prompt``).
            use_nucleus_sampling: sample with ``top_p`` / ``temperature`` (else beam search).
            num_beams: beam width (1 = greedy); ignored when sampling.
            max_length / min_length: most / fewest new tokens.
            num_captions: outputs per image (<= num_beams for beam search).
        Returns:
            B * num_captions strings, the captions of image i at ``i*num_captions ...``.
        """
        image = samples["image"]
        prompts = self.batch_prompts(samples.get("prompt", self.prompt), image.shape[0])
        inputs_llm, atts_llm = self.visual_prompt(image, prompts)
        return self._generate(inputs_llm, atts_llm, prompts, use_nucleus_sampling, num_beams,
                              max_length, min_length, top_p, repetition_penalty, length_penalty,
                              num_captions, temperature)

    def _generate(self, inputs_llm, atts_llm, prompts, use_nucleus_sampling, num_beams,
                  max_length, min_length, top_p, repetition_penalty, length_penalty,
                  num_captions, temperature) -> List[str]:
        if use_nucleus_sampling:
            num_beams = 1
        elif num_captions > num_beams:
            raise UserError(f"num_captions ({num_captions}) > num_beams ({num_beams}): beam "
                            "search returns at most num_beams sequences; raise num_beams or "
                            "use nucleus sampling")
        # top_p / temperature only mean something when sampling (transformers warns otherwise)
        sampling = dict(top_p=top_p, temperature=temperature) if use_nucleus_sampling else {}
        if num_beams > 1:  # the same for length_penalty and beams
            sampling["length_penalty"] = length_penalty
        # generate repeats each input row for the beams (beam search) or the samples
        copies = num_captions if use_nucleus_sampling else num_beams
        # beam search's bookkeeping as tensor operations, equal to transformers' to the bit
        with self.autocast(), self._generation_context(
                inputs_llm.shape[0], copies, max_length), vectorised_beam_search(self.llm):
            embeds, mask = self._llm_inputs(inputs_llm, atts_llm, prompts, max_length)
            out = self.llm.generate(
                inputs_embeds=embeds, attention_mask=mask, do_sample=use_nucleus_sampling,
                num_beams=num_beams, **sampling,
                max_new_tokens=max_length, min_new_tokens=min_length,
                **self._generation_kwargs(),
                repetition_penalty=repetition_penalty,
                num_return_sequences=num_captions)
        # with inputs_embeds, a decoder-only LLM's generate returns only the new tokens
        return [t.strip() for t in self.llm_tokenizer.batch_decode(out, skip_special_tokens=True)]

    @torch.no_grad()
    def predict_answers(self, samples: Dict[str, Any], num_beams: int = 5,
                        inference_method: str = "generate", max_len: int = 10,
                        min_len: int = 1, num_ans_candidates: int = 128,
                        answer_list: Optional[Sequence[str]] = None,
                        prompt: Optional[str] = None, length_penalty: float = -1.0,
                        **kwargs: Any) -> List[str]:
        """Answers to ``samples["text_input"]`` (B questions) about ``samples["image"]``.

        ``prompt`` holds each question (default: ``PREDICT_PROMPT``, which is LAVIS's default of
        the same method where LAVIS has one, else the paper's ``VQA_PROMPT``);
        ``inference_method`` "generate" runs beam search, "rank" picks from ``answer_list`` (see
        rank_answers).
        """
        prompt = self.default_predict_prompt() if prompt is None else prompt
        if inference_method == "rank":
            return self.rank_answers(samples, answer_list, num_ans_candidates, prompt)
        if inference_method != "generate":
            raise UserError(f"inference_method {inference_method!r}: use 'generate' or 'rank'")
        questions = self.format_questions(samples["text_input"], prompt)
        if len(questions) != samples["image"].shape[0]:
            raise UserError(f"{len(questions)} questions for {samples['image'].shape[0]} images")
        inputs_llm, atts_llm = self.visual_prompt(samples["image"], questions)
        answers = self._generate(inputs_llm, atts_llm, questions, False, num_beams, max_len,
                                 min_len, 1.0, 1.0, length_penalty, 1, 1.0)
        return self.postprocess_answers(answers)

    # ------------------------------------------------------------------ answer ranking
    VQA_PROMPT = ""  # subclasses: BLIP-2's zero-shot VQA prompt for their LLM
    # predict_answers' prompt when none is given; None: VQA_PROMPT. Subclasses whose LAVIS
    # counterpart has predict_answers set LAVIS's default, so ported client code answers alike
    PREDICT_PROMPT: Optional[str] = None

    def default_predict_prompt(self) -> str:
        return self.VQA_PROMPT if self.PREDICT_PROMPT is None else self.PREDICT_PROMPT
    RANK_CHUNK = 64  # candidates scored per LLM call in ranking

    @torch.no_grad()
    def rank_answers(self, samples: Dict[str, Any], answer_list: Optional[List[str]],
                     num_ans_candidates: int = 128, prompt: Optional[str] = None) -> List[str]:
        """Each question's most likely answer from ``answer_list`` (LLM log-likelihood ranking,
        the protocol InstructBLIP reports for video QA).

        Candidates are first pre-selected by the log-probability of their first token (the
        ``num_ans_candidates`` best, as BLIP's VQA ranking does; all when the list is shorter),
        then scored by the summed log-probability of all their tokens, end-of-answer included.

        Args:
            samples: ``image`` (B, 3, H, W), ``text_input`` (B questions).
            answer_list: the candidate answers (shared by the batch).
            num_ans_candidates: how many survive the first-token pre-selection.
            prompt: question template (default: the model's VQA prompt).
        """
        scores, idx = self._rank(samples, answer_list, num_ans_candidates, prompt)
        best = idx.gather(1, scores.argmax(1, keepdim=True))[:, 0]
        return [answer_list[i] for i in best.tolist()]

    @torch.no_grad()
    def score_candidates(self, samples: Dict[str, Any], candidates: List[str],
                         prompt: Optional[str] = None) -> torch.Tensor:
        """(B, C) log-likelihood of every candidate (summed over its tokens) for each sample."""
        scores, _ = self._rank(samples, candidates, len(candidates), prompt)
        return scores

    def _rank(self, samples, answers, k, prompt) -> Tuple[torch.Tensor, torch.Tensor]:
        if not answers:
            raise UserError("answer ranking needs a non-empty answer list (run.inference_method "
                            "'rank' reads it from the dataset's answer_list)")
        answers = list(answers)
        prompt = self.default_predict_prompt() if prompt is None else prompt
        image = samples["image"]
        if "text_input" in samples:
            prompts = self.format_questions(samples["text_input"], prompt)
        else:
            prompts = self.batch_prompts(samples.get("prompt", self.prompt), image.shape[0])
        state = self._score_prefix(image, prompts)
        cand = self._candidate_tokens(answers)
        first = state["first"]  # (B, V) log-probs of the first answer token
        device = first.device
        first_ids = torch.tensor([c[0] for c in cand], device=device)
        n, b_size = len(answers), first.shape[0]
        k = max(1, min(int(k), n))
        idx = (first[:, first_ids].topk(k, dim=1).indices if k < n
               else torch.arange(n, device=device).expand(b_size, n))
        scores = torch.empty(b_size, k, device=device)
        for b in range(b_size):
            for s in range(0, k, self.RANK_CHUNK):
                sel = idx[b, s:s + self.RANK_CHUNK].tolist()
                rows = [cand[i] for i in sel]
                width = max(len(r) for r in rows)
                ids = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows], device=device)
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows],
                                    device=device)
                scores[b, s:s + len(sel)] = self._continuation_logp(state, b, ids, mask)
        return scores, idx

    def _candidate_tokens(self, answers: List[str]) -> List[List[int]]:  # pragma: no cover
        raise NotImplementedError

    def _score_prefix(self, image: torch.Tensor, prompts: List[str]) -> Dict[str, Any]:
        raise NotImplementedError  # pragma: no cover

    def _continuation_logp(self, state: Dict[str, Any], b: int, ids: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def join_prompt(prompt: str, text: str) -> str:
    """``prompt`` then ``text``, with a space between when neither side has one."""
    if not prompt or not text:
        return prompt + text
    sep = "" if prompt[-1].isspace() or text[0].isspace() else " "
    return prompt + sep + text


def as_text_list(value: Any, name: str) -> List[str]:
    """``samples[name]`` as a list of strings (a single string becomes a list of one)."""
    if value is None:
        raise UserError(f"samples lack {name!r}")
    values = [value] if isinstance(value, str) else list(value)
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise UserError(f"samples[{name!r}] must hold strings; item {bad[0]} is "
                        f"{type(values[bad[0]]).__name__}")
    return values
