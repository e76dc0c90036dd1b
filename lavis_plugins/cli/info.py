"""``lavis-plugins zoo|names``: what is registered."""
from __future__ import annotations


def _zoo(args) -> None:
    import lavis_plugins

    print(lavis_plugins.model_zoo())


def _names(args) -> None:
    import lavis_plugins

    for kind, names in lavis_plugins.plugin_names().items():
        print(f"{kind:<13} {', '.join(names) if names else '-'}")


def add_parsers(sub) -> None:
    sub.add_parser("zoo", help="list registered models and their types").set_defaults(func=_zoo)
    sub.add_parser("names", help="list the names this plugin registered").set_defaults(func=_names)
