"""Where the shipped YAMLs live, in a source checkout and in an installed wheel."""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def resource_dir(kind: str) -> Path:
    """Folder holding the shipped ``configs`` or ``projects`` YAMLs.

    A wheel carries them as package data inside ``lavis_plugins/``; a source checkout (editable
    install) keeps them at the repository root, beside the package.
    """
    if kind not in ("configs", "projects"):
        raise ValueError(f"unknown resource kind {kind!r}; expected 'configs' or 'projects'")
    installed = PACKAGE_DIR / kind
    if installed.is_dir():
        return installed
    return PACKAGE_DIR.parent / kind


def config_path(relative: str) -> str:
    """Absolute path of a default YAML under ``configs/``.

    LAVIS joins default-config paths onto its own package folder; an absolute path escapes that
    join, so plugin classes always register absolute paths.
    """
    return str(resource_dir("configs") / relative)


def resolve_cfg_path(cfg_path: str) -> Path:
    """A user's ``--cfg-path``: as given, else relative to the shipped ``projects/`` folder."""
    p = Path(cfg_path)
    if p.is_file():
        return p.resolve()
    for root in (resource_dir("projects"), resource_dir("projects").parent):
        rel = Path(*p.parts[1:]) if p.parts and p.parts[0] == "projects" else p
        for cand in (root / p, root / rel):
            if cand.is_file():
                return cand
    from lavis_plugins.common.errors import UserError

    raise UserError(
        f"config file not found: {cfg_path!r}. Give a path to a YAML file, or one relative to "
        f"the shipped projects folder ({resource_dir('projects')}); see `lavis-plugins projects`."
    )
