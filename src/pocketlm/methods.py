"""Discovery of compression methods: every module of the ``attention``, ``prune``, ``quant`` and ``recover`` packages is
imported (a module registers its stages with ``@stages.register``), then every entry point in
the ``pocketlm.methods`` group, so a third-party package adds a method by declaring one.

The method modules import ``stages`` to register; nothing below them imports the methods, so
the registry is filled from here, one level above both.
"""
from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

PACKAGES = ("attention", "prune", "quant", "recover")
ENTRY_POINT_GROUP = "pocketlm.methods"


def load_builtin_methods() -> None:
    """Import every module under ``pocketlm.attention``, ``.prune``, ``.quant`` and ``.recover``, and the plugins."""
    for pkg in PACKAGES:
        package = importlib.import_module(f"{__package__}.{pkg}")
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            importlib.import_module(info.name)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
