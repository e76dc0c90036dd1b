"""Make small OPT and FlanT5-style folders (config, tokenizer, random weights) on disk.

BLIP-2 stage 2 loads its frozen LLM from a local folder. No hub download is possible in tests, so
these write folders of the same format as ``facebook/opt-2.7b`` and ``google/flan-t5-xl``:
loadable by transformers' ``AutoTokenizer`` / ``OPTForCausalLM`` / ``T5TokenizerFast`` /
``T5ForConditionalGeneration`` and by LAVIS's vendored copies (``blip2_opt`` / ``blip2_t5``).

The tokenizers are trained on a few hundred English words (``tiny_bert.BASIC_WORDS`` + ``words``)
so that captions and questions in tests become short token sequences; any text still tokenises
(byte-level BPE for OPT; single characters for T5).
"""
from __future__ import annotations

import json
import math
import string
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from lavis_plugins.common.tiny_bert import BASIC_WORDS

# words the BLIP-2 prompts use, capitalised as they are written
PROMPT_WORDS = ["Question", "Answer", "Short", "answer", "A", "a", "photo", "of"]


def _corpus(words: Optional[Iterable[str]]) -> List[str]:
    vocab = [*BASIC_WORDS, *PROMPT_WORDS, *(words or [])]
    # each word alone, after a space, and followed by punctuation, as in prompts
    return [" ".join(vocab), " " + " ".join(vocab), "Question: what? Answer: yes.\n" * 3]


def make_tiny_opt(
    folder: str | Path,
    words: Optional[Iterable[str]] = None,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    ffn_dim: int = 64,
    max_position_embeddings: int = 128,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Write an OPT config, byte-level BPE tokenizer and random weights to ``folder``.

    Special tokens follow facebook/opt-*: ``<s>``=0, ``<pad>``=1, ``</s>``=2 (BOS and EOS),
    ``<unk>``=3; the tokenizer prepends ``</s>`` like OPT's.
    """
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import OPTConfig, OPTForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(words), vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    bpe.save_model(str(folder))  # vocab.json, merges.txt (GPT2Tokenizer's files)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "errors": "replace",
        "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>",
        "model_max_length": max_position_embeddings,
    }, indent=1))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}))
    config = OPTConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=hidden_size,
        word_embed_proj_dim=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        ffn_dim=ffn_dim,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=1, bos_token_id=2, eos_token_id=2,
        dropout=0.0, attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    OPTForCausalLM(config).save_pretrained(folder, safe_serialization=False)
    return folder


def _t5_tokenizer_json(words: Optional[Iterable[str]],
                       pieces: Sequence[str] = ("<pad>", "</s>", "<unk>"),
                       template: Tuple[str, str] = ("$A </s>", "$A </s> $B </s>")) -> str:
    """A SentencePiece-style unigram tokenizer (``▁`` marks a word start) as tokenizer.json.
    ``pieces``: the special tokens, in id order (one named ``<unk>``); ``template``: what the
    tokenizer adds around one text / a pair (T5: ``</s>`` after; LLaMA: ``<s>`` before)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = list(pieces)
    seen = set(pieces)
    whole = []
    for w in [*BASIC_WORDS, *PROMPT_WORDS, *(words or [])]:
        for p in ("▁" + w, w):
            if p not in seen:
                seen.add(p)
                whole.append(p)
    chars = ["▁", *string.ascii_letters, *string.digits, *string.punctuation]
    chars = [c for c in chars if c not in seen]
    # whole words score higher than spelling them out, so known words stay one piece
    vocab = [(p, 0.0) for p in pieces] + [(p, -2.0) for p in whole] + \
        [(c, -2.0 - math.log(len(chars))) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=pieces.index("<unk>"), byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    used = [p for p in pieces if p in " ".join(template).split()]
    tok.post_processor = processors.TemplateProcessing(
        single=template[0], pair=template[1], special_tokens=[(p, pieces.index(p)) for p in used])
    return tok.to_str()


def make_tiny_t5(
    folder: str | Path,
    words: Optional[Iterable[str]] = None,
    d_model: int = 32,
    d_kv: int = 8,
    d_ff: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Write a FlanT5-style config (gated-GELU, untied head), tokenizer and random weights.

    Special tokens follow google/flan-t5-*: ``<pad>``=0 (also the decoder start), ``</s>``=1,
    ``<unk>``=2; no ``<extra_id_*>`` sentinels (BLIP-2 does not use them).
    """
    import torch
    from transformers import T5Config, T5ForConditionalGeneration, T5TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(_t5_tokenizer_json(words))
    tokenizer = T5TokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), extra_ids=0,
                                model_max_length=512)
    tokenizer.save_pretrained(folder)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model, d_kv=d_kv, d_ff=d_ff,
        num_layers=num_layers, num_decoder_layers=num_layers, num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(folder, safe_serialization=False)
    return folder


def make_tiny_llama(
    folder: str | Path,
    words: Optional[Iterable[str]] = None,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 128,
    seed: int = 0,
) -> Path:
    """Write a LLaMA-architecture config (grouped-query attention, RoPE, RMSNorm, SwiGLU),
    tokenizer and random weights: the family of Vicuna, the LLM of InstructBLIP's causal models.

    Special tokens follow LLaMA's: ``<unk>``=0, ``<s>``=1 (prepended), ``</s>``=2; like LLaMA's
    tokenizer it has no pad token.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(_t5_tokenizer_json(
        words, pieces=("<unk>", "<s>", "</s>"), template=("<s> $A", "<s> $A $B")))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>",
                                  model_max_length=max_position_embeddings)
    tok.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
