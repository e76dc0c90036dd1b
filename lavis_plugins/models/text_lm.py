"""``lp_text_lm``: a tiny decoder-only language model (transformers' OPT) trained on text alone.

BLIP-2's stage 2 plugs a frozen, pre-trained LLM behind the Q-Former. The embedded demo has no
downloaded LLM, so it pre-trains this one on the shapes dataset's text (captions and
"Question: ... Answer: ..." strings) through the same runner as every other stage, then exports it
with :meth:`TextLM.export_pretrained` as a transformers folder of the same format as
``facebook/opt-*`` (``OPTForCausalLM`` weights + GPT-2 byte-level BPE tokenizer with OPT's special
tokens). Stage 2 loads that folder like a real OPT checkpoint and keeps it frozen.

Soft context. BLIP-2 works because a large LLM can be steered by a few vectors put before its
text (a soft prompt); prompt tuning only matches fine-tuning from ~10B parameters (Lester et al.,
2021). A 2-layer LM trained on plain text cannot be steered so: measured on this dataset, even
free per-caption prefix vectors, optimised directly, only cut its caption loss from 0.57 to 0.35
nats/token, and stage 2 did not learn at all. So this LM is pre-trained with *soft context*:
another caption of the same image becomes ``context_tokens`` vectors put before the text, where
stage 2 will put the Q-Former's soft visual prompt (the group repeated 1 to
``context_max_repeats`` times, as frame concatenation puts one group per video frame). Each
vector is the mean of the LM's own word embeddings over a chunk of that caption
(:func:`chunk_means`), so the LM learns to read a scene from vectors in its embedding space
before its text, the ability scale gives real LLMs, and the Q-Former later has a target it can
reach. The LM never sees an image; texts without a context are trained as plain text.

The tokenizer, unless ``tokenizer_path`` names one, is the byte-level BPE that
:func:`lavis_plugins.common.tiny_llm.make_tiny_opt` trains over a small English word list plus the
shapes vocabulary: every shapes word after a space is one token, and any other text still
tokenises (byte fallback). Like OPT's, it prepends ``</s>`` as BOS; ``"\\n"`` is one token, which
BLIP-2's OPT models append to every target text and use as the end of a generated answer, so the
LM is trained on ``text + "\\n"``.

Export a trained run's checkpoint by hand with::

    python -c "import lavis_plugins.models.text_lm as m; \\
        m.export_checkpoint('OUT/JOB/checkpoint_0.pth', 'LLM_FOLDER')"
"""
from __future__ import annotations

import logging
import random
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from lavis.common.registry import registry
from lavis.models.base_model import BaseModel
from transformers.utils import ModelOutput

from lavis_plugins.common.errors import UserError
from lavis_plugins.paths import config_path

logger = logging.getLogger(__name__)

# keys of a LAVIS ``model:`` section that are not architecture settings
_LAVIS_MODEL_KEYS = {"arch", "model_type", "load_pretrained", "load_finetuned", "pretrained",
                     "finetuned"}


@dataclass
class TextLMConfig:
    """Architecture and text settings of ``lp_text_lm`` (the ``model:`` keys it reads)."""

    # folder holding an OPT-style tokenizer (AutoTokenizer-loadable); None builds the built-in
    # byte-level BPE over the shapes vocabulary
    tokenizer_path: Optional[str] = None
    hidden_size: int = 64  # width of embeddings and hidden states
    num_layers: int = 2  # decoder blocks
    num_heads: int = 8  # attention heads per block (hidden_size must divide by it); measured:
    # with 8 the LM learns to read colour, shape and size from its soft context within the
    # demo's budget, with 4 not all of them
    ffn_dim: int = 256  # width of each block's feed-forward layer
    max_positions: int = 64  # position table size: the longest soft prompt + text
    dropout: float = 0.0  # dropout on hidden states and attention weights while training
    max_txt_len: int = 40  # texts are truncated to this many tokens (BOS and "\n" included)
    # appended to every training text: BLIP-2's OPT models end each target with "\n" and stop
    # generating there, so the exported LM must know it
    end_of_text: str = "\n"
    # soft context vectors per group before a text that has a ``text_context`` (0: never);
    # set it to the stage-2 model's num_query_token
    context_tokens: int = 4
    # a batch's context is repeated 1..this many times (drawn per batch), as concatenating the
    # soft prompts of several video frames does
    context_max_repeats: int = 4
    seed: int = 0  # seeds the random initial weights

    @classmethod
    def from_model_cfg(cls, cfg: Any) -> "TextLMConfig":
        """The config from a LAVIS ``model:`` section; unknown keys are errors, not ignored."""
        given = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - names - _LAVIS_MODEL_KEYS)
        if unknown:
            raise UserError(f"model config of lp_text_lm has unknown keys {unknown}; "
                            f"known keys: {sorted(names)}")
        config = cls(**{k: given[k] for k in names if k in given})
        if config.hidden_size % config.num_heads:
            raise UserError(f"model.hidden_size={config.hidden_size} is not divisible by "
                            f"model.num_heads={config.num_heads}")
        if config.context_tokens < 0 or config.context_max_repeats < 1:
            raise UserError("model.context_tokens must be >= 0 and model.context_max_repeats "
                            ">= 1")
        longest = config.context_tokens * config.context_max_repeats + config.max_txt_len
        if longest > config.max_positions:
            raise UserError(f"model.max_positions={config.max_positions} is shorter than the "
                            f"longest input, context_tokens * context_max_repeats + max_txt_len "
                            f"= {longest}")
        return config


