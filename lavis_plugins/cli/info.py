"""``lavis-plugins zoo|names|projects``: what is registered, and the shipped experiment YAMLs."""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple


def _zoo(args) -> None:
    import lavis_plugins

    print(lavis_plugins.model_zoo())


def _names(args) -> None:
    import lavis_plugins

    for kind, names in lavis_plugins.plugin_names().items():
        print(f"{kind:<13} {', '.join(names) if names else '-'}")


def shipped_projects() -> List[Tuple[str, str]]:
    """``(path relative to the projects folder, what it runs)`` of every shipped experiment YAML;
    the description is the YAML's first comment line that is not its launch command."""
    from lavis_plugins.paths import resource_dir

    root = resource_dir("projects")
    out = []
    for path in sorted(root.rglob("*.yaml")):
        comments = [ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")]
        about = next((c for c in comments if c and not c.startswith(("lavis-plugins ", "torchrun",
                                                                      "python "))), "")
        out.append((str(Path("projects") / path.relative_to(root)), about))
    return out


def _projects(args) -> None:
    rows = shipped_projects()
    width = max(len(p) for p, _ in rows)
    for path, about in rows:
        print(f"{path:<{width}}  {about}")
    print("\nRun one with `lavis-plugins train|evaluate --cfg-path <path>`; its first line shows "
          "the full launch command.")


def add_parsers(sub) -> None:
    sub.add_parser("zoo", help="list registered models and their types").set_defaults(func=_zoo)
    sub.add_parser("names", help="list the names this plugin registered").set_defaults(func=_names)
    sub.add_parser("projects", help="list the shipped experiment YAMLs (--cfg-path values)"
                   ).set_defaults(func=_projects, registers=False)
