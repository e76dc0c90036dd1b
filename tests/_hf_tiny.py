"""Tiny transformers BLIP-2 folders (what ``save_pretrained`` writes), for the loading and
export tests. Their sizes deliberately differ from our ``tiny`` YAMLs (vision width 48, 2 blocks,
40 px images, 3 queries, cross-attention in every Q-Former layer), so a test passes only when
every size is read from the folder's config.json."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

IMAGE_SIZE = 40
NUM_QUERY = 3


def blip2_config(bert_dir: Path, llm_dir: Optional[Path], *, text_input: bool = False,
                 vocab_size: Optional[int] = None):
    from transformers import AutoConfig, Blip2Config

    bert = AutoConfig.from_pretrained(bert_dir)
    vision = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=8)
    qformer = dict(vocab_size=vocab_size or bert.vocab_size, hidden_size=bert.hidden_size,
                   num_hidden_layers=bert.num_hidden_layers,
                   num_attention_heads=bert.num_attention_heads,
                   intermediate_size=bert.intermediate_size, cross_attention_frequency=1,
                   encoder_hidden_size=48, max_position_embeddings=bert.max_position_embeddings,
                   use_qformer_text_input=text_input)
    text = AutoConfig.from_pretrained(llm_dir).to_dict() if llm_dir else None
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                       num_query_tokens=NUM_QUERY, image_text_hidden_size=16)


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Larger random weights than transformers' init (some of it is ~0), so outputs differ."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2 if p.ndim > 1 else 0.05)
            if name.endswith("self_attn.qkv.bias"):  # EVA has no key bias: zero in real files
                p[p.shape[0] // 3:2 * p.shape[0] // 3] = 0
    return model.eval()


def make_llm_folder(kind: str, folder: Path, bert_dir: Path, llm_dir: Path, seed: int = 5):
    """A ``Blip2ForConditionalGeneration`` folder with its LLM's tokenizer; returns the model."""
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration

    hf = randomise(Blip2ForConditionalGeneration(blip2_config(bert_dir, llm_dir)), seed)
    hf.save_pretrained(folder)
    AutoTokenizer.from_pretrained(llm_dir).save_pretrained(folder)
    return hf


def bert_tokenizer_with_dec(bert_dir: Path):
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(bert_dir)
    tok.add_special_tokens({"bos_token": "[DEC]"})  # as transformers' BLIP-2 ITM processor
    return tok


def make_retrieval_folder(folder: Path, bert_dir: Path, seed: int = 6, tokenizer: bool = True):
    """A ``Blip2ForImageTextRetrieval`` folder (text branch, ITC/ITM heads) with its BERT
    tokenizer; returns the model."""
    from transformers import Blip2ForImageTextRetrieval

    tok = bert_tokenizer_with_dec(bert_dir)
    cfg = blip2_config(bert_dir, None, text_input=True, vocab_size=len(tok))
    hf = randomise(Blip2ForImageTextRetrieval(cfg), seed)
    hf.save_pretrained(folder)
    if tokenizer:
        tok.save_pretrained(folder)
    return hf


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def lavis_reference(cls, ours: torch.nn.Module, bert_dir: Path, **kwargs) -> torch.nn.Module:
    """LAVIS's class ``cls`` (Blip2Qformer, Blip2OPT, Blip2T5) built offline in fp32 with a copy
    of ``ours``'s image encoder (LAVIS's own EVA attention) and ``ln_vision``; its BERT is the
    tiny ``bert-base-uncased`` folder ``bert_dir`` (LAVIS loads that literal name)."""
    import copy
    import os

    from lavis.models.blip2_models import blip2

    from lavis_plugins.models.blip2_base import use_sdpa_attention

    vit = copy.deepcopy(ours.visual_encoder).float()
    use_sdpa_attention(vit, enabled=False)
    ln = blip2.LayerNorm(vit.num_features, eps=ours.ln_vision.eps)
    saved, cwd = blip2.Blip2Base.init_vision_encoder, os.getcwd()
    blip2.Blip2Base.init_vision_encoder = classmethod(lambda c, *a, **k: (vit, ln))
    os.chdir(bert_dir.parent)
    try:
        ref = cls(**kwargs)
    finally:
        blip2.Blip2Base.init_vision_encoder = saved
        os.chdir(cwd)
    return ref.float().eval()


def make_instructblip_folder(folder: Path, bert_dir: Path, llm_dir: Path, seed: int = 8,
                             video: bool = False):
    """An ``InstructBlip(Video)ForConditionalGeneration`` folder: its LLM's tokenizer at the top,
    the Q-Former's BERT tokenizer in ``qformer_tokenizer/`` (as transformers' processor saves
    them); returns the model."""
    from transformers import (AutoTokenizer, InstructBlipConfig,
                              InstructBlipForConditionalGeneration, InstructBlipVideoConfig,
                              InstructBlipVideoForConditionalGeneration)

    tok = bert_tokenizer_with_dec(bert_dir)
    sizes = blip2_config(bert_dir, llm_dir, text_input=True, vocab_size=len(tok)).to_dict()
    keep = ("vision_config", "qformer_config", "text_config", "num_query_tokens")
    config_cls, cls = ((InstructBlipVideoConfig, InstructBlipVideoForConditionalGeneration) if video
                       else (InstructBlipConfig, InstructBlipForConditionalGeneration))
    hf = randomise(cls(config_cls(**{k: sizes[k] for k in keep})), seed)
    hf.save_pretrained(folder)
    AutoTokenizer.from_pretrained(llm_dir).save_pretrained(folder)
    tok.save_pretrained(Path(folder) / "qformer_tokenizer")
    return hf
