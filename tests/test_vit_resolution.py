"""The image encoder at another side than its built one (``lavis_plugins/models/_vit_resolution.py``,
frame selection's cheap scoring): equal to the encoder LAVIS builds at that side from the same
weights (its own ``interpolate_pos_embed``), for EVA and CLIP encoders; the built side runs the
encoder's own forward."""
from __future__ import annotations

import pytest
import torch

from lavis_plugins.common.errors import UserError


def _eva(side: int):
    from lavis_plugins.models.blip2_base import LPBlip2Base, TinyVitConfig

    encoder, _ = LPBlip2Base.init_vision_encoder(
        "tiny", side, 0.0, False, "fp32", tiny=TinyVitConfig(width=32, depth=2, heads=2,
                                                             patch_size=8))
    return encoder.eval()


def _clip(side: int):
    from lavis.models.clip_vit import VisionTransformer

    return VisionTransformer(input_resolution=side, patch_size=8, width=32, layers=3, heads=2,
                             use_grad_checkpointing=False).eval()


@pytest.mark.parametrize("kind", ["eva", "clip"])
@pytest.mark.parametrize("small", [16, 24])
def test_a_smaller_side_equals_lavis_building_the_encoder_at_that_side(kind, small):
    from lavis.models import clip_vit, eva_vit

    from lavis_plugins.models._vit_resolution import forward_at_side

    build = _eva if kind == "eva" else _clip
    torch.manual_seed(0)
    full = build(32)
    state = full.state_dict()
    reference = build(small)
    (eva_vit if kind == "eva" else clip_vit).interpolate_pos_embed(reference, state)
    reference.load_state_dict(state)
    image = torch.randn(3, 3, small, small)
    with torch.no_grad():
        torch.testing.assert_close(forward_at_side(full, image), reference(image),
                                   rtol=1e-5, atol=1e-5)
        at_built = torch.randn(2, 3, 32, 32)
        assert torch.equal(forward_at_side(full, at_built), full(at_built))


def test_sides_that_do_not_fit_the_patches_are_refused():
    from lavis_plugins.models._vit_resolution import forward_at_side

    encoder = _eva(32)
    with pytest.raises(UserError, match="multiple of the encoder's patch size 8"):
        forward_at_side(encoder, torch.zeros(1, 3, 20, 20))
    with pytest.raises(UserError, match="square"):
        forward_at_side(encoder, torch.zeros(1, 3, 16, 24))