@dataclass
class TextLMOutput(ModelOutput):
    """Training output of ``lp_text_lm``.

    Args:
        loss: () mean next-token cross-entropy over the text tokens (BOS included: after a soft
            context the LM predicts it, as stage 2 asks; padding and context excluded).
        loss_lm: () the same value, under the name the runner logs per component.
        logits: (B, C + L, V) next-token logits (C context vectors, L text tokens, V vocabulary).
    """

    loss: Optional[torch.FloatTensor] = None
    loss_lm: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None


def build_shapes_tokenizer(folder: str | Path):
    """Write the built-in OPT-style tokenizer (byte-level BPE over ``BASIC_WORDS`` and the shapes
    vocabulary) to ``folder`` and return it loaded with ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    from lavis_plugins.common.tiny_llm import PROMPT_WORDS, make_tiny_opt
    from lavis_plugins.demo_data import shapes_vocabulary

    # make_tiny_opt also writes a throw-away 1-layer OPT: only its tokenizer files are kept.
    # vocab_size is an upper bound: training stops once every word is one token (~500).
    make_tiny_opt(folder, words=[*shapes_vocabulary(), *PROMPT_WORDS], hidden_size=8,
                  num_hidden_layers=1, num_attention_heads=1, ffn_dim=8, vocab_size=2048)
    for weights in ("pytorch_model.bin", "model.safetensors", "config.json",
                    "generation_config.json"):
        (Path(folder) / weights).unlink(missing_ok=True)
    return AutoTokenizer.from_pretrained(str(folder))


def chunk_means(embeds: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, D) token embeddings -> (B, n, D): the mean over each of ``n`` consecutive, near
    equal chunks of every row's real tokens (``mask`` (B, T) marks them). A row shorter than
    ``n`` repeats its tokens."""
    lengths = mask.sum(1).clamp(min=1)  # (B,)
    pos = torch.arange(embeds.shape[1], device=embeds.device)[None]  # (1, T)
    chunk = (pos * n) // lengths[:, None]  # (B, T): which chunk each token falls in
    onehot = torch.nn.functional.one_hot(chunk.clamp(max=n - 1), n).to(embeds.dtype)
    onehot = onehot * mask[..., None].to(embeds.dtype)  # (B, T, n), padding in no chunk
    sums = onehot.transpose(1, 2) @ embeds  # (B, n, D)
    counts = onehot.sum(1)[..., None]  # (B, n, 1)
    empty = counts == 0  # a chunk with no token (row shorter than n): use the whole row's mean
    whole = (embeds * mask[..., None]).sum(1, keepdim=True) / lengths[:, None, None]
    return torch.where(empty, whole, sums / counts.clamp(min=1))


