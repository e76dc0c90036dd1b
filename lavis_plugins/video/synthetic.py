"""Tiny videos with known frames, and broken ones, for tests and demos (encoded with PyAV).

Frame ``i`` of ``write_video`` is 3 bands of 16 rows (band edges fall on 16-pixel blocks, so
4:2:0 chroma never mixes two bands):

- rows 0-15: grey level ``index_level(i)`` -- ``frame_index(frame)`` reads ``i`` back after lossy
  coding (levels are 6 apart; H.264 at the quality used here moves them by 1-2);
- rows 16-31: pure red left half, pure green right half -- checks RGB (not BGR) order;
- rows 32-47: pure blue.

Supports up to ``MAX_INDEXED_FRAMES`` distinguishable frames.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

MAX_INDEXED_FRAMES = 40
_LEVEL0, _STEP = 8, 6

# pixel (row, col) at the centre of each band of a 64 x 48 frame, and its colour
PROBES: Dict[str, Tuple[Tuple[int, int], Optional[Tuple[int, int, int]]]] = {
    "index": ((8, 32), None),
    "red": ((24, 16), (255, 0, 0)),
    "green": ((24, 48), (0, 255, 0)),
    "blue": ((40, 32), (0, 0, 255)),
}


def index_level(i: int) -> int:
    """Grey level that identifies frame ``i``."""
    if not 0 <= i < MAX_INDEXED_FRAMES:
        raise ValueError(f"frame index {i} outside [0, {MAX_INDEXED_FRAMES})")
    return _LEVEL0 + _STEP * i


def index_frame(i: int, width: int = 64, height: int = 48) -> np.ndarray:
    """(height, width, 3) uint8 RGB frame ``i`` (layout in the module docstring)."""
    if width % 32 or height < 48:
        raise ValueError("width must be a multiple of 32 and height at least 48")
    frame = np.zeros((height, width, 3), np.uint8)
    frame[0:16] = index_level(i)
    frame[16:32, : width // 2] = (255, 0, 0)
    frame[16:32, width // 2:] = (0, 255, 0)
    frame[32:] = (0, 0, 255)
    return frame


def frame_index(frame: np.ndarray) -> int:
    """The ``i`` of a decoded ``index_frame(i)`` (mean of the top band's centre, rounded)."""
    level = float(np.asarray(frame)[4:12, 8:-8].astype(np.float64).mean())
    return int(round((level - _LEVEL0) / _STEP))


def write_video(
    path: "str | os.PathLike[str]",
    num_frames: int = 40,
    width: int = 64,
    height: int = 48,
    fps: int = 30,
    gop: int = 10,
    codec: str = "libx264",
    faststart: bool = False,
) -> Path:
    """Encode ``index_frame(0 .. num_frames - 1)``; the container follows the file extension.

    libx264 runs with B-frames (preset "fast": 3 B-frames, the middle one a reference) and a
    keyframe every ``gop`` frames, so decoders must reorder frames and samplers must seek.
    ``faststart`` (mp4) writes the index (moov) before the data, as streaming files do.
    """
    import av

    path = Path(path)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.gop_size = gop
        if codec == "libx264":
            stream.options = {"preset": "fast", "crf": "12",
                              "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        else:  # other encoders default to a bitrate too low to keep the grey levels apart
            stream.bit_rate = 4_000_000
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(index_frame(i, width, height), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _write_audio(out, stream_rate: int = 16000, frames: int = 5) -> None:
    import av

    stream = out.add_stream("aac", rate=stream_rate)
    stream.layout = "mono"
    for k in range(frames):
        samples = np.zeros((1, 1024), np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = stream_rate, k * 1024
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)


def write_audio_only(path: "str | os.PathLike[str]") -> Path:
    """An AAC file with no video stream (e.g. ``clip.m4a``)."""
    import av

    with av.open(str(path), "w") as out:
        _write_audio(out)
    return Path(path)


def write_zero_frame_video(path: "str | os.PathLike[str]") -> Path:
    """A Matroska file (``.mkv``) with an H.264 video stream that holds no frame (audio only)."""
    import av

    with av.open(str(path), "w", format="matroska") as out:
        video = out.add_stream("libx264", rate=30)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        _write_audio(out)
    return Path(path)


def truncate_after_packets(src: "str | os.PathLike[str]", dst: "str | os.PathLike[str]",
                           keep: int, partial: bool = False) -> Path:
    """Copy ``src`` cut right after its ``keep``-th video packet (in file order).

    On a faststart mp4 the header still announces every frame: a container that over-reports
    its frame count, with no damaged packet to give it away. ``partial`` cuts in the middle of
    that packet instead, as an interrupted download does.
    """
    import av

    with av.open(str(src)) as container:
        spans = sorted((p.pos, p.size) for p in container.demux(video=0) if p.size and p.pos >= 0)
    pos, size = spans[keep - 1]
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: pos + (size // 2 if partial else size)])
    return Path(dst)


def inflate_mkv_duration(src: "str | os.PathLike[str]", dst: "str | os.PathLike[str]",
                         factor: float = 3.0) -> Path:
    """Copy a Matroska file with its Segment Duration multiplied by ``factor``.

    Matroska stores no frame count; readers that estimate it as duration x frame rate (decord's
    fallback) then count ``factor`` times more frames than there are.
    """
    data = bytearray(Path(src).read_bytes())
    at = data.find(b"\x44\x89")  # EBML id of Duration; its size byte says float32 or float64
    if at < 0 or data[at + 2] not in (0x84, 0x88):
        raise ValueError(f"{src}: no Duration element found")
    fmt, width = (">f", 4) if data[at + 2] == 0x84 else (">d", 8)
    (duration,) = struct.unpack(fmt, bytes(data[at + 3: at + 3 + width]))
    data[at + 3: at + 3 + width] = struct.pack(fmt, duration * factor)
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def replace_fourcc(src: "str | os.PathLike[str]", dst: "str | os.PathLike[str]",
                   old: bytes = b"FMP4", new: bytes = b"QQQQ") -> Path:
    """Copy an AVI with its codec tag replaced: a video codec no decoder knows."""
    data = Path(src).read_bytes()
    if old not in data:
        raise ValueError(f"{src}: codec tag {old!r} not found")
    Path(dst).write_bytes(data.replace(old, new))
    return Path(dst)


def shift_into_edit_list(src: "str | os.PathLike[str]", dst: "str | os.PathLike[str]",
                         hidden: int) -> Path:
    """Remux an mp4 with its first ``hidden`` frames moved before time 0.

    The mp4 muxer writes an edit list that starts the presentation at time 0, so the header
    still counts every frame while players (and FFmpeg's demuxer) present only the rest.
    """
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        vin = inp.streams.video[0]
        vout = out.add_stream_from_template(vin)
        shift = None
        for packet in inp.demux(vin):
            if packet.dts is None:
                continue
            if shift is None:  # frame duration in stream time base, from the frame rate
                shift = int(round(hidden / (vin.average_rate * vin.time_base)))
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = vout
            out.mux(packet)
    return Path(dst)


def write_moving_video(
    path: "str | os.PathLike[str]",
    width: int,
    height: int,
    num_frames: int,
    gop: int,
    fps: int = 30,
    preset: str = "veryfast",
) -> Path:
    """An H.264 clip with realistic decoding cost: a scrolling gradient, moving squares, grain.

    Flat frames would make decoding unrealistically cheap; the grain keeps the bitrate of a
    camera clip and the motion gives P/B-frames real work. One keyframe every ``gop`` frames
    exactly (x264's scene-cut keyframes are off). Used by the decoding benchmark.
    """
    import av

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    path = Path(path)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.gop_size = gop
        stream.options = {"preset": preset, "crf": "23",
                          "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        side = height // 4
        for i in range(num_frames):
            img = np.empty((height, width, 3), np.int16)
            img[..., 0] = (xx + 4 * i) % 256
            img[..., 1] = (yy + 2 * i) % 256
            img[..., 2] = ((xx + yy) // 2 + 3 * i) % 256
            for k in range(3):
                x0 = (i * (5 + 3 * k) + k * width // 3) % (width - side)
                y0 = (i * (2 + k) + k * height // 4) % (height - side)
                img[y0:y0 + side, x0:x0 + side] = (255 * (k == 0), 255 * (k == 1), 255 * (k == 2))
            img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
