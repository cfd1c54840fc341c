"""pocketlm's own compression methods, registered in ``stages.REGISTRY`` when first needed.

The method modules import ``stages`` (to register); nothing below them imports the methods, so
the registry is filled from here, one level above both.
"""
from __future__ import annotations

import importlib

BUILTIN = ("prune.barber", "prune.magnitude", "prune.shortgpt", "prune.sparsegpt", "prune.wanda",
           "quant.aptq", "quant.gptq", "quant.rtn")


def load_builtin_methods() -> None:
    """Import the modules that register pocketlm's own methods."""
    for name in BUILTIN:
        importlib.import_module(f"{__package__}.{name}")
