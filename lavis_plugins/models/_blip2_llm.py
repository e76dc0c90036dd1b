"""What BLIP-2's two stage-2 models share: frozen image encoder -> Q-Former -> linear projection ->
soft visual prompt for a frozen LLM, and their config.

``lp_blip2_opt`` (decoder-only LLM) and ``lp_blip2_t5`` (encoder-decoder LLM) subclass
:class:`Blip2LLMBase`; they differ in how text is fed and scored. The LLMs are transformers' own
``OPTForCausalLM`` / ``T5ForConditionalGeneration`` (LAVIS vendors old copies of both), loaded
from a local folder, frozen, and kept in fp16/bf16 on GPU (fp32 when no GPU is visible).

Checkpoint loading is in :mod:`lavis_plugins.models._blip2_llm_checkpoint`, generation and
answer ranking in :mod:`lavis_plugins.models._blip2_llm_generate` (mixed into
:class:`Blip2LLMBase`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers.utils import ModelOutput

from lavis_plugins.common.errors import UserError
from lavis_plugins.common.local_files import local_hf_folder
from lavis_plugins.models._blip2_llm_checkpoint import Blip2LLMCheckpoints, load_pth
from lavis_plugins.models._blip2_llm_generate import (
    Blip2LLMGeneration,
    as_text_list,
    join_prompt,
)
from lavis_plugins.models.blip2_base import VIT_MODELS, LPBlip2Base, TinyVitConfig
from lavis_plugins.models.blip2_qformer import init_vision_and_qformer
from lavis_plugins.models.hf_format import folder_tokenizer, qformer_bert_config, read_config

# names importable from here before the split into checkpoint / generation modules
__all__ = ["LLM_DTYPES", "TINY_LLM", "Blip2LLMBase", "Blip2LLMConfig", "Blip2LLMOutput",
           "as_text_list", "join_prompt", "load_pth"]

logger = logging.getLogger(__name__)

LLM_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TINY_LLM = "tiny"  # LLM folder value that makes (once, in the cache folder) a tiny random LLM
# keys of the model config that LAVIS's Config adds and that are not model settings
_CONFIG_META_KEYS = ("arch", "model_type")


@dataclass
class Blip2LLMConfig:
    """Settings shared by the stage-2 models (each default is written here, once)."""

    # --- image encoder ---
    # "eva_clip_g" (EVA ViT-g/14), "clip_L" (ViT-L/14), "eva" (EVA-style, sizes in tiny_vit), "tiny"
    vit_model: str = "eva_clip_g"
    image_size: int = 224  # input resolution (364 for LAVIS's COCO caption fine-tuned weights)
    drop_path_rate: float = 0.0  # stochastic depth of the ViT (matters only when it trains)
    use_grad_checkpoint: bool = False  # recompute ViT activations in backward (unfrozen ViT)
    vit_precision: str = "fp16"  # ViT weights on GPU: "fp16" or "fp32"
    vit_path: Optional[str] = None  # local eva_clip_g / clip_L weights; "random": untrained
    freeze_vit: bool = True  # False fine-tunes the image encoder (caption / VQA fine-tuning)
    tiny_vit: TinyVitConfig = field(default_factory=TinyVitConfig)  # sizes for "tiny" / "eva"
    # --- Q-Former ---
    bert_path: str = "bert-base-uncased"  # BERT folder the Q-Former is built from; "tiny": random
    num_query_token: int = 32  # learned queries = length of the soft visual prompt
    cross_attention_freq: int = 2  # a cross-attention layer every N-th Q-Former block
    stage1_checkpoint: Optional[str] = None  # stage-1 .pth that initialises the Q-Former
    # the Q-Former also reads the text the LLM is prompted with (the question in VQA), which
    # interacts with the queries in self-attention: BLIP-2's VQA fine-tuning ("we additionally
    # condition Q-Former on the question"), InstructBLIP's instruction-aware Q-Former. Keeps the
    # Q-Former's text branch (word embeddings, text feed-forward layers; from bert_path or the
    # stage-1 checkpoint, since LAVIS's stage-2 files lack it)
    qformer_text_input: bool = False
    # --- frozen LLM ---
    llm_dtype: str = "fp16"  # LLM weights on GPU: "fp16", "bf16" or "fp32" (fp32 without GPU)
    llm_dropout: bool = True  # keep the frozen LLM's dropout active in training (as LAVIS)
    prompt: str = ""  # text after the visual prompt, in training and captioning
    # predict_answers: nouns and verbs of generated answers to their lemma (spaCy
    # en_core_web_sm), as LAVIS's OK-VQA evaluation does
    apply_lemmatizer: bool = False
    max_txt_len: int = 32  # training text is truncated to this many tokens
    # --- weights to load (LAVIS's keys) ---
    pretrained: Optional[str] = None  # LAVIS .pth (path or URL) or transformers Blip2 folder
    finetuned: Optional[str] = None  # same formats; read instead of pretrained if load_finetuned
    load_pretrained: bool = True  # load ``pretrained`` (when set)
    load_finetuned: bool = False  # load ``finetuned`` instead

    # config keys accepted as other names of a field: {alias: field}
    ALIASES: ClassVar[Dict[str, str]] = {}

    @classmethod
    def from_cfg(cls, cfg: Any, arch: str) -> "Blip2LLMConfig":
        """Build from a LAVIS model config (``OmegaConf``/dict); unknown keys are an error."""
        raw = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        for k in _CONFIG_META_KEYS:
            raw.pop(k, None)
        names = {f.name for f in fields(cls)}
        for alias, name in cls.ALIASES.items():
            if alias in raw:
                value = raw.pop(alias)
                if raw.get(name) not in (None, value) and value is not None:
                    raise UserError(f"model config of {arch}: {alias!r} ({value!r}) and {name!r} "
                                    f"({raw[name]!r}) name the same setting; keep one")
                if value is not None:
                    raw[name] = value
        unknown = sorted(set(raw) - names)
        if unknown:
            raise UserError(f"unknown key(s) {unknown} in the model config of {arch}; accepted "
                            f"keys: {sorted(names | set(cls.ALIASES) | set(_CONFIG_META_KEYS))}")
        if "tiny_vit" in raw:
            raw["tiny_vit"] = TinyVitConfig.from_any(raw["tiny_vit"])
        for key in ("pretrained", "finetuned", "stage1_checkpoint", "vit_path"):
            if raw.get(key) == "":  # LAVIS's YAMLs write "" for "none"
                raw[key] = None
        cfg_obj = cls(**raw)
        cfg_obj.validate(arch)
        return cfg_obj

    def validate(self, arch: str) -> None:
        if self.vit_model not in VIT_MODELS:
            raise UserError(f"model.vit_model of {arch} is {self.vit_model!r}; choose one of "
                            f"{list(VIT_MODELS)}")
        if self.llm_dtype not in LLM_DTYPES:
            raise UserError(f"model.llm_dtype of {arch} is {self.llm_dtype!r}; choose one of "
                            f"{list(LLM_DTYPES)}")
        if self.num_query_token < 1 or self.max_txt_len < 1:
            raise UserError(f"model.num_query_token and model.max_txt_len of {arch} must be >= 1")


@dataclass
class Blip2LLMOutput(ModelOutput):
    """Training output of a stage-2 model.

    Attributes:
        loss: scalar, the LM loss (mean over target tokens).
        loss_lm: the same value, under the name the runner logs.
        logits: only when ``forward(..., return_logits=True)``: the LLM's next-token logits at the
            text positions, (B, L, V) (OPT: position i predicts text token i; T5: decoder logits).
        targets: with ``logits``: (B, L) target ids, -100 where no loss is taken.
    """

    loss: Optional[torch.Tensor] = None
    loss_lm: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    targets: Optional[torch.Tensor] = None


class Blip2LLMBase(Blip2LLMCheckpoints, Blip2LLMGeneration, LPBlip2Base):
    """Image -> soft visual prompt (B, Nq, H_llm) for a frozen LLM. Subclasses add the LLM."""

    CONFIG_CLASS = Blip2LLMConfig
    PROJ_NAME = "llm_proj"  # state-dict name of the projection (opt_proj / t5_proj)
    # state-dict name of the LLM (opt_model / t5_model), also the config key of its folder
    LLM_NAME = "llm"
    PRETRAINED_MODEL_CONFIG_DICT: ClassVar[Dict[str, str]] = {}
    # ``model_type`` of the transformers folders this class loads
    HF_MODEL_TYPES: ClassVar[Tuple[str, ...]] = ("blip-2",)
    # --- the LLM family; subclasses set these (classes by name: transformers is imported lazily)
    LLM_CLASS = ""  # transformers model class, e.g. "OPTForCausalLM"
    LLM_MODEL_TYPE = ""  # ``text_config.model_type`` a transformers BLIP-2 folder must have
    LLM_LABEL = ""  # the LLM family in messages, e.g. "OPT"
    OTHER_ARCH_HINT = ""  # the model to use for the other family, e.g. "lp_blip2_t5 for FlanT5"
    TOKENIZER_CLASS = "AutoTokenizer"  # transformers tokenizer class
    TOKENIZER_NAME = "llm_tokenizer"  # attribute holding the tokenizer (opt_/t5_tokenizer)
    # files of which any one means a folder holds the LLM's tokenizer
    TOKENIZER_FILES: ClassVar[Tuple[str, ...]] = ("tokenizer.json",)

    @classmethod
    def arch_name(cls) -> str:
        """The name this class is registered under (for messages), else its class name."""
        from lavis.common.registry import registry

        names = [n for n, c in registry.mapping["model_name_mapping"].items() if c is cls]
        return names[0] if names else cls.__name__

    @classmethod
    def default_config_path(cls, model_type: str) -> str:
        """The default YAML of ``model_type`` (an absolute path; unknown types list the choices)."""
        from lavis_plugins.common.errors import unknown_name

        if model_type not in cls.PRETRAINED_MODEL_CONFIG_DICT:
            raise unknown_name(f"model_type of {cls.arch_name()}", model_type,
                               cls.PRETRAINED_MODEL_CONFIG_DICT)
        return cls.PRETRAINED_MODEL_CONFIG_DICT[model_type]

    def __init__(self, cfg: Blip2LLMConfig, hf_folder: Optional[str] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.prompt = cfg.prompt
        self.max_txt_len = cfg.max_txt_len
        # a transformers folder brings every weight: the Q-Former is built at its sizes
        init_vision_and_qformer(self, cfg, bert_config=None if hf_folder is None else
                                qformer_bert_config(read_config(hf_folder)["qformer_config"]))
        if cfg.qformer_text_input:
            self.tokenizer = self.init_tokenizer(cfg.bert_path if hf_folder is None else
                                                 self._folder_qformer_tokenizer(hf_folder))
            self.Qformer.resize_token_embeddings(len(self.tokenizer))  # [DEC], as stage 1
            self.Qformer.cls = None  # no LM head in stage 2
        else:
            self._drop_qformer_text_branch()
        llm = self._build_llm(hf_folder)
        llm.requires_grad_(False)
        setattr(self, self.LLM_NAME, llm)
        setattr(self, self.PROJ_NAME,
                nn.Linear(self.Qformer.config.hidden_size, llm.config.hidden_size))

    # ------------------------------------------------------------------ construction
    def _folder_qformer_tokenizer(self, folder: str) -> str:
        """The BERT tokenizer of a transformers folder's question-aware Q-Former: its
        ``qformer_tokenizer/`` sub-folder (InstructBLIP), else a local ``bert_path``."""
        from lavis_plugins.models.blip2_base import resolve_bert_path
        from lavis_plugins.models.hf_format import BERT_TOKENIZER_FILES, QFORMER_TOKENIZER_DIR

        return folder_tokenizer(os.path.join(folder, QFORMER_TOKENIZER_DIR),
                                BERT_TOKENIZER_FILES, lambda: resolve_bert_path(self.cfg.bert_path),
                                "Q-Former tokenizer", "bert_path")

    def _drop_qformer_text_branch(self) -> None:
        """Stage 2 feeds only queries through the Q-Former: its LM head, word/position
        embeddings and the text-side feed-forward layers are removed (as LAVIS does), so
        checkpoints keep LAVIS's key set."""
        bert = self.Qformer.bert
        self.Qformer.cls = None
        bert.embeddings.word_embeddings = None
        bert.embeddings.position_embeddings = None
        for layer in bert.encoder.layer:
            layer.output = None
            layer.intermediate = None

    def _build_llm(self, hf_folder: Optional[str]) -> nn.Module:
        """The frozen LLM (and its tokenizer, see ``_load_tokenizer``) in ``llm_load_dtype``.

        From a transformers BLIP-2 folder (``hf_folder``): the architecture of its
        ``text_config``, weights left uninitialised (``load_hf_blip2`` fills them), the folder's
        tokenizer when it has one, else the one of ``model.<LLM_NAME>``. Otherwise: the plain LLM
        folder ``model.<LLM_NAME>``, weights and tokenizer.
        """
        import transformers
        from transformers import AutoConfig
        from transformers.modeling_utils import no_init_weights

        llm_cls = getattr(transformers, self.LLM_CLASS)
        dtype = self.llm_load_dtype()
        llm_path = getattr(self.cfg, self.LLM_NAME)
        if hf_folder is not None:
            text_cfg = AutoConfig.from_pretrained(hf_folder).text_config
            if self.LLM_MODEL_TYPE and text_cfg.model_type != self.LLM_MODEL_TYPE:
                raise UserError(f"{hf_folder} holds a BLIP-2 with a {text_cfg.model_type!r} LLM; "
                                f"{self.arch_name()} needs {self.LLM_LABEL} (use "
                                f"{self.OTHER_ARCH_HINT})")
            # Auto classes build with from_config, model classes with _from_config
            build = getattr(llm_cls, "from_config" if llm_cls.__name__.startswith("Auto")
                            else "_from_config")
            with no_init_weights():  # every weight comes from the folder
                llm = build(text_cfg, torch_dtype=dtype)
            llm.tie_weights()  # transformers ties only when it initialises
            fallback = (self.resolve_llm_folder(llm_path, self.LLM_NAME)
                        if llm_path == TINY_LLM else llm_path)
            tok_folder = folder_tokenizer(hf_folder, self.TOKENIZER_FILES, fallback,
                                          f"{self.LLM_LABEL} tokenizer", self.LLM_NAME)
        else:
            tok_folder = self.resolve_llm_folder(llm_path, self.LLM_NAME)
            llm = self._llm_from_folder(llm_cls, tok_folder, dtype)
        self._load_tokenizer(tok_folder)
        return llm

    def _llm_from_folder(self, llm_cls: type, folder: str, dtype: torch.dtype) -> nn.Module:
        """The LLM of a plain transformers folder (subclasses adjust its config here)."""
        return llm_cls.from_pretrained(folder, torch_dtype=dtype)

    def _load_tokenizer(self, folder: str) -> None:
        """Set ``TOKENIZER_NAME`` to the tokenizer of ``folder`` (subclasses add checks)."""
        import transformers

        setattr(self, self.TOKENIZER_NAME,
                getattr(transformers, self.TOKENIZER_CLASS).from_pretrained(folder))

    @property
    def llm(self) -> nn.Module:
        return self._modules[self.LLM_NAME]  # not getattr: LLM_NAME may be this property's

    @property
    def llm_tokenizer(self):
        return getattr(self, self.TOKENIZER_NAME)

    @property
    def context_length(self) -> int:  # pragma: no cover - abstract
        """How many input positions the LLM accepts (visual prompt and prompt text included)."""
        raise NotImplementedError

    @property
    def llm_proj(self) -> nn.Linear:
        return self._modules[self.PROJ_NAME]  # not getattr: PROJ_NAME may be "llm_proj"

    def llm_load_dtype(self) -> torch.dtype:
        """The configured dtype when a GPU is visible, else fp32 (half matmuls on CPU are slow
        and, for bf16, inexact)."""
        return LLM_DTYPES[self.cfg.llm_dtype] if torch.cuda.is_available() else torch.float32

    def make_tiny_llm(self, folder: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def resolve_llm_folder(self, path: Optional[str], key: str) -> str:
        """A local LLM folder, a name already in the local transformers cache, or for ``"tiny"``
        a tiny random LLM made once in the cache folder (``$LAVIS_PLUGINS_CACHE`` or
        ``~/.cache/lavis_plugins``)."""
        if path == TINY_LLM:
            return str(self._tiny_llm_folder(f"tiny-{self.LLM_NAME.split('_')[0]}"))
        return local_hf_folder(
            path, f"model.{key} of {self.arch_name()}",
            "the LLM's config.json, weights and tokenizer (or load a transformers "
            "Blip2ForConditionalGeneration folder, which includes its LLM)")

    def _tiny_llm_folder(self, name: str) -> Path:
        import shutil
        import tempfile

        cache = Path(os.environ.get("LAVIS_PLUGINS_CACHE",
                                    Path.home() / ".cache" / "lavis_plugins"))
        folder = cache / name
        if not (folder / "config.json").is_file():
            cache.mkdir(parents=True, exist_ok=True)
            # made beside and renamed into place: concurrent ranks never read a half-made one
            tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{name}-"))
            self.make_tiny_llm(tmp)
            try:
                os.rename(tmp, folder)
            except OSError:  # another process won the race; its folder is identical (seeded)
                shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def compile_for_training(self, backend: str = "inductor") -> None:
        """``run.compile: true``: see :func:`lavis_plugins.models.compile.compile_stage2`."""
        from lavis_plugins.models.compile import compile_stage2

        compile_stage2(self, backend)

    def train(self, mode: bool = True):
        """The frozen LLM keeps eval mode when ``llm_dropout`` is false (a frozen ViT always
        does, see ``freeze_vision_encoder``)."""
        super().train(mode)
        if not self.cfg.llm_dropout:
            self.llm.eval()
        return self

    # ------------------------------------------------------------------ image -> visual prompt
    def llm_dtype(self) -> torch.dtype:
        return next(self.llm.parameters()).dtype

    def autocast(self, dtype: Optional[torch.dtype] = None):
        """Autocast on CUDA (to the LLM's dtype by default); nothing on CPU (fp32 there)."""
        import contextlib

        if self.query_tokens.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = dtype or self.llm_dtype()
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=dtype)

    def visual_prompt(self, image: torch.Tensor, texts: Optional[Sequence[str]] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images -> projected query outputs.

        Args:
            image: (B, 3, H, W).
            texts: the B texts the LLM is prompted with (question / instruction); the Q-Former
                reads them when ``qformer_text_input`` is set (needed then), else ignored.
        Returns:
            ``(inputs_llm, atts_llm)``: (B, Nq, H_llm) in the LLM's dtype and (B, Nq) ones.
        """
        return self.prompt_from_features(self.encode_image(image), texts)

    def prompt_from_features(self, image_embeds: torch.Tensor,
                             texts: Optional[Sequence[str]] = None
                             ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``visual_prompt`` from image features (B, N, Dv) (``encode_image``'s output):
        (B, Nq, H_llm) and (B, Nq) ones."""
        image_embeds = image_embeds.to(self.query_tokens.dtype)
        if self.cfg.qformer_text_input:
            ids, atts = self.qformer_tokens(texts, image_embeds.shape[0], image_embeds.device)
            query = self.query_text_output(image_embeds, ids, atts)  # (B, Nq, D)
        else:
            query = self.query_output(image_embeds)  # (B, Nq, D)
        inputs_llm = self.llm_proj(query).to(self.llm_dtype())  # (B, Nq, H_llm)
        atts = torch.ones(inputs_llm.shape[:-1], dtype=torch.long, device=inputs_llm.device)
        return inputs_llm, atts

    def qformer_tokens(self, texts: Optional[Sequence[str]], batch: int, device: torch.device
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """BERT tokens (B, T) and mask of the texts the question-aware Q-Former reads, padded to
        the longest and truncated to ``max_txt_len``."""
        if texts is None:
            raise UserError(f"{self.arch_name()} has model.qformer_text_input set: the Q-Former "
                            "reads the prompt text, but none was given for this batch")
        texts = [texts] * batch if isinstance(texts, str) else list(texts)
        if len(texts) != batch:
            raise UserError(f"{len(texts)} Q-Former texts for {batch} images")
        enc = self.tokenizer(texts, padding="longest", truncation=True,
                             max_length=self.max_txt_len, return_tensors="pt").to(device)
        return enc.input_ids, enc.attention_mask

    def training_prompts(self, samples: Dict[str, Any]) -> List[str]:
        """What the LLM is prompted with in training, for the question-aware Q-Former: each
        ``text_input`` when the batch has ``text_output`` (question -> answer), else the model's
        prompt (captions: the caption itself is the target and must not be shown)."""
        texts = as_text_list(samples.get("text_input"), "text_input")
        if samples.get("text_output") is None:
            return [self.prompt] * len(texts)
        return texts
