"""What BLIP-2's two stage-2 models share: frozen image encoder -> Q-Former -> linear projection ->
soft visual prompt for a frozen LLM, their config, and checkpoint loading.

``lp_blip2_opt`` (decoder-only LLM) and ``lp_blip2_t5`` (encoder-decoder LLM) subclass
:class:`Blip2LLMBase`; they differ in how text is fed and scored. The LLMs are transformers' own
``OPTForCausalLM`` / ``T5ForConditionalGeneration`` (LAVIS vendors old copies of both), loaded
from a local folder, frozen, and kept in fp16/bf16 on GPU (fp32 when no GPU is visible).

Checkpoints, in the state-dict names of LAVIS's ``blip2_opt`` / ``blip2_t5`` (``Qformer.*``,
``query_tokens``, ``opt_proj.*``/``t5_proj.*``, ``ln_vision.*``, ``visual_encoder.*``,
``opt_model.*``/``t5_model.*``):
- ``stage1_checkpoint``: a stage-1 (``blip2`` / ``lp_blip2``) ``.pth``; initialises the Q-Former,
  the query tokens and ``ln_vision`` (and the ViT when the file has it); the stage-1 text branch
  (LM head, word/position embeddings, text FFNs, ITC/ITM heads) is dropped, as stage 2 has none.
- ``pretrained`` / ``finetuned`` (LAVIS's keys): a LAVIS ``.pth`` (file or URL), loaded as it is, or
  a transformers ``Blip2ForConditionalGeneration`` folder (``config.json`` + weights), converted by
  :func:`hf_to_lavis_state_dict`. A transformers folder also supplies the LLM (architecture from
  its ``text_config``, weights, and its tokenizer when it has one).
Every load checks what it loaded: keys the model does not have and missing trainable weights are
errors, frozen parts the file lacks (the LLM, the ViT in LAVIS's released files) are logged.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers.utils import ModelOutput

from lavis_plugins.common.errors import UserError
from lavis_plugins.common.local_files import (
    check_checkpoint_source,
    is_url,
    local_checkpoint,
    local_hf_folder,
)
from lavis_plugins.common.safe_load import load_weights, state_dict_of
from lavis_plugins.models.arch_check import describe_mismatch, mismatch_message
from lavis_plugins.models.blip2_base import VIT_MODELS, LPBlip2Base, TinyVitConfig
from lavis_plugins.models.blip2_qformer import init_vision_and_qformer
from lavis_plugins.models.hf_format import (
    apply_folder_sizes,
    folder_model_type,
    folder_tokenizer,
    hf_to_lavis_state_dict,
    qformer_bert_config,
    read_config,
    read_hf_state_dict,
)

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


def load_pth(url_or_path: str) -> Dict[str, torch.Tensor]:
    """The ``model`` state dict of a LAVIS-format checkpoint (a local file; a URL only when the
    user allowed downloads, see :mod:`lavis_plugins.common.local_files`)."""
    if is_url(url_or_path):
        url_or_path = local_checkpoint(url_or_path, "pretrained")
    if not os.path.isfile(url_or_path):
        raise UserError(f"checkpoint not found: {url_or_path}. Give a LAVIS .pth file, a URL, or "
                        "a transformers Blip2ForConditionalGeneration folder")
    # weights-only: a downloaded file must not run code (lavis_plugins.common.safe_load)
    return state_dict_of(load_weights(url_or_path, "checkpoint"), url_or_path, "checkpoint")


# stage-1 keys that no stage-2 model has a module for: the LM head, the ITC/ITM heads and the
# momentum (EMA) model of the momentum_distill option
_STAGE1_HEADS = re.compile(
    r"^(Qformer\.cls\.|vision_proj\.|text_proj\.|itm_head\.|temp$|momentum_model\.)")
# the Q-Former's text branch, which stage 2 keeps only with qformer_text_input
_QFORMER_TEXT_BRANCH = re.compile(
    r"^Qformer\.bert\.(embeddings\.(word_embeddings|position_embeddings)\.|"
    r"encoder\.layer\.\d+\.(intermediate|output)\.)")


class Blip2LLMBase(LPBlip2Base):
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

    def _unused_key(self, key: str) -> bool:
        """Checkpoint keys this model has no module for (dropped before loading)."""
        return bool(_STAGE1_HEADS.match(key) or (
            not self.cfg.qformer_text_input and _QFORMER_TEXT_BRANCH.match(key)))

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_config(cls, cfg) -> "Blip2LLMBase":
        arch = cls.arch_name()
        mcfg = cls.CONFIG_CLASS.from_cfg(cfg, arch)
        path = mcfg.finetuned if mcfg.load_finetuned else (
            mcfg.pretrained if mcfg.load_pretrained else None)
        if mcfg.load_finetuned and not mcfg.finetuned:
            raise UserError(f"model.load_finetuned is true but model.finetuned is not set ({arch})")
        folder_type = folder_model_type(path)
        hf_folder = path if folder_type in cls.HF_MODEL_TYPES else None
        if path and os.path.isdir(path) and hf_folder is None:
            raise UserError(f"{path} is a folder but not one {arch} loads (config.json with "
                            f"model_type in {list(cls.HF_MODEL_TYPES)}; it has {folder_type!r}); "
                            "give a LAVIS .pth or such a transformers folder")
        # a URL or a missing file is refused before the encoders and the LLM are built (seconds)
        check_checkpoint_source(path, "finetuned" if mcfg.load_finetuned else "pretrained")
        check_checkpoint_source(mcfg.stage1_checkpoint, "stage1_checkpoint")
        if hf_folder is not None:  # every size comes from the folder's config.json
            mcfg = apply_folder_sizes(mcfg, hf_folder)
            if mcfg.qformer_text_input and folder_type == "blip-2" and not read_config(
                    hf_folder)["qformer_config"].get("use_qformer_text_input"):
                raise UserError(f"model.qformer_text_input is set, but {hf_folder} holds no "
                                "Q-Former text branch (its qformer_config has no "
                                "use_qformer_text_input); load it without qformer_text_input, "
                                "or load an InstructBLIP folder")
        model = cls(dataclasses.replace(mcfg, vit_precision="fp32"), hf_folder=hf_folder)
        if mcfg.stage1_checkpoint:
            model.load_stage1(mcfg.stage1_checkpoint)
        if path:
            if hf_folder:
                model.load_hf_blip2(hf_folder)
            else:
                model.load_lavis(path)
        model.cast_vision_encoder(mcfg.vit_precision)  # after loading: see its docstring
        return model

    def load_checkpoint_from_config(self, cfg, **kwargs) -> None:
        """LAVIS's hook (used by some LAVIS code paths): load ``finetuned``/``pretrained``."""
        mcfg = self.CONFIG_CLASS.from_cfg(cfg, self.arch_name())
        path = mcfg.finetuned if mcfg.load_finetuned else mcfg.pretrained
        if path:
            self.load_checkpoint(path)

    def load_checkpoint(self, url_or_filename: str) -> None:
        """What LAVIS's ``lavis.models.load_model(..., checkpoint=X)`` calls: the same checked
        loading as ``pretrained`` (LAVIS's own loads anything with strict=False, so a stage-1
        file would load silently and leave the projection random)."""
        if folder_model_type(url_or_filename) in self.HF_MODEL_TYPES:
            self.load_hf_blip2(url_or_filename)
        else:
            self.load_lavis(url_or_filename)

    def load_stage1(self, url_or_path: str) -> None:
        """Initialise Q-Former, query tokens, ``ln_vision`` (and the ViT if present) from a
        stage-1 checkpoint; everything stage 2 has no module for is dropped."""
        state = {k: v for k, v in load_pth(url_or_path).items() if not self._unused_key(k)}
        keep = ("Qformer.", "query_tokens", "ln_vision.", "visual_encoder.")
        extra = sorted(k for k in state if not k.startswith(keep))
        if extra:
            raise UserError(f"stage1_checkpoint {url_or_path} has weights a BLIP-2 stage-1 model "
                            f"does not: {extra[:8]}. Is it a stage-1 (blip2 / lp_blip2) file?")
        self._load_checked(state, url_or_path, required=("Qformer.", "query_tokens"))

    def load_lavis(self, url_or_path: str) -> None:
        """Load a LAVIS ``blip2_opt``/``blip2_t5`` (or this plugin's) ``.pth`` as it is."""
        state = {k: v for k, v in load_pth(url_or_path).items() if not self._unused_key(k)}
        self._check_projection(state, url_or_path)
        self._load_checked(state, url_or_path,
                           required=("Qformer.", "query_tokens", self.PROJ_NAME + "."))

    def load_hf_blip2(self, folder: str) -> None:
        """Load a transformers ``Blip2ForConditionalGeneration`` folder (weights renamed); the
        model must have been built at the folder's sizes (``from_config`` does that). Every
        weight the model has must be in the folder."""
        state = hf_to_lavis_state_dict(read_hf_state_dict(folder), self.PROJ_NAME, self.LLM_NAME)
        state = {k: v for k, v in state.items() if not self._unused_key(k)}
        self._check_projection(state, folder)
        self._load_checked(state, folder, required=(
            "Qformer.", "query_tokens", self.PROJ_NAME + ".", self.LLM_NAME + ".",
            "visual_encoder.", "ln_vision."))

    def _check_projection(self, state: Dict[str, torch.Tensor], source: str) -> None:
        w = state.get(self.PROJ_NAME + ".weight")
        if w is None:
            return
        ours = self.llm_proj.weight
        if w.shape[0] != ours.shape[0]:
            raise UserError(
                f"{source}: its {self.PROJ_NAME} maps to an LLM of width {w.shape[0]}, but the "
                f"LLM folder loaded (model.{self.LLM_NAME}) has hidden size {ours.shape[0]}. "
                f"Point model.{self.LLM_NAME} at the LLM this checkpoint was trained with.")
        if w.shape[1] != ours.shape[1]:
            raise UserError(
                f"{source}: its {self.PROJ_NAME} reads Q-Former outputs of width {w.shape[1]}, "
                f"this model's Q-Former has width {ours.shape[1]} (from model.bert_path).")

    def _load_checked(self, state: Dict[str, torch.Tensor], source: str,
                      required: Iterable[str]) -> None:
        """``load_state_dict`` that fails on unknown keys, wrong shapes, and missing keys under
        ``required`` prefixes; missing frozen parts are logged."""
        own = self.state_dict()
        unknown = sorted(k for k in state if k not in own)
        bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
               if k in own and tuple(v.shape) != tuple(own[k].shape)]
        differs = describe_mismatch(state, own, self.vit_setting()) if unknown or bad else []
        if differs:  # name the setting, not the tensor
            raise UserError(mismatch_message(source, differs, ""))
        if unknown:
            raise UserError(f"{source}: {len(unknown)} weight(s) this model does not have, e.g. "
                            f"{unknown[:6]}. Is it a checkpoint of {type(self).__name__}'s "
                            "architecture?")
        if bad:
            raise UserError(f"{source}: weight shapes differ from this model's (name, file, "
                            f"model): {bad[:6]}. Check vit_model, bert_path, num_query_token.")
        required = tuple(required)
        params = {k for k, _ in self.named_parameters()}  # buffers (position_ids) not required
        # the text branch of a question-aware Q-Former may come from BERT or a stage-1 file
        missing_required = sorted(k for k in params if k.startswith(required) and k not in state
                                  and not _QFORMER_TEXT_BRANCH.match(k))
        if missing_required:
            raise UserError(f"{source}: lacks {len(missing_required)} weight(s) it must provide, "
                            f"e.g. {missing_required[:6]}")
        self.load_state_dict(state, strict=False)
        absent = sorted({k.split(".")[0] for k in own if k not in state})
        logger.info("loaded %d tensors from %s; kept as built (not in the file): %s",
                    len(state), source, absent or "nothing")

    # ------------------------------------------------------------------ prompts
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
        with self.autocast():
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
        the same method where LAVIS has one, else the paper's ``VQA_PROMPT``); ``inference_method`` "generate" runs beam search, "rank" picks from
        ``answer_list`` (see rank_answers).
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
