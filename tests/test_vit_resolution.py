"""The image encoder at another side than its built one
(``lavis_plugins/models/_vit_resolution.py``, frame selection's cheap scoring): equal to the
encoder LAVIS builds at that side from the same weights (its own ``interpolate_pos_embed``), for
EVA and CLIP encoders; the built side runs the encoder's own forward; on the CPU without
autograd, a few images per call with the same outputs."""
from __future__ import annotations

from typing import Optional

import pytest
import torch

from lavis_plugins.common.errors import UserError


def _eva(side: int, mlp_dim: Optional[int] = None):
    from lavis_plugins.models.blip2_base import LPBlip2Base, TinyVitConfig

    encoder, _ = LPBlip2Base.init_vision_encoder(
        "tiny", side, 0.0, False, "fp32", tiny=TinyVitConfig(width=32, depth=2, heads=2,
                                                             patch_size=8, mlp_dim=mlp_dim))
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


def _count_calls(monkeypatch) -> list:
    from lavis_plugins.models import _vit_resolution

    calls, real = [], _vit_resolution.forward_at_side

    def counting(encoder, image):
        calls.append(image.shape[0])
        return real(encoder, image)

    monkeypatch.setattr(_vit_resolution, "forward_at_side", counting)
    return calls


def test_a_frozen_cpu_encoder_runs_a_few_images_per_call_with_the_same_outputs(monkeypatch):
    from lavis_plugins.models import _vit_resolution

    torch.manual_seed(0)
    encoder = _eva(32)  # patch 8: 17 token rows per 32 px image, 5 per 16 px one
    image = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        whole = encoder(image)
    # the widest linear layer: qkv, 3 x 32 outputs; 17 rows x 96 x 4 bytes = 6528 per image
    monkeypatch.setattr(_vit_resolution, "CPU_ACTIVATION_BYTES", 2 * 6528 + 100)
    calls = _count_calls(monkeypatch)
    with torch.no_grad():
        chunked = _vit_resolution.forward_in_chunks(encoder, image)
        assert calls == [2, 2, 1]  # 2 images per call: 3 calls, in equal chunks of 2
        assert torch.equal(chunked, whole)
        small = torch.randn(9, 3, 16, 16)
        calls.clear()
        torch.testing.assert_close(_vit_resolution.forward_in_chunks(encoder, small),
                                   _vit_resolution.forward_at_side(encoder, small),
                                   rtol=0, atol=0)
        assert calls[:2] == [5, 4]  # 5 rows per image: 6 per call, so 2 calls, equal chunks


def test_each_encoders_widest_layer_is_found_once(monkeypatch):
    """Several chunked forwards walk an encoder's modules once; another encoder (a wider
    feed-forward) gets its own walk and width, so its chunks follow its own layers."""
    from lavis_plugins.models import _vit_resolution

    torch.manual_seed(0)
    narrow, wide = _eva(32), _eva(32, mlp_dim=192)  # widest: qkv 3 x 32 = 96; feed-forward 192
    walks = {"narrow": 0, "wide": 0}
    for name, encoder in (("narrow", narrow), ("wide", wide)):
        def counting(*args, _name=name, _real=encoder.modules, **kwargs):
            walks[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(encoder, "modules", counting)
    # 17 rows x 96 x 4 bytes = 6528 per 32 px image: 2 per call for narrow, 1 for wide (13056)
    monkeypatch.setattr(_vit_resolution, "CPU_ACTIVATION_BYTES", 2 * 6528 + 100)
    calls = _count_calls(monkeypatch)
    image = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(_vit_resolution.forward_in_chunks(narrow, image), narrow(image))
        assert walks == {"narrow": 1, "wide": 0} and calls == [2, 2] * 3
        calls.clear()
        for _ in range(3):
            assert torch.equal(_vit_resolution.forward_in_chunks(wide, image), wide(image))
        assert walks == {"narrow": 1, "wide": 1} and calls == [1] * 12
    assert (_vit_resolution.widest_linear(narrow), _vit_resolution.widest_linear(wide)) == (96, 192)
    assert walks == {"narrow": 1, "wide": 1}


def test_an_encoder_with_autograd_runs_in_one_call(monkeypatch):
    from lavis_plugins.models import _vit_resolution

    encoder = _eva(32)
    monkeypatch.setattr(_vit_resolution, "CPU_ACTIVATION_BYTES", 1)
    calls = _count_calls(monkeypatch)
    out = _vit_resolution.forward_in_chunks(encoder, torch.randn(5, 3, 32, 32))
    assert calls == [5] and out.requires_grad


def test_the_models_frozen_encoder_is_chunked_on_the_cpu(lp, tiny_bert_dir, monkeypatch):
    """Through ``load_model``: a frozen encoder's features are the one-call features, computed a
    few images per call."""
    from lavis_plugins.models import _vit_resolution

    torch.manual_seed(0)
    model = lp.load_model("lp_blip2_qformer", "tiny", bert_path=str(tiny_bert_dir)).eval()
    image = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        whole = model.ln_vision(model.visual_encoder(image))
    monkeypatch.setattr(_vit_resolution, "CPU_ACTIVATION_BYTES", 1)
    calls = _count_calls(monkeypatch)
    features = model.encode_image(image)  # frozen: no autograd even outside no_grad
    assert calls == [1] * 6
    assert torch.equal(features, whole)
