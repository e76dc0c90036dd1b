"""LAVIS's other names for the stage-1 model, so LAVIS client code ports by renaming the model.

LAVIS registers its stage-1 ``Blip2Qformer`` three times: ``blip2`` (training),
``blip2_feature_extractor`` (``extract_features``) and ``blip2_image_text_matching``
(``model(samples, match_head="itm" | "itc")``). Their plugin counterparts are
``lp_blip2_qformer``, ``lp_blip2_feature_extractor`` and ``lp_blip2_image_text_matching``: the
same class, model types, weights and checkpoints under the names LAVIS client code uses.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from lavis.common.registry import registry
from torch import Tensor

from lavis_plugins.common.errors import UserError
from lavis_plugins.models.blip2_qformer import LPBlip2Qformer

MATCH_HEADS = ("itm", "itc")


@torch.no_grad()
def match_pairs(model: LPBlip2Qformer, samples: Mapping[str, Any], match_head: str) -> Tensor:
    """Score image-text pairs as LAVIS's ``Blip2ITM.forward`` does.

    Args:
        model: a stage-1 model.
        samples: ``image`` (B, 3, H, W) and ``text_input`` (one caption or B captions; a single
            image is paired with each of several captions).
        match_head: "itm": matching logits (B, 2), index 1 = matched (softmax them for a
            probability); "itc": cosine similarity of the text [CLS] feature and the closest
            query feature, (B, 1).
    """
    if match_head not in MATCH_HEADS:
        raise UserError(f"match_head {match_head!r}: choose one of {list(MATCH_HEADS)}")
    if samples.get("image") is None or samples.get("text_input") is None:
        raise UserError("match_head scoring needs samples['image'] and samples['text_input']")
    text = model.tokenize(samples["text_input"], samples)
    image_embeds = model.encode_image(samples["image"])  # (B, N, Dv)
    n_img, n_txt = image_embeds.shape[0], text.input_ids.shape[0]
    if n_img == 1 and n_txt > 1:  # one image against several captions
        image_embeds = image_embeds.expand(n_txt, -1, -1)
    elif n_img != n_txt:
        raise UserError(f"{n_img} images but {n_txt} captions: give one caption per image, or "
                        "one image and several captions")
    if match_head == "itm":
        return model.itm_logits(image_embeds, text.input_ids, text.attention_mask)
    image_feats = F.normalize(model.vision_proj(model.query_output(image_embeds)), dim=-1)
    text_feat = F.normalize(model.text_proj(model.forward_text(text)), dim=-1)  # (B, E)
    return torch.bmm(image_feats, text_feat.unsqueeze(-1)).max(dim=1).values  # (B, 1)


@registry.register_model("lp_blip2_feature_extractor")
class LPBlip2FeatureExtractor(LPBlip2Qformer):
    """``blip2_feature_extractor``'s counterpart: ``extract_features(samples, mode)``."""


@registry.register_model("lp_blip2_image_text_matching")
class LPBlip2ImageTextMatching(LPBlip2Qformer):
    """``blip2_image_text_matching``'s counterpart: ``model(samples)`` scores the pairs."""

    def forward(self, samples: Mapping[str, Any], match_head: str = "itm") -> Tensor:
        return match_pairs(self, samples, match_head)
