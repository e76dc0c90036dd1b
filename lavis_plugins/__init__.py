"""BLIP-2 pre-training, fine-tuning and zero-shot video transfer as plugins for Salesforce LAVIS.

``import lavis_plugins`` registers every plugin class (models, processors, dataset builders, tasks,
runner, lr schedulers) in LAVIS's registry under names that start with ``lp_``, so they never
clash with LAVIS's own names. LAVIS has no entry-point mechanism: a plugin registers by being
imported before configs are built, which the ``lavis-plugins`` CLI does for you.
"""
from __future__ import annotations

__version__ = "0.1.0"

PREFIX = "lp_"

import lavis  # noqa: E402,F401  LAVIS registers its own classes first; clashes then raise here.

from lavis_plugins import (  # noqa: E402,F401  imported for their registry decorators
    common,
    datasets,
    models,
    processors,
    runners,
    tasks,
)
from lavis_plugins.api import (  # noqa: E402
    load_model,
    load_model_and_preprocess,
    model_zoo,
    plugin_names,
)

__all__ = [
    "PREFIX",
    "load_model",
    "load_model_and_preprocess",
    "model_zoo",
    "plugin_names",
]
