"""Loading LAVIS-format stage-1 checkpoints into the Q-Former model, with checks that name
what does not fit.

A mixin of :class:`~lavis_plugins.models.blip2_qformer.LPBlip2Qformer`, which sets
``TRAINED_PREFIXES`` (the weights a stage-1 checkpoint must hold).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

from torch import Tensor

from lavis_plugins.common.errors import UserError
from lavis_plugins.common.local_files import local_checkpoint
from lavis_plugins.common.safe_load import load_weights, state_dict_of
from lavis_plugins.models.arch_check import describe_mismatch, mismatch_message

logger = logging.getLogger(__name__)


class QformerCheckpointMixin:
    """``load_checkpoint`` (also LAVIS's ``load_from_pretrained``), ``load_checked_state`` and
    ``load_checkpoint_from_config``."""

    def load_checkpoint(self, url_or_filename: str):
        """Load a LAVIS-format checkpoint ({"model": state_dict} or a state dict) by name.

        Keys absent from the file (e.g. the image encoder, which a LAVIS run does not save when
        frozen) and keys the model lacks are logged. A file without the trained stage-1 weights
        (``TRAINED_PREFIXES``) or with differently shaped ones is another model: ``UserError``.
        """
        path = local_checkpoint(url_or_filename, "pretrained")
        # weights-only: a downloaded file must not run code (lavis_plugins.common.safe_load)
        state = state_dict_of(load_weights(path, "checkpoint"), path, "checkpoint")
        return self.load_checked_state(state, path)

    def load_checked_state(self, state: Mapping[str, Tensor], path: str):
        """``load_checkpoint``'s checks and load, of a state dict already read from ``path``
        (named in the messages)."""
        own = self.state_dict()
        wrong_shape = [f"{k} {tuple(state[k].shape)} (model: {tuple(own[k].shape)})"
                       for k in state if k in own and state[k].shape != own[k].shape]
        absent = [k for k, _ in self.named_parameters()
                  if k.startswith(self.TRAINED_PREFIXES) and k not in state]
        # trained weights the model has no place for would be dropped: another architecture
        dropped = [k for k in state if k not in own and k.startswith(self.TRAINED_PREFIXES)]
        if wrong_shape or absent or dropped:
            differs = describe_mismatch(state, own, self.vit_setting())
            if differs:
                raise UserError(mismatch_message(f"checkpoint {path!r}", differs, ""))
        if dropped:
            raise UserError(f"checkpoint {path!r} holds {len(dropped)} trained weight(s) "
                            f"lp_blip2_qformer with this config has no place for (e.g. "
                            f"{dropped[:3]}); loading would drop them. Build the model with the "
                            "settings the checkpoint was trained with.")
        if wrong_shape or absent:
            raise UserError(
                f"checkpoint {path!r} does not fit lp_blip2_qformer with this config: "
                + (f"{len(absent)} trained weights missing (e.g. {absent[:3]}); " if absent else "")
                + (f"{len(wrong_shape)} with other shapes (e.g. {wrong_shape[:3]})"
                   if wrong_shape else "")
                + ". Is it a stage-1 (blip2 / blip2_feature_extractor) checkpoint of the same "
                  "sizes (num_query_token, embed_dim, BERT)?")
        msg = self.load_state_dict(state, strict=False)
        if msg.missing_keys:
            logger.info("checkpoint %s: %d keys not in the file, kept as built (e.g. %s)", path,
                        len(msg.missing_keys), msg.missing_keys[:3])
        if msg.unexpected_keys:
            logger.warning("checkpoint %s: %d unexpected keys ignored: %s", path,
                           len(msg.unexpected_keys), msg.unexpected_keys[:10])
        logger.info("loaded checkpoint %s", path)
        return msg

    load_from_pretrained = load_checkpoint  # what LAVIS calls for `pretrained`

    def load_checkpoint_from_config(self, cfg: Mapping[str, Any], **kwargs) -> None:
        """LAVIS's keys: ``load_finetuned`` + ``finetuned``, else ``load_pretrained`` +
        ``pretrained``; a flag set without its path is a ``UserError``."""
        for flag, key in (("load_finetuned", "finetuned"), ("load_pretrained", "pretrained")):
            if cfg.get(flag, False):
                if not cfg.get(key):
                    raise UserError(f"model.{flag} is true but model.{key} is empty: give a "
                                    "local checkpoint path")
                self.load_checkpoint(cfg[key])
                return
