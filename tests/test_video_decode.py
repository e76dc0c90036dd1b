"""Frame sampling and decoding on tiny H.264 videos the tests encode (frame i shows its index).

Videos: 64x48, at most 40 frames, libx264 with B-frames and a keyframe every 10 frames, written
once per session. Every decoding test checks which frame came back (the grey band encodes the
index) and that colours are RGB.
"""
from __future__ import annotations

import faulthandler
import random

import torch

import numpy as np
import pytest

from lavis_plugins.common.errors import UserError
from lavis_plugins.video import synthetic
from lavis_plugins.video.decode import (
    BACKENDS,
    STRATEGIES,
    VideoDecodeError,
    probe,
    read_frames,
    sample_indices,
)

N = 40  # frames in the main test video


from lavis_plugins.video.torchcodec_backend import torchcodec_problem  # noqa: E402

# torchcodec needs FFmpeg's shared libraries, which a clean machine may lack: its cases skip
NO_TORCHCODEC = torchcodec_problem()
USABLE_BACKENDS = [b for b in BACKENDS if b != "torchcodec" or NO_TORCHCODEC is None]
BACKEND_PARAMS = [pytest.param(b, marks=pytest.mark.skipif(
    b == "torchcodec" and NO_TORCHCODEC is not None,
    reason=f"torchcodec cannot load here: {NO_TORCHCODEC}")) for b in BACKENDS]


