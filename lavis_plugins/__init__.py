"""BLIP-2 pre-training, fine-tuning and zero-shot video transfer as plugins for Salesforce LAVIS.

``import lavis_plugins`` registers every plugin class (models, processors, dataset builders, tasks,
runner, lr schedulers) in LAVIS's registry under names that start with ``lp_``, so they never
clash with LAVIS's own names. LAVIS has no entry-point mechanism: a plugin registers by being
imported before configs are built, which the ``lavis-plugins`` CLI does for you.

The ``lavis-plugins`` console script (``lavis_plugins_cli``, outside this package) defers the
registration until a command needs it, so that ``--help`` does not pay for ``import lavis``
(15-20 s); :func:`register` does it (once) on demand.
"""
from __future__ import annotations

import sys
import warnings

__version__ = "0.1.0"

PREFIX = "lp_"

# the Python API, imported from lavis_plugins.api on first use (see __getattr__)
_API = ("load_model", "load_model_and_preprocess", "model_zoo", "plugin_names")
_registered = False


def register() -> None:
    """Import LAVIS, then every plugin module (their registry decorators run); idempotent."""
    global _registered
    if _registered:
        return
    _registered = True  # before the imports: a failure half-way must not register twice
    # fairscale 0.4.4 (LAVIS's pin) calls torch.cuda.amp.custom_fwd/custom_bwd, deprecated since
    # torch 2.4: two FutureWarnings on every start that no user can act on
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r".*torch\.cuda\.amp\.custom_(fwd|bwd)")
    # LAVIS 1.0.2's vqa_eval.py has regexes in plain strings ("\d"): Python 3.12 warns when it
    # first compiles that file
    warnings.filterwarnings("ignore", category=SyntaxWarning, message=r"invalid escape sequence")
    import lavis  # noqa: F401  LAVIS registers its own classes first; clashes then raise here.

    from lavis_plugins import (  # noqa: F401  imported for their registry decorators
        datasets,
        models,
        processors,
        runners,
        tasks,
    )
    from lavis_plugins.common import optim  # noqa: F401  the lr schedulers


def __getattr__(name: str):
    if name in _API:
        register()
        from lavis_plugins import api

        return getattr(api, name)
    raise AttributeError(f"module 'lavis_plugins' has no attribute {name!r}")


def _deferred() -> bool:
    return bool(getattr(sys.modules.get("lavis_plugins_cli"), "DEFER_REGISTRATION", False))


if not _deferred():
    register()

__all__ = ["PREFIX", "register", *_API]
