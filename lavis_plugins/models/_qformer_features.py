"""Stage-1 Q-Former inference: image and text features, ITM scores and retrieval scores.

A mixin of :class:`~lavis_plugins.models.blip2_qformer.LPBlip2Qformer` (which holds the config,
the training step and the losses); it reads the model's ``Qformer``, ``itm_head``, projections
and tokenizer.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from lavis.models.blip_models.blip_outputs import BlipOutputFeatures
from torch import Tensor

from lavis_plugins.common.errors import UserError
from lavis_plugins.models.qformer import ImageKV, padding_mask


class QformerFeaturesMixin:
    """``forward_image``, ``forward_text``, ``itm_logits``, ``compute_itm``,
    ``compute_sim_matrix`` and LAVIS's ``extract_features``."""

    def forward_image(self, image: Tensor) -> Tuple[Tensor, Tensor]:
        """(B, 3, H, W) -> query last hidden state (B, Nq, D) and image features (B, N, Dv)."""
        image_embeds = self.encode_image(image)
        return self.query_output(image_embeds), image_embeds

    def forward_text(self, text_tokens) -> Tensor:
        """Tokenized text -> [CLS] last hidden state (B, D)."""
        hidden, _ = self.Qformer.bert(input_ids=text_tokens.input_ids,
                                      attention_mask=padding_mask(text_tokens.attention_mask),
                                      last_rows=1)
        return hidden[:, 0]

    def itm_logits(self, image_embeds: Tensor, text_ids: Tensor, text_atts: Tensor,
                   image_kv: Optional[ImageKV] = None) -> Tensor:
        """Matching logits (B, 2) (index 1: matched) for image features (B, N, Dv) and text
        (B, T): the ITM head on each query output, averaged over the queries."""
        return self.itm_head(
            self.query_text_output(image_embeds, text_ids, text_atts, image_kv)).mean(1)

    def compute_itm(self, image_inputs: Tensor, text_ids: Tensor, text_atts: Tensor) -> Tensor:
        """LAVIS's ITM score: the matched logit averaged over the queries, (B,)."""
        return self.itm_logits(image_inputs, text_ids, text_atts)[:, 1]

    def compute_sim_matrix(self, data_loader, task_cfg: Optional[Mapping[str, Any]] = None):
        """Retrieval scores ``(score_i2t, score_t2i)`` as LAVIS's ``retrieval`` task asks for;
        see :func:`lavis_plugins.tasks.retrieval.compute_retrieval_scores`."""
        from lavis_plugins.tasks.retrieval import DEFAULT_K_TEST, compute_retrieval_scores

        return compute_retrieval_scores(self, data_loader,
                                        int((task_cfg or {}).get("k_test", DEFAULT_K_TEST)))

    @torch.no_grad()
    def extract_features(self, samples: Mapping[str, Any], mode: str = "multimodal"
                         ) -> BlipOutputFeatures:
        """LAVIS's features, same fields and shapes.

        mode "image": image_embeds (B, Nq, D) query outputs, image_embeds_proj (B, Nq, E)
        normalised; "text": text_embeds (B, T, D), text_embeds_proj (B, T, E) normalised;
        "multimodal": multimodal_embeds (B, Nq, D), query outputs of the image-grounded pass.
        T is the longest text's token count: as LAVIS's ``Blip2Qformer.extract_features``, texts
        are not truncated to ``max_txt_len`` here (training truncates them).
        """
        if mode not in ("image", "text", "multimodal"):
            raise UserError(f"extract_features mode {mode!r}: choose image, text or multimodal")
        image, caption = samples.get("image"), samples.get("text_input")
        if mode in ("image", "multimodal") and image is None:
            raise UserError(f"extract_features mode {mode!r} needs samples['image']")
        if mode in ("text", "multimodal") and caption is None:
            raise UserError(f"extract_features mode {mode!r} needs samples['text_input']")
        out = {}
        if mode == "image":
            hidden = self.query_output(self.encode_image(image))
            out.update(image_embeds=hidden,
                       image_embeds_proj=F.normalize(self.vision_proj(hidden), dim=-1))
        elif mode == "text":
            text = self.tokenize(caption, samples, truncate=False)
            hidden, _ = self.Qformer.bert(input_ids=text.input_ids,
                                          attention_mask=padding_mask(text.attention_mask))
            out.update(text_embeds=hidden,
                       text_embeds_proj=F.normalize(self.text_proj(hidden), dim=-1))
        else:
            text = self.tokenize(caption, samples, truncate=False)
            out.update(multimodal_embeds=self.query_text_output(
                self.encode_image(image), text.input_ids, text.attention_mask))
        return BlipOutputFeatures(**out)
