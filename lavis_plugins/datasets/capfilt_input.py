"""CapFilt's input: a LAVIS caption annotation file read as one item per image.

``[{"image": path relative to the image folder, "caption": str or [str, ...], ...}]`` (COCO /
VG / shapes caption format); the annotations of one image (several lines, or a caption list) are
its web captions, in file order. The file is only read.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from torch.utils.data import DataLoader, Dataset

from lavis_plugins.common.errors import UserError
from lavis_plugins.datasets.validation import load_checked_image


def read_caption_images(ann_path: Path, what: str) -> List[Dict[str, Any]]:
    """``[{"image", "web": [captions], "annotation": first annotation without its captions}]``,
    one per image in order of first appearance; a bad file or record is a ``UserError``."""
    try:
        data = json.loads(Path(ann_path).read_text())
    except FileNotFoundError:
        raise UserError(f"{what}: annotation file {ann_path} does not exist") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: annotation file {ann_path} cannot be read as JSON "
                        f"({e})") from None
    if not isinstance(data, list) or not data:
        raise UserError(f"{what}: {ann_path} must be a non-empty JSON list of "
                        "{\"image\", \"caption\"} records (LAVIS's caption format)")
    images: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
    for i, rec in enumerate(data):
        cap = rec.get("caption") if isinstance(rec, dict) else None
        caps = [cap] if isinstance(cap, str) else cap
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not isinstance(
                caps, list) or not caps or not all(isinstance(c, str) and c.strip() for c in caps):
            raise UserError(f"{what}: {ann_path} record {i} needs \"image\" (a path) and "
                            f"\"caption\" (a non-empty string or list of strings): {rec!r:.200}")
        entry = images.get(rec["image"])
        if entry is None:
            ann = {k: v for k, v in rec.items() if k not in ("caption", "captions")}
            images[rec["image"]] = {"image": rec["image"], "web": list(caps), "annotation": ann}
        else:
            entry["web"].extend(caps)
    return list(images.values())


class CapFiltInputDataset(Dataset):
    """Images with their web captions; item ``i``: ``{"image": (3, H, W), "index": i}``
    (captions and annotation fields stay in ``entries[i]``)."""

    def __init__(self, entries: List[Dict[str, Any]], image_root: Path, vis_processor: Callable,
                 text_processor: Optional[Callable[[str], str]], source: str) -> None:
        self.entries = entries
        self.image_root = Path(image_root)
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.source = source  # the annotation file (recorded in the output's state)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        image = load_checked_image(str(self.image_root / self.entries[index]["image"]))
        return {"image": self.vis_processor(image), "index": index}

    def work_plan(self, batch_size: int, world: int) -> List[Tuple[List[int], int]]:
        """``(indices, rank)`` per batch: runs of ``batch_size`` consecutive images, batch ``b``
        to rank ``b % world``."""
        n = len(self)
        return [(list(range(s, min(s + batch_size, n))), (s // batch_size) % world)
                for s in range(0, n, batch_size)]

    def iter_batches(self, batches: Sequence[int], plan: Sequence[Tuple[List[int], int]],
                     num_workers: int = 0) -> Iterator[Tuple[int, Dict[str, Any]]]:
        """``(b, batch)`` for the batches ``batches`` (in order): ``image`` (B, 3, H, W),
        ``index`` (B), ``web`` (B caption lists), ``bad`` (always empty: an unreadable image
        file stops the run with its name)."""
        loader = DataLoader(self, batch_sampler=[plan[b][0] for b in batches],
                            num_workers=num_workers)
        for b, batch in zip(batches, loader):
            idx = batch["index"].tolist()
            yield b, {"image": batch["image"], "index": idx,
                      "web": [self.entries[i]["web"] for i in idx], "bad": []}

    def example_image(self, index: int, entry: Mapping[str, Any]):
        """The PIL image of image ``index`` (for the report's example grid)."""
        from PIL import Image

        with Image.open(self.image_root / entry["image"]) as im:
            return im.convert("RGB")