@pytest.fixture(scope="session")
def videos(tmp_path_factory):
    """Good and broken test videos, encoded once."""
    d = tmp_path_factory.mktemp("videos")
    v = {
        "mp4": synthetic.write_video(d / "clip.mp4", N),
        "mkv": synthetic.write_video(d / "clip.mkv", N),
        "faststart": synthetic.write_video(d / "fast.mp4", N, faststart=True),
        "one": synthetic.write_video(d / "one.mp4", 1),
        "short": synthetic.write_video(d / "short.mp4", 5),
        "avi": synthetic.write_video(d / "clip.avi", 12, codec="mpeg4"),
    }
    v["audio"] = synthetic.write_audio_only(d / "audio.m4a")
    v["zero"] = synthetic.write_zero_frame_video(d / "zero.mkv")
    v["unknown_codec"] = synthetic.replace_fourcc(v["avi"], d / "unknown.avi")
    data = v["mp4"].read_bytes()  # moov (the index) at the end: cut in half, it is lost
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    v["truncated"] = d / "truncated.mp4"
    (d / "noise.mp4").write_bytes(
        np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    v["noise"] = d / "noise.mp4"
    garbled = bytearray(data)
    garbled[:64] = bytes(64)  # the ftyp box and the start of the next one zeroed
    (d / "garbled.mp4").write_bytes(bytes(garbled))
    v["garbled"] = d / "garbled.mp4"
    # over-reported frame counts: header 40 frames, 20 decodable
    v["cut"] = synthetic.truncate_after_packets(v["faststart"], d / "cut.mp4", 20)
    v["edit"] = synthetic.shift_into_edit_list(v["faststart"], d / "edit.mp4", 20)
    v["long_mkv"] = synthetic.inflate_mkv_duration(v["mkv"], d / "long.mkv", 3.0)
    # cut inside the 25th packet: the last packet is partial
    v["cut_mid"] = synthetic.truncate_after_packets(v["faststart"], d / "cut_mid.mp4", 25,
                                                    partial=True)
    return v


@pytest.fixture
def no_hang():
    """Fail loudly (traceback, exit) instead of hanging if decoding never returns."""
    faulthandler.dump_traceback_later(60, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def reference_frames(path) -> list:
    """Every frame of ``path`` decoded sequentially by PyAV, no seeking, no threads."""
    import av

    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def assert_frames_match(frames, indices, n_expected):
    frames = frames.numpy()
    assert frames.shape == (n_expected, 48, 64, 3) and frames.dtype == np.uint8
    for frame, i in zip(frames, indices):
        assert synthetic.frame_index(frame) == i
        for name in ("red", "green", "blue"):
            (r, c), rgb = synthetic.PROBES[name]
            assert np.abs(frame[r, c].astype(int) - rgb).max() <= 6, (name, frame[r, c])


# ----------------------------------------------------------------------------- samplers
def test_uniform_takes_segment_midpoints():
    assert sample_indices(40, 8, "uniform") == [2, 7, 12, 17, 22, 27, 32, 37]
    assert sample_indices(10, 1, "uniform") == [5]
    assert sample_indices(7, 7, "uniform") == list(range(7))


def test_uniform_endpoints_includes_first_and_last():
    assert sample_indices(40, 4, "uniform_endpoints") == [0, 13, 26, 39]
    assert sample_indices(40, 40, "uniform_endpoints") == list(range(40))
    assert sample_indices(40, 1, "uniform_endpoints") == [0]


def test_random_draws_one_index_per_segment():
    seen = set()
    for seed in range(20):
        idx = sample_indices(40, 8, "random", rng=random.Random(seed))
        assert [i // 5 for i in idx] == list(range(8))  # index k falls in segment k
        seen.add(tuple(idx))
    assert len(seen) > 10
    assert sample_indices(40, 8, "random", rng=random.Random(3)) == \
        sample_indices(40, 8, "random", rng=random.Random(3))


def test_headtail_splits_between_halves():
    for seed in range(10):
        idx = sample_indices(40, 8, "headtail", rng=random.Random(seed))
        head, tail = idx[:4], idx[4:]
        assert all(0 <= i < 20 for i in head) and all(20 <= i < 40 for i in tail)
        assert head == sorted(set(head)) and tail == sorted(set(tail))
    odd = sample_indices(40, 5, "headtail", rng=random.Random(0))
    assert len(odd) == 5 and sum(i < 20 for i in odd) == 2  # LAVIS would return 4


def test_headtail_equals_lavis_load_video(videos):
    """Same ``random`` seed -> LAVIS's load_video(sampling="headtail") decodes the same frames."""
    from lavis.datasets.data_utils import load_video

    for seed in range(3):
        random.seed(seed)
        clip = load_video(str(videos["mp4"]), n_frms=8, sampling="headtail")  # (C, T, H, W)
        lavis_idx = [synthetic.frame_index(f) for f in clip.permute(1, 2, 3, 0).byte().numpy()]
        random.seed(seed)
        assert sample_indices(N, 8, "headtail") == lavis_idx


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_more_frames_than_available_repeat_or_refuse(strategy):
    idx = sample_indices(3, 8, strategy, rng=random.Random(0))
    assert len(idx) == 8 and idx == sorted(idx) and set(idx) <= {0, 1, 2}
    with pytest.raises(VideoDecodeError) as e:
        sample_indices(3, 8, strategy, allow_repeat=False)
    assert e.value.kind == "too_short" and "3 decodable frames" in str(e.value)


def test_sampler_rejects_bad_arguments():
    with pytest.raises(VideoDecodeError) as e:
        sample_indices(0, 4, "uniform")
    assert e.value.kind == "no_frames"
    with pytest.raises(UserError, match="n_frms"):
        sample_indices(10, 0, "uniform")
    with pytest.raises(UserError, match="Did you mean: uniform"):
        sample_indices(10, 2, "unifrom")


# ----------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_read_frames_returns_the_sampled_frames_in_rgb(videos, backend, strategy):
    out = read_frames(videos["mp4"], 8, strategy, backend=backend, rng=random.Random(1))
    assert out.indices == sample_indices(N, 8, strategy, rng=random.Random(1))
    assert_frames_match(out.frames, out.indices, 8)


@pytest.mark.parametrize("key", ["mkv", "faststart", "avi"])
def test_read_frames_other_containers_and_codecs(videos, key):
    n_avail = probe(videos[key]).num_frames
    for backend in USABLE_BACKENDS:
        out = read_frames(videos[key], 6, "uniform_endpoints", backend=backend)
        assert out.indices[0] == 0 and out.indices[-1] == n_avail - 1
        assert [synthetic.frame_index(f) for f in out.frames.numpy()] == out.indices


def test_pyav_seeking_gives_exactly_the_sequentially_decoded_frames(videos):
    """Keyframe seeks and skipped non-reference frames change nothing in the returned pixels."""
    ref = reference_frames(videos["mp4"])
    assert len(ref) == N
    for n in (1, 3, 8, 13, 40, 50):
        for strategy in STRATEGIES:
            out = read_frames(videos["mp4"], n, strategy, backend="pyav", rng=random.Random(n))
            for frame, i in zip(out.frames.numpy(), out.indices):
                assert np.array_equal(frame, ref[i])


def test_backends_agree(videos):
    a = read_frames(videos["mp4"], 16, "uniform", backend="pyav")
    b = read_frames(videos["mp4"], 16, "uniform", backend="decord")
    assert a.indices == b.indices
    assert (a.frames.int() - b.frames.int()).abs().max() <= 2  # colour conversion rounding


def test_probe_reports_header_and_decodable_counts(videos):
    info = probe(videos["mp4"])
    assert (info.num_frames, info.reported_frames, info.codec) == (N, N, "h264")
    assert info.keyframes == (0, 10, 20, 30) and info.demux_error is None


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("key, kind", [
    ("missing", "missing"),
    ("truncated", "unreadable"),
    ("noise", "unreadable"),
    ("garbled", "unreadable"),
    ("zero", "no_frames"),
    ("audio", "no_video_stream"),
    ("unknown_codec", "unsupported_codec"),
])
def test_bad_files_raise_a_clear_error(videos, tmp_path, backend, key, kind):
    path = videos.get(key, tmp_path / "does_not_exist.mp4")
    with pytest.raises(VideoDecodeError) as e:
        read_frames(path, 4, backend=backend)
    assert e.value.kind == kind
    assert str(path) in str(e.value) and isinstance(e.value, UserError)


def test_shorter_than_n_refused_or_repeated(videos):
    with pytest.raises(VideoDecodeError) as e:
        read_frames(videos["short"], 8, allow_repeat=False)
    assert e.value.kind == "too_short" and str(videos["short"]) in str(e.value)
    out = read_frames(videos["short"], 8)
    assert out.indices == [0, 0, 1, 2, 2, 3, 4, 4]
    assert_frames_match(out.frames, out.indices, 8)


def test_one_frame_video(videos):
    for backend in USABLE_BACKENDS:
        out = read_frames(videos["one"], 4, "random", backend=backend)
        assert out.indices == [0, 0, 0, 0]
        assert_frames_match(out.frames, out.indices, 4)


def test_decoding_is_bounded_by_the_timeout(videos):
    with pytest.raises(VideoDecodeError) as e:
        read_frames(videos["mp4"], 8, timeout_s=1e-9)
    assert e.value.kind == "timeout" and "timeout_s" in str(e.value)


# ----------------------------------------------------------------------------- over-reporting
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("key, decodable", [("cut", 20), ("edit", 20), ("long_mkv", N)])
def test_over_reported_frame_count_gives_valid_frames(videos, no_hang, backend, key, decodable):
    """Header (or duration x fps) claims more frames than exist: sample from what decodes."""
    import av

    with av.open(str(videos[key])) as c:
        s = c.streams.video[0]
        claimed = s.frames or int(c.duration / 1e6 * float(s.average_rate))
    assert claimed > decodable  # the file does over-report
    assert probe(videos[key]).num_frames == decodable
    out = read_frames(videos[key], 8, "uniform_endpoints", backend=backend)
    assert out.indices[-1] == decodable - 1
    # "edit" presents frames 20..39 of the source: frame k there is source frame 20 + k
    offset = 20 if key == "edit" else 0
    assert ([synthetic.frame_index(f) for f in out.frames.numpy()]
            == [i + offset for i in out.indices])


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_file_cut_inside_a_packet_gives_the_frames_before_the_cut(videos, no_hang, backend):
    info = probe(videos["cut_mid"])
    assert 0 < info.num_frames < N and info.reported_frames == N
    out = read_frames(videos["cut_mid"], 6, "uniform_endpoints", backend=backend)
    assert out.indices[-1] < info.num_frames
    assert_frames_match(out.frames, out.indices, 6)


def test_decord_count_disagreeing_with_the_index_falls_back_to_pyav(videos, monkeypatch, caplog):
    """decord#373: decord counts frames that do not decode and hangs in get_batch on them.

    A VideoReader that over-counts by 5 (the real reader, with only its count changed) must never
    be asked for frames; PyAV decodes the file instead.
    """
    import decord

    class OverCounting(decord.VideoReader):
        def __len__(self):
            return super().__len__() + 5

        def get_batch(self, indices):
            raise AssertionError("get_batch must not run on a reader whose count is wrong")

    monkeypatch.setattr(decord, "VideoReader", OverCounting)
    out = read_frames(videos["mp4"], 8, "uniform_endpoints", backend="decord")
    assert out.indices[-1] == N - 1
    assert_frames_match(out.frames, out.indices, 8)
    assert "decoding it with PyAV instead" in caplog.text


def test_frame_threads_do_not_deadlock_with_pyav_log_forwarding(tmp_path, no_hang):
    """PyAV's log forwarding (on after `import torchvision`) deadlocks frame-threaded decoding
    that stops early; read_frames turns it off. Without that, this hangs within a few calls
    (the no_hang fixture then ends the run with a traceback)."""
    import av.logging

    clip = synthetic.write_moving_video(tmp_path / "360p.mp4", 640, 360, num_frames=60, gop=30)
    for k in range(40):
        av.logging.set_level(av.logging.ERROR)  # what torchvision.io does at import
        out = read_frames(clip, 4, "random", rng=random.Random(k))
        assert out.frames.shape == (4, 360, 640, 3)
    assert av.logging.get_level() is None


class _BadVideoDataset:
    def __init__(self, path):
        self.path = path

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return read_frames(self.path, 2).frames


def test_error_keeps_its_type_through_pickling_and_dataloader_workers(tmp_path):
    import pickle

    from torch.utils.data import DataLoader

    e = VideoDecodeError(str(tmp_path / "a.mp4"), "missing", "no such file")
    back = pickle.loads(pickle.dumps(e))
    assert (back.path, back.kind, back.reason, str(back)) == (e.path, e.kind, e.reason, str(e))
    loader = DataLoader(_BadVideoDataset(str(tmp_path / "gone.mp4")), num_workers=1)
    # a UserError, not RuntimeError
    with pytest.raises(VideoDecodeError, match="gone.mp4") as caught:
        next(iter(loader))
    assert isinstance(caught.value, UserError)


def test_damaged_tail_gives_one_count_whatever_n_and_one_warning(videos, caplog):
    """A file cut inside a packet whose header announces every frame: the count sampling uses
    is what decodes, the same for 2 frames as for all of them, with one warning per read and
    none of FFmpeg's own lines in Python's logging (PyAV forwards them once torchvision is
    imported; that is switched off before the file is opened)."""
    import logging

    import av.logging

    av.logging.set_level(av.logging.ERROR)  # what torchvision.io does at import
    caplog.set_level(logging.INFO)
    path = videos["cut_mid"]
    last = set()
    for n in (2, 8, probe(path).num_frames):
        caplog.clear()
        out = read_frames(path, n, "uniform_endpoints")
        last.add(out.indices[-1])
        warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warned) == 1 and "decode; sampling from those" in warned[0], warned
        assert not [r for r in caplog.records if r.name.startswith("libav")]
        assert_frames_match(out.frames, out.indices, n)
    assert len(last) == 1


# ----------------------------------------------------------------------------- torchcodec
@pytest.mark.skipif(NO_TORCHCODEC is not None, reason=f"torchcodec cannot load: {NO_TORCHCODEC}")
@pytest.mark.parametrize("key", ["mp4", "mkv", "faststart", "avi", "short"])
def test_torchcodec_returns_exactly_the_frames_pyav_returns(videos, key):
    for strategy, n in (("uniform", 8), ("uniform_endpoints", 5), ("headtail", 6)):
        a = read_frames(videos[key], n, strategy, backend="pyav", rng=random.Random(0))
        b = read_frames(videos[key], n, strategy, backend="torchcodec", rng=random.Random(0))
        assert a.indices == b.indices and torch.equal(a.frames, b.frames), (key, strategy)


def test_auto_backend_falls_back_to_pyav_when_torchcodec_cannot_load(videos, monkeypatch):
    from lavis_plugins.video import decode, torchcodec_backend

    monkeypatch.setattr(decode, "torchcodec_problem", lambda: "OSError: libavcodec.so missing")
    out = read_frames(videos["mp4"], 4, "uniform", backend="auto")
    assert torch.equal(out.frames, read_frames(videos["mp4"], 4, "uniform", backend="pyav").frames)
    monkeypatch.setattr(torchcodec_backend, "torchcodec_problem",
                        lambda: "OSError: libavcodec.so missing")
    with pytest.raises(VideoDecodeError, match="backend 'torchcodec' cannot load .*libavcodec"):
        read_frames(videos["mp4"], 4, "uniform", backend="torchcodec")
