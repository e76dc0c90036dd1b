"""Video processors: a video file -> n sampled frames -> (C, T, H, W), transformed like images.

``lp_video_eval`` applies LAVIS's own ``blip_image_eval`` transform (bicubic resize to
image_size x image_size, ToTensor, normalise) to every frame, and ``lp_video_train`` applies the
``blip2_image_train`` recipe (random resized crop, bicubic, horizontal flip, ToTensor, normalise)
with ONE crop and ONE flip drawn per video, so the frames of a clip stay aligned. A frame goes
through the same PIL operations as an image does, so a 1-frame video gives exactly the image
path's tensor (tests/test_video_processors.py). LAVIS's ``blip_image_train`` additionally applies
RandAugment; BLIP-2's pre-training uses ``blip2_image_train``, which does not, and neither do we.

Options (YAML, under ``vis_processor: {train|eval: {name: lp_video_train|lp_video_eval, ...}}``)
are the fields of ``VideoEvalConfig`` / ``VideoTrainConfig`` below; unknown keys are refused.
Decoding and sampling: :mod:`lavis_plugins.video.decode`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from lavis.common.registry import registry
from lavis.processors.base_processor import BaseProcessor
from lavis.processors.blip_processors import BlipImageBaseProcessor, BlipImageEvalProcessor
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF
from torchvision.transforms.functional import InterpolationMode

from lavis_plugins.common.errors import UserError, unknown_name
from lavis_plugins.video.frame_cache import FrameCache, check_frame_cache
from lavis_plugins.video.decode import (
    BACKENDS,
    DEFAULT_BACKEND,
    DEFAULT_TIMEOUT_S,
    STRATEGIES,
    Backend,
    SamplingStrategy,
    read_frames,
)

VideoItem = Union[str, "os.PathLike[str]", torch.Tensor]


@dataclass
class VideoEvalConfig:
    """Options of ``lp_video_eval`` (and, with the fields of ``VideoTrainConfig``, the train
    one)."""

    # frames sampled per video (BLIP: 8 for retrieval, 16 for QA; InstructBLIP: 4)
    n_frms: int = 8
    # output frames are image_size x image_size (BLIP-2 is trained at 224)
    image_size: int = 224
    # how frame indices are chosen: uniform | uniform_endpoints | random | headtail
    # (lavis_plugins.video.sample_indices)
    sampling: SamplingStrategy = "uniform"
    # decoding library: pyav | torchcodec | decord | auto (torchcodec where it loads, else pyav);
    # the default is the fastest in our benchmark
    backend: Backend = DEFAULT_BACKEND
    # normalisation mean/std per RGB channel; None = LAVIS's BLIP/BLIP-2 image normalisation
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    # wall-clock bound on decoding one video, seconds
    timeout_s: float = DEFAULT_TIMEOUT_S
    # a video with fewer decodable frames than n_frms: repeat frames (true) or raise a
    # VideoDecodeError of kind "too_short" (false), which the datasets' on_bad_video policy handles
    allow_repeat: bool = True
    # decoder threads per video; 0 = the decoder's own choice (FFmpeg: one per core)
    threads: int = 0
    # folder of decoded frames, stored once per video and n_frms for repeated evaluation
    # (deterministic sampling only; lavis_plugins.video.frame_cache); None = decode every time
    frame_cache: Optional[str] = None


@dataclass
class VideoTrainConfig(VideoEvalConfig):
    """Options of ``lp_video_train``: random sampling and a random resized crop per video."""

    sampling: SamplingStrategy = "random"
    # random resized crop: the crop covers a random fraction of the frame area in this range
    min_scale: float = 0.5
    max_scale: float = 1.0


def _config_from(config_class, cfg, processor: str):
    """``config_class`` from a LAVIS processor config (OmegaConf or dict); unknown keys refused."""
    if cfg is None:
        return config_class()
    values = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    values.pop("name", None)  # LAVIS passes the registry name along with the options
    names = [f.name for f in dataclasses.fields(config_class)]
    for key in values:
        if key not in names:
            raise unknown_name(f"option of processor {processor}", key, names)
    for key in ("mean", "std"):
        if values.get(key) is not None:
            values[key] = tuple(float(v) for v in values[key])
    return config_class(**values)


def _validate(cfg: VideoEvalConfig, processor: str) -> None:
    def bad(field: str, why: str) -> UserError:
        return UserError(f"processor {processor}: {field}={getattr(cfg, field)!r} {why}")

    if isinstance(cfg.n_frms, bool) or not isinstance(cfg.n_frms, int) or cfg.n_frms < 1:
        raise bad("n_frms", "must be an integer >= 1")
    if (isinstance(cfg.image_size, bool) or not isinstance(cfg.image_size, int)
            or cfg.image_size < 1):
        raise bad("image_size", "must be an integer >= 1")
    if cfg.sampling not in STRATEGIES:
        raise unknown_name(f"sampling strategy of processor {processor}", cfg.sampling, STRATEGIES)
    if cfg.backend not in BACKENDS:
        raise unknown_name(f"video backend of processor {processor}", cfg.backend, BACKENDS)
    for field in ("mean", "std"):
        value = getattr(cfg, field)
        if value is not None and len(value) != 3:
            raise bad(field, "must list 3 numbers (R, G, B)")
    if cfg.std is not None and min(cfg.std) <= 0:
        raise bad("std", "must be positive")
    if isinstance(cfg.threads, bool) or not isinstance(cfg.threads, int) or cfg.threads < 0:
        raise bad("threads", "must be an integer >= 0 (0: the decoder's own choice)")
    if not cfg.timeout_s > 0:
        raise bad("timeout_s", "must be > 0 seconds")
    if cfg.frame_cache is not None and not isinstance(cfg.frame_cache, str):
        raise bad("frame_cache", "must be a folder path")
    check_frame_cache(cfg.frame_cache, cfg.sampling, processor)
    if isinstance(cfg, VideoTrainConfig) and not 0 < cfg.min_scale <= cfg.max_scale <= 1:
        raise UserError(f"processor {processor}: need 0 < min_scale <= max_scale <= 1, got "
                        f"min_scale={cfg.min_scale!r}, max_scale={cfg.max_scale!r}")


@registry.register_processor("lp_video_eval")
class VideoEvalProcessor(BaseProcessor):
    """Video file (or decoded uint8 frames) -> (C, T, image_size, image_size) float tensor.

    Every frame goes through LAVIS's ``blip_image_eval`` transform, so frame t equals what the
    image path gives for that frame as a PIL image.
    """

    registry_name = "lp_video_eval"
    config_class = VideoEvalConfig

    def __init__(self, cfg: Optional[VideoEvalConfig] = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else self.config_class()
        _validate(self.cfg, self.registry_name)
        self._build_transform()
        self._frame_cache = (None if self.cfg.frame_cache is None else FrameCache(
            self.cfg.frame_cache, self.cfg.n_frms, self.cfg.sampling, self.cfg.allow_repeat))

    def _build_transform(self) -> None:
        self.image_transform = BlipImageEvalProcessor(
            image_size=self.cfg.image_size, mean=self.cfg.mean, std=self.cfg.std
        )

    @classmethod
    def from_config(cls, cfg=None) -> "VideoEvalProcessor":
        return cls(_config_from(cls.config_class, cfg, cls.registry_name))

    def load(self, path: "str | os.PathLike[str]") -> Tuple[torch.Tensor, List[int]]:
        """Decode the configured frames: ((T, H, W, 3) uint8 RGB, their frame indices).

        Raises ``VideoDecodeError`` (a ``UserError``) naming the file and the reason.
        """
        def decode():
            return read_frames(path, self.cfg.n_frms, self.cfg.sampling,
                               backend=self.cfg.backend, timeout_s=self.cfg.timeout_s,
                               allow_repeat=self.cfg.allow_repeat, threads=self.cfg.threads)

        out = decode() if self._frame_cache is None else self._frame_cache.get(path, decode)
        return out.frames, out.indices

    def __call__(self, item: VideoItem) -> torch.Tensor:
        """A video path, or frames already decoded as a (T, H, W, 3) uint8 tensor ->
        (C, T, S, S)."""
        frames = item if torch.is_tensor(item) else self.load(item)[0]
        if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise UserError(f"{self.registry_name}: frames must be a (T, H, W, 3) uint8 RGB "
                            f"tensor, got {tuple(frames.shape)} {frames.dtype}")
        images = [Image.fromarray(frame.numpy()) for frame in frames]
        return self.transform_images(images)  # (C, T, S, S)

    def transform_images(self, images: List[Image.Image]) -> torch.Tensor:
        """PIL frames -> (C, T, S, S), frame t exactly as the image processor transforms it.

        Only the resize runs per frame (PIL, as the image path); ToTensor and Normalize run once
        on the whole clip: each of those small tensor ops goes through torch's intra-op thread
        pool, whose hand-off dominates on small frames and grows when the machine is loaded
        (issue 16 saw 10-30x against one thread), so 3 ops per clip replace 3 per frame.
        """
        resize = self.image_transform.transform.transforms[0]
        return self._to_normalized([resize(img) for img in images], self.image_transform.normalize)

    @staticmethod
    def _to_normalized(images: List[Image.Image], norm: transforms.Normalize) -> torch.Tensor:
        """Same-size PIL RGB images -> (C, T, S, S): ToTensor then Normalize, on all at once
        (the same float operations as per image: x / 255, then (x - mean) / std)."""
        clip = torch.from_numpy(np.stack([np.asarray(img, dtype=np.uint8) for img in images]))
        # channels first while still uint8: the float ops then run on contiguous memory (on the
        # permuted view, which .float() keeps, they were 7x slower: 39 vs 5.5 ms for 32 frames)
        clip = clip.permute(3, 0, 1, 2).contiguous().float().div_(255)  # (C, T, S, S)
        mean = torch.as_tensor(norm.mean, dtype=clip.dtype).view(-1, 1, 1, 1)
        std = torch.as_tensor(norm.std, dtype=clip.dtype).view(-1, 1, 1, 1)
        return clip.sub_(mean).div_(std)


@registry.register_processor("lp_video_train")
class VideoTrainProcessor(VideoEvalProcessor):
    """Training frames: random sampling, one random resized crop and one flip per video.

    The crop and flip are LAVIS's ``blip2_image_train`` ones (torchvision's RandomResizedCrop,
    bicubic, and RandomHorizontalFlip), drawn once from torch's RNG in the same order, so with
    the same seed a 1-frame video equals the image path.
    """

    registry_name = "lp_video_train"
    config_class = VideoTrainConfig

    def _build_transform(self) -> None:
        self.crop = transforms.RandomResizedCrop(
            self.cfg.image_size,
            scale=(self.cfg.min_scale, self.cfg.max_scale),
            interpolation=InterpolationMode.BICUBIC,
        )
        self.flip = transforms.RandomHorizontalFlip()
        self.normalize = BlipImageBaseProcessor(mean=self.cfg.mean, std=self.cfg.std).normalize

    def transform_images(self, images: List[Image.Image]) -> torch.Tensor:
        crop = self.crop
        i, j, h, w = crop.get_params(images[0], crop.scale, crop.ratio)  # one crop per video
        flip = bool(torch.rand(1) < self.flip.p)  # one flip decision per video
        out = []
        for img in images:
            img = TF.resized_crop(img, i, j, h, w, crop.size, crop.interpolation,
                                  antialias=crop.antialias)
            out.append(TF.hflip(img) if flip else img)
        return self._to_normalized(out, self.normalize)

