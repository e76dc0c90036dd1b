"""lp_video_eval / lp_video_train: registration, options, shapes, and equality with the image
path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from lavis_plugins.common.errors import UserError
from lavis_plugins.video import synthetic
from lavis_plugins.video.decode import VideoDecodeError


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("proc_videos")
    return {
        "one": synthetic.write_video(d / "one.mp4", 1),
        "clip": synthetic.write_video(d / "clip.mp4", 24),
    }


def first_frame_as_pil(path) -> Image.Image:
    """The video's first frame decoded independently of our code (plain PyAV)."""
    import av

    with av.open(str(path)) as c:
        return next(c.decode(video=0)).to_image()


def all_frames(path) -> list:
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def build(name: str, **options):
    from lavis.common.registry import registry

    cls = registry.get_processor_class(name)
    assert cls is not None, f"{name} is not registered"
    return cls.from_config(OmegaConf.create({"name": name, **options}))


def test_registered_with_sampling_defaults(lp):
    assert build("lp_video_eval").cfg.sampling == "uniform"
    train = build("lp_video_train")
    assert (train.cfg.sampling == "random"
            and (train.cfg.min_scale, train.cfg.max_scale) == (0.5, 1.0))


def test_unknown_or_invalid_options_are_refused(lp):
    with pytest.raises(UserError, match="Did you mean: n_frms"):
        build("lp_video_eval", n_frames=4)
    with pytest.raises(UserError, match="n_frms"):
        build("lp_video_eval", n_frms=0)
    with pytest.raises(UserError, match="backend"):
        build("lp_video_eval", backend="opencv")
    with pytest.raises(UserError, match="min_scale"):
        build("lp_video_train", min_scale=0.9, max_scale=0.5)
    with pytest.raises(UserError, match="threads=-1 must be an integer >= 0"):
        build("lp_video_eval", threads=-1)


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_decoder_threads_change_nothing_but_speed(lp, clips, backend):
    outs = [build("lp_video_eval", n_frms=5, image_size=32, backend=backend, threads=t)(
        str(clips["clip"])) for t in (0, 1, 2)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("name", ["lp_video_eval", "lp_video_train"])
@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_output_is_c_t_h_w(lp, clips, name, backend):
    proc = build(name, n_frms=5, image_size=32, backend=backend)
    out = proc(str(clips["clip"]))
    assert out.shape == (3, 5, 32, 32) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_one_frame_video_equals_blip_image_eval(lp, clips):
    from lavis.processors.blip_processors import BlipImageEvalProcessor

    image = BlipImageEvalProcessor(image_size=48)(first_frame_as_pil(clips["one"]))  # (C, H, W)
    video = build("lp_video_eval", n_frms=1, image_size=48)(str(clips["one"]))  # (C, 1, H, W)
    assert torch.equal(video[:, 0], image)


def test_one_frame_video_equals_blip2_image_train(lp, clips):
    from lavis.processors.blip_processors import Blip2ImageTrainProcessor

    pil = first_frame_as_pil(clips["one"])
    image_proc = Blip2ImageTrainProcessor(image_size=40)
    video_proc = build("lp_video_train", n_frms=1, image_size=40)
    for seed in range(4):  # crops and flips differ between seeds; equal for the same seed
        torch.manual_seed(seed)
        image = image_proc(pil)
        torch.manual_seed(seed)
        video = video_proc(str(clips["one"]))
        assert torch.equal(video[:, 0], image)


def test_eval_frames_equal_the_image_path_frame_by_frame(lp, clips):
    from lavis.processors.blip_processors import BlipImageEvalProcessor

    proc = build("lp_video_eval", n_frms=4, image_size=32, mean=[0.5, 0.5, 0.5],
                 std=[0.25, 0.25, 0.25])
    frames, indices = proc.load(str(clips["clip"]))
    out = proc(frames)
    ref = all_frames(clips["clip"])
    image_proc = BlipImageEvalProcessor(image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    for t, i in enumerate(indices):
        assert torch.equal(out[:, t], image_proc(Image.fromarray(ref[i])))


def test_train_uses_one_crop_and_flip_per_video(lp):
    proc = build("lp_video_train", n_frms=3, image_size=24)
    rng = np.random.default_rng(0)
    frame = torch.from_numpy(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    outs = []
    for seed in range(6):
        torch.manual_seed(seed)
        out = proc(frame.expand(3, -1, -1, -1).contiguous())  # 3 identical frames
        assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
        outs.append(out[:, 0])
    assert any(not torch.equal(outs[0], o) for o in outs[1:])  # but crops vary across videos


def test_bad_video_raises_named_error(lp, tmp_path):
    proc = build("lp_video_eval", n_frms=2)
    with pytest.raises(VideoDecodeError) as e:
        proc(str(tmp_path / "missing.mp4"))
    assert e.value.kind == "missing" and "missing.mp4" in str(e.value)
    with pytest.raises(UserError, match=r"\(T, H, W, 3\) uint8"):
        proc(torch.zeros(2, 8, 8, 3))


def test_frame_cache_decodes_each_video_once_per_n_frms(lp, clips, tmp_path, monkeypatch):
    """frame_cache: the second read of a video comes from the cache (no decoding) with the same
    frames; another n_frms, or a changed file, is a new entry; an unreadable entry is decoded
    again; the processor's tensor is the same with and without the cache."""
    import os
    import shutil

    from lavis_plugins.processors import video_processors

    calls = []
    real = video_processors.read_frames

    def counting(*a, **k):
        calls.append(a[:2])
        return real(*a, **k)

    monkeypatch.setattr(video_processors, "read_frames", counting)
    video = tmp_path / "clip.mp4"
    shutil.copy(clips["clip"], video)
    cache = tmp_path / "frames"
    plain = build("lp_video_eval", n_frms=4, image_size=32)
    cached = build("lp_video_eval", n_frms=4, image_size=32, frame_cache=str(cache))
    want_frames, want_idx = plain.load(str(video))
    for _ in range(3):
        frames, idx = cached.load(str(video))
        assert torch.equal(frames, want_frames) and idx == want_idx
    assert len(calls) == 2  # plain once, cached once
    assert torch.equal(cached(str(video)), plain(str(video)))
    assert len(calls) == 3  # only the plain processor decoded again
    build("lp_video_eval", n_frms=2, image_size=32, frame_cache=str(cache)).load(str(video))
    assert len(calls) == 4 and len(list(cache.glob("*.npz"))) == 2  # one entry per n_frms
    (entry,) = [p for p in cache.glob("*.npz")
                if p == cached._frame_cache.entry(str(video))]
    entry.write_bytes(b"not an npz")  # e.g. a kill mid-write by another tool
    frames, _ = cached.load(str(video))
    assert torch.equal(frames, want_frames) and len(calls) == 5
    os.utime(video, ns=(1, 1))  # the file changed: a new entry, decoded
    cached.load(str(video))
    assert len(calls) == 6
    assert not list(cache.glob(".tmp-*"))


def test_frame_cache_bad_settings_are_refused(lp, tmp_path):
    with pytest.raises(UserError, match="frame_cache needs deterministic sampling"):
        build("lp_video_train", frame_cache=str(tmp_path))  # random sampling
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="frame_cache .* is a file, not a folder"):
        build("lp_video_eval", frame_cache=str(tmp_path / "f"))
    with pytest.raises(UserError, match="frame_cache=3 must be a folder path"):
        build("lp_video_eval", frame_cache=3)
