"""Frozen-encoder feature cache: run the image encoder once, then train or evaluate from disk.

With a frozen ViT and no image augmentation, every epoch recomputes the same encoder outputs,
which dominate a stage-1 step at real size (ViT-g is ~20x the Q-Former's FLOPs). The cache holds
the encoder's raw outputs (before the trainable ``ln_vision``) for every image of a caption-style
dataset, as one float16 ``.npy`` memory map plus ``meta.json``:

    meta = {"encoder": fingerprint of the encoder weights and image size,
            "images": {image path: [size in bytes, mtime_ns]}, "keys": [image path per row],
            "shape": [N, L, D], "dtype": "float16"}

:class:`CachedFeatureDataset` serves ``{"image_embeds": (L, D), "text_input": ...}`` samples
instead of decoded images; models of this plugin skip their encoder when a batch carries
``image_embeds``. A cache built by another encoder, or for images that changed or are missing,
is refused with a message that says which and how to rebuild it.
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

logger = logging.getLogger(__name__)

META = "meta.json"
FEATS = "features.npy"


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
                        device: str | torch.device = "cpu", progress: bool = True) -> Path:
    """Encode every image of ``dataset`` (with its eval processor, no augmentation) into
    ``out_dir``. Written to a temporary folder and renamed, so a crash leaves no partial cache."""
    from PIL import Image

    out_dir = Path(out_dir)
    images = _unique_images(dataset)
    proc = dataset.vis_processor
    encoder = encoder.to(device).eval()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    feats = None
    it = range(0, len(images), batch_size)
    if progress:
        from lavis_plugins.common.progress import track

        it = track(it, len(it), "caching encoder features", unit="batch")
    for start in it:
        batch = []
        for p in images[start:start + batch_size]:
            try:
                batch.append(proc(Image.open(p).convert("RGB")))
            except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
                raise UserError(f"cannot decode image {p}: {e}") from e
        out = encoder(torch.stack(batch).to(device)).float().cpu().numpy().astype(np.float16)
        if feats is None:
            feats = np.lib.format.open_memmap(tmp / FEATS, mode="w+", dtype=np.float16,
                                              shape=(len(images),) + out.shape[1:])
        feats[start:start + len(batch)] = out
    if feats is None:
        raise UserError("the dataset has no images to cache")
    feats.flush()
    meta = {"encoder": encoder_fingerprint(encoder, image_size), "keys": images,
            "images": {p: _image_stat(p) for p in images}, "shape": list(feats.shape),
            "dtype": "float16"}
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
        raise UserError(f"feature cache {cache_dir}: {META} is unreadable ({e}); {rebuild}") from None
    need = {"encoder": str, "images": dict, "keys": list, "shape": list}
    wrong = [k for k, t in need.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), t)]
    if wrong:
        raise UserError(f"feature cache {cache_dir}: {META} lacks or mistypes {wrong}; {rebuild}")
    try:
        feats = np.load(cache_dir / FEATS, mmap_mode="r")
    except (OSError, ValueError) as e:  # a truncated .npy cannot be mapped
        raise UserError(f"feature cache {cache_dir}: {FEATS} is damaged or truncated ({e}); "
                        f"{rebuild}") from None
    if list(feats.shape) != list(meta["shape"]) or len(meta["keys"]) != feats.shape[0]:
        raise UserError(f"feature cache {cache_dir}: {FEATS} holds shape {list(feats.shape)} but "
                        f"{META} says {meta['shape']} for {len(meta['keys'])} images; {rebuild}")
    return meta


def check_feature_cache(cache_dir: str | Path, encoder: Optional[torch.nn.Module],
                        image_size: int, dataset=None) -> Dict[str, Any]:
    """Meta of a cache, after checking it matches ``encoder`` and ``dataset``'s images."""
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

    Sample: ``{"image_embeds": float tensor (L, D), "text_input": str, "image_id": ...}``.
    """

    def __init__(self, dataset, cache_dir: str | Path, encoder: Optional[torch.nn.Module],
                 image_size: int) -> None:
        meta = check_feature_cache(cache_dir, encoder, image_size, dataset)
        self.dataset = dataset
        self.row = {p: i for i, p in enumerate(meta["keys"])}
        self.feats = np.load(Path(cache_dir) / FEATS, mmap_mode="r")

    def __len__(self) -> int:
        return len(self.dataset.annotation)

    def __getitem__(self, idx: int) -> Dict[str, Any]:
        ann = self.dataset.annotation[idx]
        row = self.row[_image_path(self.dataset, ann)]
        caption = ann.get("caption", ann.get("text_input"))
        return {
            "image_embeds": torch.from_numpy(np.asarray(self.feats[row], dtype=np.float32)),
            "text_input": self.dataset.text_processor(caption),
            "image_id": ann.get("image_id", idx),
        }

    def collater(self, samples):
        return torch.utils.data.default_collate(samples)
