"""Weights come from local files: names and URLs are resolved here, in seconds, or refused.

transformers retries the hub for a name that is not a local folder (about 30 tries, over two
minutes, offline) and LAVIS downloads a URL ``pretrained`` on first use (a raw URLError after
about 20 s offline). Every model path goes through these functions before transformers or LAVIS
see it, so a missing file is one line naming the config key and the local-path fix.
Downloads happen only when the user opts in with ``LAVIS_PLUGINS_ALLOW_DOWNLOAD=1``.
"""
from __future__ import annotations

import os
from typing import Optional

from lavis_plugins.common.errors import UserError

ALLOW_DOWNLOAD_ENV = "LAVIS_PLUGINS_ALLOW_DOWNLOAD"


def downloads_allowed() -> bool:
    """Whether the user opted in to downloading URL checkpoints
    (``LAVIS_PLUGINS_ALLOW_DOWNLOAD=1``)."""
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


def is_url(value: Optional[str]) -> bool:
    return isinstance(value, str) and value.split("://", 1)[0] in ("http", "https")


def check_checkpoint_source(value: Optional[str], key: str) -> None:
    """Refuse, before a model is built (seconds, not minutes), a checkpoint for ``key`` that is a
    URL while downloads are not allowed, or a local path that does not exist."""
    if not value:
        return
    if is_url(value):
        if not downloads_allowed():
            raise UserError(
                f"model.{key} is a URL ({value}) and nothing is downloaded unless you opt in: "
                f"download the file and set model.{key}=<local .pth>, or set "
                f"{ALLOW_DOWNLOAD_ENV}=1 to let LAVIS download it.")
    elif not os.path.exists(value):
        raise UserError(f"model.{key} {value!r} does not exist; give the local path of a LAVIS "
                        ".pth checkpoint (or of a transformers BLIP-2 folder)")


def local_checkpoint(value: str, key: str) -> str:
    """A checkpoint path that exists on this machine: a local file, or a URL downloaded into
    LAVIS's cache when the user opted in (see :func:`check_checkpoint_source`)."""
    if is_url(value):
        check_checkpoint_source(value, key)
        from lavis.common.dist_utils import download_cached_file

        return download_cached_file(value, check_hash=False, progress=True)
    if not os.path.isfile(value):
        raise UserError(f"model.{key} {value!r} is not a file; give the local path of a LAVIS "
                        ".pth checkpoint")
    return value


def local_hf_folder(value: Optional[str], key: str, what: str) -> str:
    """A transformers folder for ``key``: ``value`` when it is a local folder, or the snapshot of
    a hub name that is already in the local hub cache. Never contacts the hub.

    Args:
        value: the configured folder or hub name.
        key: the config key, for the message (e.g. ``"model.bert_path"``).
        what: what the folder must hold, for the message (e.g. ``"a BERT (config.json, ...)"``).
    """
    if value and os.path.isdir(value):
        return value
    if value and not is_url(value):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(value, local_files_only=True)
        except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
            pass
    raise UserError(
        f"{key} is {value!r}, which is neither a local folder nor in the local hub cache (no "
        f"download is tried). Point it at a folder holding {what}, e.g. after `huggingface-cli "
        f"download {value or '<repo>'} --local-dir <folder>`.")
