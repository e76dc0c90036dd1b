"""Make a small BERT folder (config, WordPiece vocabulary, random weights) on disk.

BLIP-2's Q-Former is initialised from a BERT checkpoint and tokenises with its vocabulary. No hub
download is possible here, so tests and the demo build a folder of the same format as
``bert-base-uncased`` (loadable by ``transformers.BertModel.from_pretrained`` and
``BertTokenizer.from_pretrained``). LAVIS loads the literal name "bert-base-uncased", which
transformers resolves as a local folder first, so a folder of that name in the working directory
lets LAVIS's reference classes be built offline too.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Iterable, Optional

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# enough plain English for captions and questions in tests; a caller adds its own words
BASIC_WORDS = """a an the of in on at to and or is are was be with without for from by this that
what which who where how many much color colour shape size left right top bottom middle center
picture photo image video frame question answer short yes no there it its one two three four
five six seven eight nine ten red green blue yellow black white orange purple pink brown gray
circle square triangle rectangle small large big tiny man woman dog cat car tree sky person
sitting standing near next above below under over""".split()


def make_tiny_bert(
    folder: str | Path,
    words: Optional[Iterable[str]] = None,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 64,
    seed: int = 0,
    initializer_range: float = 0.02,
    hidden_dropout_prob: float = 0.1,
    attention_probs_dropout_prob: float = 0.1,
) -> Path:
    """Write a BERT config, vocabulary and random weights to ``folder`` and return it.

    The vocabulary holds the special tokens, ``BASIC_WORDS`` + ``words``, single characters and
    their ``##`` continuations (so any lower-case ASCII text tokenises without [UNK]). The weights
    are drawn with ``torch.manual_seed(seed)``, from N(0, ``initializer_range``) as BERT's own
    initialisation; the dropout rates are written to the config (``BertConfig``'s defaults:
    0.02, 0.1, 0.1).
    """
    import torch
    from transformers import BertConfig, BertForMaskedLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = list(SPECIAL_TOKENS)
    seen = set(vocab)
    for tok in [*BASIC_WORDS, *(w.lower() for w in (words or [])), *chars,
                *("##" + c for c in string.ascii_lowercase + string.digits)]:
        if tok not in seen:
            seen.add(tok)
            vocab.append(tok)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text('{"do_lower_case": true}\n')
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        hidden_dropout_prob=hidden_dropout_prob,
        attention_probs_dropout_prob=attention_probs_dropout_prob,
    )
    torch.manual_seed(seed)
    model = BertForMaskedLM(config)
    # safetensors off: LAVIS's old-BERT loader reads pytorch_model.bin as readily as we do
    model.save_pretrained(folder, safe_serialization=False)
    return folder
