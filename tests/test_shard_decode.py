"""How shard samples are decoded (datasets/webdataset_caption.py): full decodes equal webdataset's
``pilrgb`` handler pixel for pixel; JPEGs far larger than the transform needs are decoded at a
reduced scale only when every crop the transform can take still covers its output; the
per-sample reseeding leaves the caller's RNG streams as they were."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch


def _jpeg(w: int, h: int, mode: str = "RGB") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(w * 7 + h)
    small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("RGBA", "PNG"),
                                       ("P", "PNG"), ("RGB", "WEBP")])
def test_full_decode_equals_webdatasets_pilrgb(lp, mode, fmt):
    from PIL import Image
    from webdataset.autodecode import ImageHandler

    from lavis_plugins.datasets.webdataset_caption import decode_image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
                    ).convert(mode).save(buf, format=fmt)
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
    ours = decode_image(buf.getvalue(), None)
    ref = ImageHandler("pilrgb")(ext, buf.getvalue())
    assert ours.mode == "RGB" and np.array_equal(np.asarray(ours), np.asarray(ref))
    # a reduced decode never applies to a small image (or to PNG/WebP at all)
    assert np.array_equal(np.asarray(decode_image(buf.getvalue(), 366)), np.asarray(ref))


def test_reduced_decode_keeps_at_least_min_side(lp):
    from lavis_plugins.datasets.webdataset_caption import decode_image

    assert decode_image(_jpeg(800, 760), None).size == (800, 760)
    assert decode_image(_jpeg(800, 760), 366).size == (400, 380)  # 1/2: both sides >= 366
    assert decode_image(_jpeg(800, 700), 366).size == (800, 700)  # 1/2 would give 350
    assert decode_image(_jpeg(3000, 1500), 366).size == (750, 375)  # 1/4
    assert decode_image(_jpeg(800, 760, "L"), 366).mode == "RGB"


def test_reduced_decode_side_follows_the_processor(lp):
    from lavis.processors.blip_processors import (
        Blip2ImageTrainProcessor,
        BlipCaptionProcessor,
        BlipImageEvalProcessor,
    )

    from lavis_plugins.datasets.webdataset_caption import reduced_decode_side

    assert reduced_decode_side(Blip2ImageTrainProcessor(image_size=224)) == 366
    # ceil(364 / sqrt(0.9 * 3 / 4)) = 444
    assert reduced_decode_side(Blip2ImageTrainProcessor(image_size=364, min_scale=0.9)) == 444
    assert reduced_decode_side(BlipImageEvalProcessor(image_size=64)) == 64
    assert reduced_decode_side(BlipCaptionProcessor()) is None  # unknown: decode in full
    assert reduced_decode_side(lambda im: im) is None


def test_every_crop_of_a_reduced_image_still_covers_the_output(lp):
    """The bound of reduced_decode_side: RandomResizedCrop's crops of an image whose short side
    is the returned size are at least the output size on both sides (any aspect, any draw)."""
    from lavis.processors.blip_processors import Blip2ImageTrainProcessor
    from PIL import Image

    from lavis_plugins.datasets.webdataset_caption import reduced_decode_side

    proc = Blip2ImageTrainProcessor(image_size=224)
    crop = proc.transform.transforms[0]
    side = reduced_decode_side(proc)
    torch.manual_seed(0)
    for w, h in [(side, side), (side * 3, side), (side, side * 2), (side + 7, side + 300)]:
        img = Image.new("RGB", (w, h))
        for _ in range(300):
            _, _, ch, cw = crop.get_params(img, crop.scale, crop.ratio)
            assert min(ch, cw) >= 224 - 1, (w, h, ch, cw)  # get_params rounds to a pixel


def test_iterating_shards_leaves_the_callers_rng_streams_alone(lp, tmp_path):
    """In the main process (num_workers 0) the per-sample seeding is undone once per batch."""
    import torchvision.transforms as T
    import webdataset as wds

    from lavis_plugins.datasets.shard_plan import load_shard_set
    from lavis_plugins.datasets.webdataset_caption import ShardCaptionDataset

    path = tmp_path / "s-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(8):
            sink.write({"__key__": f"k{i}", "jpg": _jpeg(40, 40), "txt": f"caption {i}"})
    ds = ShardCaptionDataset(load_shard_set([str(path)], "t"),
                             T.Compose([T.RandomResizedCrop(16), T.ToTensor()]), None,
                             shuffle_buffer=4)
    ds.configure(seed=1, rank=0, world_size=1, batch_size=4, num_workers=0)

    def draws():
        return torch.rand(3).tolist(), random.random(), np.random.rand()

    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expected = draws()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    assert len(list(ds)) == 2
    assert draws() == expected


def test_a_truncated_jpeg_is_an_error_not_grey_rows(lp):
    """LAVIS turns on PIL's LOAD_TRUNCATED_IMAGES when imported (``lp`` imports it), which would
    decode a cut JPEG silently with its missing rows grey; a shard's sample must fail instead
    (the dataset counts it as bad), and the global setting is left as it was."""
    from PIL import ImageFile

    from lavis_plugins.datasets.webdataset_caption import decode_image

    data = _jpeg(64, 48)
    assert ImageFile.LOAD_TRUNCATED_IMAGES  # as LAVIS leaves it
    decode_image(data, None)  # the whole file decodes
    with pytest.raises(OSError, match="truncated"):
        decode_image(data[: len(data) // 2], None)
    assert ImageFile.LOAD_TRUNCATED_IMAGES
