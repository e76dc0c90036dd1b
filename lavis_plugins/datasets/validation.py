"""Checks of dataset records and image files, so bad data is one clear line instead of a
traceback at the first batch (or a silent wrong run).

- :func:`check_text_fields`: when a dataset is built, every record's caption / question / answer
  fields must be non-empty strings (or lists of them); the first bad record is named with its
  index and file.
- :func:`check_image_file`: when a sample is read, its image must exist, be non-empty and decode
  completely. LAVIS turns on PIL's ``LOAD_TRUNCATED_IMAGES`` when imported, so a truncated
  image would otherwise train silently with grey pixels; here it is decoded with that switch off.
  A failure raises :class:`BadSample`, which the runner's ``run.on_bad_sample`` policy handles
  (``fail``: stop with the message; ``skip``: leave the sample out and count it).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping, Sequence

from lavis_plugins.common.errors import UserError


class BadSample(UserError):
    """One sample cannot be read (missing, empty, truncated or non-image file)."""


def _text_ok(value: Any, allow_list: bool) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    if allow_list and isinstance(value, (list, tuple)) and value:
        return all(isinstance(v, str) and v.strip() for v in value)
    return False


def check_text_fields(records: Sequence[Mapping[str, Any]], fields: Mapping[str, bool],
                      source: str) -> None:
    """Every record holds each of ``fields`` as a non-empty string (or, where ``fields[name]``
    is True, a non-empty list of them); else a ``UserError`` naming the first bad record."""
    for i, rec in enumerate(records):
        for name, allow_list in fields.items():
            value = rec.get(name) if isinstance(rec, Mapping) else None
            if not _text_ok(value, allow_list):
                kind = "a non-empty string" + (" or a list of them" if allow_list else "")
                got = "missing" if not isinstance(rec, Mapping) or name not in rec else repr(value)
                raise UserError(f"{source}: record {i} has a bad {name!r} ({got}); it must be "
                                f"{kind}. Fix or remove that record")


def check_image_file(path: str) -> None:
    """Raise :class:`BadSample` unless ``path`` is an image that decodes completely."""
    load_checked_image(path)


def load_checked_image(path: str):
    """``path`` as an RGB PIL image, decoded once with the checks of :func:`check_image_file`
    (a dataset that reads the image itself uses this instead of checking, then decoding again)."""
    from PIL import Image

    if not os.path.isfile(path):
        raise BadSample(f"image {path} does not exist (named by the annotation); restore it or "
                        "set run.on_bad_sample: skip")
    if os.path.getsize(path) == 0:
        raise BadSample(f"image {path} is empty (0 bytes); restore it or set "
                        "run.on_bad_sample: skip")
    try:
        with strict_pil_decoding(), Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        reason = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise BadSample(f"image {path} cannot be decoded ({reason}): "
                        "a truncated or non-image file; restore it or set run.on_bad_sample: "
                        "skip") from None


@contextlib.contextmanager
def strict_pil_decoding() -> Iterator[None]:
    """PIL raises on a truncated image inside the block: LAVIS sets
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` globally on import, which fills a cut file's missing
    rows with grey silently."""
    from PIL import ImageFile

    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def one_line(err: BaseException) -> str:
    """The message of ``err`` without the traceback a DataLoader worker wraps it in."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


BAD_SAMPLE_KEY = "_bad_samples"  # batch key: how many samples of the batch were left out

