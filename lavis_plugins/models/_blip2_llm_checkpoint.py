"""Checkpoint loading of the stage-2 models (:class:`Blip2LLMBase`): LAVIS ``.pth`` files,
stage-1 files and transformers ``Blip2ForConditionalGeneration`` folders, each load checked.

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
from typing import TYPE_CHECKING, Dict, Iterable

import torch

from lavis_plugins.common.errors import UserError
from lavis_plugins.common.local_files import check_checkpoint_source, is_url, local_checkpoint
from lavis_plugins.common.safe_load import load_weights, state_dict_of
from lavis_plugins.models.arch_check import describe_mismatch, mismatch_message
from lavis_plugins.models.hf_format import (
    apply_folder_sizes,
    folder_model_type,
    hf_to_lavis_state_dict,
    read_config,
    read_hf_state_dict,
)

if TYPE_CHECKING:  # the class this mixin serves (it imports this module)
    from lavis_plugins.models._blip2_llm import Blip2LLMBase

logger = logging.getLogger(__name__)


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

class Blip2LLMCheckpoints:
    """Checkpoint loading, mixed into :class:`~lavis_plugins.models._blip2_llm.Blip2LLMBase`
    (which supplies ``CONFIG_CLASS``, ``PROJ_NAME``, ``LLM_NAME``, ``HF_MODEL_TYPES``, ``cfg``,
    ``llm_proj`` and the module's ``state_dict``)."""

    def _unused_key(self, key: str) -> bool:
        """Checkpoint keys this model has no module for (dropped before loading)."""
        return bool(_STAGE1_HEADS.match(key) or (
            not self.cfg.qformer_text_input and _QFORMER_TEXT_BRANCH.match(key)))


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