@registry.register_model("lp_text_lm")
class TextLM(BaseModel):
    """A tiny OPT decoder trained from scratch with the LM loss on ``samples["text_input"]``,
    each text after the soft context of its ``samples["text_context"]`` when given."""

    PRETRAINED_MODEL_CONFIG_DICT = {"tiny": config_path("models/lp_text_lm_tiny.yaml")}

    def __init__(self, config: TextLMConfig, tokenizer) -> None:
        super().__init__()
        from transformers import OPTConfig, OPTForCausalLM

        self.config = config
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            raise UserError(f"the tokenizer at {config.tokenizer_path} has no pad token")
        torch.manual_seed(config.seed)
        opt_config = OPTConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            word_embed_proj_dim=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            ffn_dim=config.ffn_dim,
            max_position_embeddings=config.max_positions,
            dropout=config.dropout,
            attention_dropout=config.dropout,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        self.lm = OPTForCausalLM(opt_config)

    @classmethod
    def from_config(cls, cfg: Any) -> "TextLM":
        config = TextLMConfig.from_model_cfg(cfg)
        if config.tokenizer_path is None:
            with tempfile.TemporaryDirectory(prefix="lp_text_lm_tok_") as tmp:
                tokenizer = build_shapes_tokenizer(tmp)
        else:
            from transformers import AutoTokenizer

            if not Path(config.tokenizer_path).is_dir():
                raise UserError(f"model.tokenizer_path={config.tokenizer_path!r} is not a folder; "
                                "give a tokenizer folder or leave it unset for the built-in one")
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_path)
        return cls(config, tokenizer)

    # ------------------------------------------------------------------ training
    def tokenize(self, texts: Sequence[str], end: str = "") -> Dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` (B, L) of ``texts + end``, right-padded, truncated
        to ``max_txt_len``; each text starts with the tokenizer's BOS."""
        tok = self.tokenizer([t + end for t in texts], return_tensors="pt", padding="longest",
                             truncation=True, max_length=self.config.max_txt_len)
        return {k: v.to(self.device) for k, v in tok.items()
                if k in ("input_ids", "attention_mask")}

    def soft_context(self, contexts: Sequence[str], repeats: int) -> torch.Tensor:
        """(B, repeats * context_tokens, D): each context text's word embeddings (without BOS),
        averaged over ``context_tokens`` consecutive chunks; the group repeated."""
        if not self.config.context_tokens:
            raise UserError("the batch has 'text_context' but model.context_tokens is 0")
        tok = self.tokenize(contexts)
        ids, mask = tok["input_ids"][:, 1:], tok["attention_mask"][:, 1:]  # BOS carries nothing
        embeds = self.lm.get_input_embeddings()(ids)
        return chunk_means(embeds, mask, self.config.context_tokens).repeat(1, repeats, 1)

    def forward(self, samples: Dict[str, Any]) -> TextLMOutput:
        """LM loss on ``samples["text_input"]`` (B strings), each after the soft context of
        ``samples["text_context"]`` (B strings) when the batch has it; other keys are ignored."""
        if "text_input" not in samples:
            raise UserError(f"lp_text_lm trains on 'text_input'; the batch has {sorted(samples)}")
        tok = self.tokenize(samples["text_input"], self.config.end_of_text)
        ids, mask = tok["input_ids"], tok["attention_mask"]
        embeds = self.lm.get_input_embeddings()(ids)  # (B, L, D)
        targets = ids.masked_fill(mask == 0, -100)  # padding is not a target
        if samples.get("text_context") is not None:
            # drawn from the global RNG, which the runner seeds and checkpoints
            repeats = random.randint(1, self.config.context_max_repeats)
            ctx = self.soft_context(samples["text_context"], repeats)  # (B, C, D)
            embeds = torch.cat([ctx, embeds], dim=1)
            mask = torch.cat([mask.new_ones(ctx.shape[:2]), mask], dim=1)
            targets = torch.cat([targets.new_full(ctx.shape[:2], -100), targets], dim=1)
        # transformers shifts labels by one inside the loss: the last context vector predicts BOS
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, labels=targets)
        return TextLMOutput(loss=out.loss, loss_lm=out.loss.detach(), logits=out.logits)

    # ------------------------------------------------------------------ inference / export
    @torch.no_grad()
    def generate(self, prompts: Sequence[str], contexts: Optional[Sequence[str]] = None,
                 max_new_tokens: int = 20) -> List[str]:
        """Greedy continuations of ``prompts`` (after the soft context of ``contexts`` when
        given, one group), each cut at the first ``end_of_text``."""
        eos = self.tokenizer(self.config.end_of_text, add_special_tokens=False).input_ids[0]
        out = []
        for i, prompt in enumerate(prompts):  # one at a time: no left-padding bookkeeping
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids.to(self.device)
            embeds = self.lm.get_input_embeddings()(ids)
            if contexts is not None:
                embeds = torch.cat([self.soft_context([contexts[i]], 1), embeds], dim=1)
            gen = self.lm.generate(inputs_embeds=embeds,
                                   attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                             device=self.device),
                                   max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id)
            text = self.tokenizer.decode(gen[0], skip_special_tokens=True)
            out.append(text.split(self.config.end_of_text)[0])
        return out

    def export_pretrained(self, folder: str | Path) -> Path:
        """Write the LM and its tokenizer as a transformers folder (``AutoTokenizer`` and
        ``AutoModelForCausalLM`` load it, slow or fast tokenizer alike) and return it. The
        context encoder is not part of it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(folder, safe_serialization=False)
        self.tokenizer.save_pretrained(folder)
        return folder


def export_checkpoint(checkpoint: str | Path, folder: str | Path) -> Path:
    """Rebuild ``lp_text_lm`` from a runner checkpoint (its saved config + weights) and export it
    with :meth:`TextLM.export_pretrained`."""
    from lavis_plugins.common.safe_load import load_weights

    ckpt = load_weights(checkpoint, "checkpoint")  # weights-only: the file runs no code
    model_cfg = (ckpt.get("config") or {}).get("model") if isinstance(ckpt, dict) else None
    if not model_cfg or model_cfg.get("arch") != "lp_text_lm":
        raise UserError(f"{checkpoint} is not a checkpoint of an lp_text_lm run "
                        f"(its config's model.arch is {(model_cfg or {}).get('arch')!r})")
    model = TextLM.from_config(model_cfg)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise UserError(f"{checkpoint} does not match its own config: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    return model.export_pretrained(folder)
