"""Tokenising training text in the data loader, and a fast tokenizer where it is safe.

Tokenising inside ``forward`` costs the training loop's own thread (about 15 ms per batch of 105
captions with BERT's slow tokenizer) and copies the ids to the device with a blocking copy. A
model that can tokenise a batch ahead (``pretokenize(samples) -> extra keys``, CPU tensors) lets
``lp_runner`` do it in the loader's collate, in its workers; the ids then travel with the batch
(pinned, non-blocking) and ``forward`` uses them. ``forward`` still accepts raw text alone (LAVIS
callers, parity tests, tasks that rewrite the text before calling the model).

transformers' fast (Rust) tokenizers are several times faster than the slow (Python) ones LAVIS
uses, but are a different implementation: :func:`fast_if_equal` takes the fast one only when its
ids equal the slow one's on hard strings (unicode, accents, long, empty, whitespace) and on the
vocabulary's own words, else keeps the slow one.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# strings where fast and slow tokenizers are known to be able to differ
HARD_STRINGS = (
    "", " ", "  \t\n ", "a red circle left of a blue square.",
    "Café naïve résumé Ångström", "ÀÉÎÕÜ ñ ç ÿ", "İstanbul ß straße ǅ", "Ωmega μ µ ﬁ Ⅻ",
    "日本語のテキスト 한국어 ١٢٣", "emoji 😀👍🏽 test", "tab\there\r\nnew line", "zero\u200bwidth",
    "nbsp\u00a0space a\u3000b", "\u0301combining e\u0301", "control\x00char\x07", "\ufeffbom",
    "don't stop-believing!!! ... (really?)", "[DEC] [CLS] [SEP] [PAD] [UNK]", "<s></s>",
    "x" * 600, "word " * 300,
)


def _ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> List[List[int]]:
    return tokenizer(list(texts), truncation=False)["input_ids"]


def vocabulary_probes(tokenizer: PreTrainedTokenizerBase, per_line: int = 16) -> List[str]:
    """Every vocabulary entry (``##`` continuation marks removed), ``per_line`` to a string."""
    words = [w[2:] if w.startswith("##") else w for w in tokenizer.get_vocab()]
    return [" ".join(words[i:i + per_line]) for i in range(0, len(words), per_line)]


def fast_if_equal(slow: PreTrainedTokenizerBase,
                  make_fast: Callable[[], Optional[PreTrainedTokenizerBase]],
                  probes: Sequence[str] = ()) -> PreTrainedTokenizerBase:
    """``make_fast()`` if it builds and gives the ids ``slow`` gives on ``HARD_STRINGS``,
    ``probes`` and the vocabulary, else ``slow`` (a different result is logged)."""
    try:
        fast = make_fast()
    except (OSError, ValueError, ImportError) as e:  # no converter for this vocabulary
        logger.info("no fast tokenizer (%s): keeping the slow one", e)
        return slow
    if fast is None:
        return slow
    texts = [*HARD_STRINGS, *probes, *vocabulary_probes(slow)]
    for text, a, b in zip(texts, _ids(slow, texts), _ids(fast, texts)):
        if a != b:
            logger.warning("the fast tokenizer gives other ids than the slow one for %r; "
                           "keeping the slow one", text[:60])
            return slow
    return fast


def to_device(enc, device: torch.device):
    """A tokenizer's output (a ``BatchEncoding`` or dict of CPU tensors) on ``device``: pinned
    and copied without blocking on a GPU (a plain ``.to`` from pageable memory waits for the
    device), as is on the CPU."""
    cuda = torch.device(device).type == "cuda"

    def move(v):
        if not torch.is_tensor(v):
            return v
        return v.pin_memory().to(device, non_blocking=True) if cuda else v.to(device)

    return type(enc)({k: move(v) for k, v in enc.items()})


class CollateTokens:
    """A collate function: the dataset's own, then ``pretokenize`` on the batch (a dict).

    ``pretokenize``: a model's method; the loader's workers are forked (Linux), so the model is
    not copied. Batches that are not dicts, or hold no text, pass unchanged."""

    def __init__(self, collate: Optional[Callable], pretokenize: Callable[[Dict], Dict]) -> None:
        self.collate = collate
        self.pretokenize = pretokenize

    def __call__(self, samples):
        from torch.utils.data import default_collate

        batch = (self.collate or default_collate)(samples)
        if isinstance(batch, dict) and batch.get("text_input") is not None:
            batch.update(self.pretokenize(batch))
        return batch
