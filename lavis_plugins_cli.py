"""The ``lavis-plugins`` console script.

It lives outside the ``lavis_plugins`` package because importing a package module imports the
package first, and ``import lavis_plugins`` registers the plugin into LAVIS (``import lavis``:
15-20 s). Importing this module first tells the package to defer that until a command needs it,
so ``lavis-plugins --help`` answers in well under 2 s. ``python -m lavis_plugins.cli`` (what
torchrun launches) registers at import, as any other user of the package.
"""
from typing import Optional, Sequence

DEFER_REGISTRATION = True


def main(argv: Optional[Sequence[str]] = None) -> int:
    from lavis_plugins.cli import main as cli_main

    return cli_main(argv)
