"""Frozen-encoder feature cache: run the image encoder once, then train or evaluate from disk.

With a frozen ViT, every epoch recomputes the encoder outputs, which dominate a stage-1 step at
real size (the ViT-g forward is 4x a stage-1 Q-Former step's forward and backward, counted in
docs/benchmarks.md). The cache holds the encoder's raw outputs (before the trainable
``ln_vision``) for every image of a caption-style dataset, as one float16 ``.npy`` memory map
plus ``meta.json``:

    meta = {"encoder": fingerprint of the encoder weights and image size,
            "images": {image path: [size in bytes, mtime_ns]}, "keys": [image path per image],
            "views": K, "seed": S, "processor": the train processor's transform, as text,
            "shape": [N * K, L, D], "dtype": "float16"}

Augmented training (``feature_cache_views: K``, K > 1): each image is cached as K views, each
made by the split's own train processor (e.g. ``blip2_image_train``'s random resized crop and
flip) with the global RNGs seeded from ``(S, image row, view)``; row ``r * K + k`` holds view
``k`` of image ``r``. At training time each sample draws one of its K views from torch's global
RNG, which ``lp_runner`` seeds per ``(run seed, epoch, sample index)``
(:class:`~lavis_plugins.runners.sampling.SeededSamples`), so the draw is the same after a resume.
K = 1 (the default) with a deterministic processor (``blip_image_eval``) is the plain cache. A
cache of N images takes N x K x L x D x 2 bytes (ViT-g at 224 px: 0.72 MB per view).

:class:`CachedFeatureDataset` serves ``{"image_embeds": (L, D), "text_input": ...}`` samples
instead of decoded images; models of this plugin skip their encoder when a batch carries
``image_embeds``. A cache built by another encoder, processor or number of views, or for images
that changed or are missing, is refused with a message that says which and how to rebuild it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from lavis_plugins.common.errors import UserError
from lavis_plugins.common.seeding import sample_seed, seeded_global_rngs

logger = logging.getLogger(__name__)

META = "meta.json"
FEATS = "features.npy"
VIEWS_KEY = "feature_cache_views"  # the dataset config key: augmented views per image
DEFAULT_VIEWS = 1
# separates the views' seeds from the per-sample training streams (seed, epoch, index)
_VIEW_STREAM = 0x56494557


def cache_views(ds_cfg: Any, name: str) -> int:
    """``datasets.<name>.feature_cache_views`` checked: a whole number >= 1 (default 1), and
    only beside ``feature_cache``."""
    value = ds_cfg.get(VIEWS_KEY, None)
    if value is None:
        return DEFAULT_VIEWS
    if not ds_cfg.get("feature_cache", None):
        raise UserError(f"datasets.{name}.{VIEWS_KEY} is set but datasets.{name}.feature_cache "
                        "is not: give the cache folder too, or remove the key")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"datasets.{name}.{VIEWS_KEY}={value!r}: must be a whole number >= 1 "
                        "(augmented views cached per image; 1 = no augmentation)")
    return int(value)


def view_seed(seed: int, row: int, view: int) -> int:
    """The seed of the global RNGs while view ``view`` of image ``row`` is made."""
    return sample_seed(seed, _VIEW_STREAM, row, view)


def processor_text(proc: Any) -> str:
    """What a processor does, as text (torchvision's ``Compose`` lists each transform and its
    settings); the type name when it has no such description."""
    text = repr(getattr(proc, "transform", proc))
    return type(proc).__name__ if " at 0x" in text else text


def encoder_fingerprint(encoder: torch.nn.Module, image_size: int) -> str:
    """A hash of the encoder's parameter names, shapes and a strided sample of every tensor's
    values (hashing all of ViT-g's 1B weights would take longer than it saves)."""
    h = hashlib.sha256(f"image_size={image_size}".encode())
    for name, t in sorted(encoder.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        flat = t.detach().reshape(-1)
        step = max(flat.numel() // 4096, 1)
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _image_stat(path: str) -> List[int]:
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns)]


def _image_path(dataset, ann: Dict[str, Any]) -> str:
    return os.path.join(dataset.vis_root, ann["image"])


def _unique_images(dataset) -> List[str]:
    if not hasattr(dataset, "annotation") or not hasattr(dataset, "vis_root"):
        raise UserError(f"{type(dataset).__name__} is not a caption-style dataset (needs "
                        "'annotation' entries with an 'image' field and a 'vis_root'); the "
                        "feature cache supports image-caption datasets")
    seen, out = set(), []
    for ann in dataset.annotation:
        p = _image_path(dataset, ann)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


@torch.no_grad()
def build_feature_cache(encoder: torch.nn.Module, dataset, out_dir: str | Path,
                        image_size: int, batch_size: int = 32,
                        device: str | torch.device = "cpu", progress: bool = True,
                        views: int = DEFAULT_VIEWS, seed: int = 0) -> Path:
    """Encode ``views`` views of every image of ``dataset`` into ``out_dir``, each made by the
    dataset's own processor with the global RNGs seeded by :func:`view_seed` ``(seed, row,
    view)`` (so an augmenting train processor gives K different, reproducible views). Written
    to a temporary folder and renamed, so a crash leaves no partial cache."""
    from PIL import Image

    out_dir = Path(out_dir)
    images = _unique_images(dataset)
    proc = dataset.vis_processor
    encoder = encoder.to(device).eval()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    feats = None
    # images in batches of whole images: each decoded once for its K views
    per_batch = max(batch_size // views, 1)
    it = range(0, len(images), per_batch)
    if progress:
        from lavis_plugins.common.progress import track

        it = track(it, len(it), "caching encoder features", unit="batch")
    for start in it:
        batch = []
        for row in range(start, min(start + per_batch, len(images))):
            p = images[row]
            try:
                image = Image.open(p).convert("RGB")
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
                raise UserError(f"cannot decode image {p}: {e}") from e
            for k in range(views):
                with seeded_global_rngs(view_seed(seed, row, k)):
                    batch.append(proc(image))
        out = encoder(torch.stack(batch).to(device)).float().cpu().numpy().astype(np.float16)
        if feats is None:
            feats = np.lib.format.open_memmap(tmp / FEATS, mode="w+", dtype=np.float16,
                                              shape=(len(images) * views,) + out.shape[1:])
        feats[start * views:start * views + len(batch)] = out
    if feats is None:
        raise UserError("the dataset has no images to cache")
    feats.flush()
    meta = {"encoder": encoder_fingerprint(encoder, image_size), "keys": images,
            "images": {p: _image_stat(p) for p in images}, "views": views, "seed": seed,
            "processor": processor_text(proc), "shape": list(feats.shape), "dtype": "float16"}
    (tmp / META).write_text(json.dumps(meta))
    del feats
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _read_meta(cache_dir: Path) -> Dict[str, Any]:
    """``meta.json`` parsed and checked against ``features.npy`` (its rows, shape and dtype),
    so a damaged cache is refused when the dataset is built, not mid-training."""
    rebuild = "rebuild it with `lavis-plugins cache-features`"
    try:
        meta = json.loads((cache_dir / META).read_text())
    except (OSError, ValueError) as e:
        raise UserError(
            f"feature cache {cache_dir}: {META} is unreadable ({e}); {rebuild}") from None
    need = {"encoder": str, "images": dict, "keys": list, "shape": list}
    wrong = [k for k, t in need.items()
             if not isinstance(meta, dict) or not isinstance(meta.get(k), t)]
    if wrong:
        raise UserError(f"feature cache {cache_dir}: {META} lacks or mistypes {wrong}; {rebuild}")
    try:
        feats = np.load(cache_dir / FEATS, mmap_mode="r")
    except (OSError, ValueError) as e:  # a truncated .npy cannot be mapped
        raise UserError(f"feature cache {cache_dir}: {FEATS} is damaged or truncated ({e}); "
                        f"{rebuild}") from None
    views = meta.setdefault("views", DEFAULT_VIEWS)  # caches written before views: one each
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise UserError(f"feature cache {cache_dir}: {META} has views={views!r}; {rebuild}")
    if (list(feats.shape) != list(meta["shape"])
            or len(meta["keys"]) * views != feats.shape[0]):
        raise UserError(f"feature cache {cache_dir}: {FEATS} holds shape {list(feats.shape)} but "
                        f"{META} says {meta['shape']} for {len(meta['keys'])} images x {views} "
                        f"views; {rebuild}")
    return meta


def check_feature_cache(cache_dir: str | Path, encoder: Optional[torch.nn.Module],
                        image_size: int, dataset=None,
                        views: Optional[int] = None) -> Dict[str, Any]:
    """Meta of a cache, after checking it matches ``encoder``, ``dataset``'s images and
    processor, and the number of ``views`` the config asks for."""
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / META
    if not meta_path.is_file() or not (cache_dir / FEATS).is_file():
        raise UserError(f"no feature cache at {cache_dir} (needs {META} and {FEATS}); build it "
                        "with `lavis-plugins cache-features`")
    meta = _read_meta(cache_dir)
    if encoder is not None:
        fp = encoder_fingerprint(encoder, image_size)
        if fp != meta["encoder"]:
            raise UserError(f"feature cache {cache_dir} was built with another image encoder (or "
                            f"image size): fingerprint {meta['encoder']} != {fp}. Rebuild it "
                            "for this model.")
    if views is not None and meta["views"] != views:
        raise UserError(f"feature cache {cache_dir} holds {meta['views']} view(s) per image but "
                        f"the config asks for {VIEWS_KEY}={views}; rebuild it with "
                        "`lavis-plugins cache-features`")
    if dataset is not None and "processor" in meta:
        now = processor_text(dataset.vis_processor)
        if now != meta["processor"]:
            raise UserError(f"feature cache {cache_dir} was made with another image processor "
                            f"({meta['processor']!r}, now {now!r}); rebuild it with "
                            "`lavis-plugins cache-features`")
    if dataset is not None:
        wanted = _unique_images(dataset)
        missing = [p for p in wanted if p not in meta["images"]]
        changed = [p for p in wanted if p in meta["images"] and os.path.exists(p)
                   and _image_stat(p) != meta["images"][p]]
        if missing or changed:
            raise UserError(f"feature cache {cache_dir} does not match the images: "
                            f"{len(missing)} not cached (e.g. {missing[:2]}), {len(changed)} "
                            f"changed since caching (e.g. {changed[:2]}). Rebuild the cache.")
    return meta


class CachedFeatureDataset(Dataset):
    """A caption dataset whose images are replaced by cached encoder outputs.

    Sample: ``{"image_embeds": float tensor (L, D), "text_input": str, "image_id": ...}``; with K
    views per image, the view is drawn from torch's global RNG (seeded per sample and epoch by
    ``lp_runner``).
    """

    def __init__(self, dataset, cache_dir: str | Path, encoder: Optional[torch.nn.Module],
                 image_size: int, views: Optional[int] = None) -> None:
        meta = check_feature_cache(cache_dir, encoder, image_size, dataset, views)
        self.dataset = dataset
        self.views = int(meta["views"])
        self.row = {p: i for i, p in enumerate(meta["keys"])}
        self.feats = np.load(Path(cache_dir) / FEATS, mmap_mode="r")

    def draw_view(self) -> int:
        """The view a sample reads: uniform over the K views, from the global stream."""
        return int(torch.randint(self.views, ())) if self.views > 1 else 0

    def __len__(self) -> int:
        return len(self.dataset.annotation)

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        ann = self.dataset.annotation[idx]
        row = self.row[_image_path(self.dataset, ann)] * self.views + self.draw_view()
        caption = ann.get("caption", ann.get("text_input"))
        return {
            "image_embeds": torch.from_numpy(np.asarray(self.feats[row], dtype=np.float32)),
            "text_input": self.dataset.text_processor(caption),
            "image_id": ann.get("image_id", idx),
        }

    def collater(self, samples):
        return torch.utils.data.default_collate(samples)
