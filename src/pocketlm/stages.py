"""The extension point for compression methods.

A method is a recipe stage: a pydantic model (so recipes validate it) registered under its
``method`` name, with a ``run(ctx)`` that compresses ``ctx.model`` in place. Adding a method
is adding a module under ``prune/`` or ``quant/`` that defines one such class and decorates it
with ``@register`` (``methods`` finds it; other packages register through an entry point).
"""
from __future__ import annotations

import fnmatch
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

REGISTRY: dict[str, type["Stage"]] = {}


def register(cls: type["Stage"]) -> type["Stage"]:
    name = cls.model_fields["method"].default
    if not isinstance(name, str):
        raise TypeError(f"{cls.__name__} needs a default for its 'method' field")
    REGISTRY[name] = cls
    return cls


class Stage(BaseModel):
    """One step of a recipe. Subclasses declare ``method: Literal["name"] = "name"``."""

    model_config = ConfigDict(extra="forbid")

    method: str
    targets: list[str] = Field(default_factory=lambda: ["*.layers.*"],
                               description="glob patterns over linear names (default: decoder layers; add "
                                           "'lm_head' to include the head)")
    ignore: list[str] = Field(default_factory=list, description="glob patterns of linears to leave alone")

    #: Whether the stage needs calibration windows.
    needs_calibration: ClassVar[bool] = False
    #: Whether the stage needs the weights as they were before pruning (a mask rebuild).
    needs_dense_weights: ClassVar[bool] = False
    #: Whether the stage needs the model as it was before the recipe (a distillation teacher).
    needs_teacher: ClassVar[bool] = False

    def stream_blocker(self) -> str | None:
        """Why this stage cannot run on a model streamed layer by layer (``--stream``), if it
        cannot: a stage streams when all its work is one layer-by-layer pass."""
        return "it needs the whole model in memory at once"

    def memory_bytes(self, linears: dict[str, tuple[int, int]]) -> tuple[int, int] | None:
        """(bytes held through a decoder layer's turn, bytes allocated at most on top of them)
        for one layer with these linears ({name: (d_out, d_in)}), for the predicted peak; None
        when the stage cannot say."""
        return None

    def selects(self, name: str) -> bool:
        hit = any(fnmatch.fnmatchcase(name, p) for p in self.targets)
        return hit and not any(fnmatch.fnmatchcase(name, p) for p in self.ignore)

    def run(self, ctx) -> dict:
        """Compress ``ctx.model`` in place; return a small summary for the report."""
        raise NotImplementedError

    def grids(self) -> list:
        """What the stage may put linears on: integer grids (``quant.grid.QuantSpec``) or GGML
        type names; empty for a stage that does not quantize (the GGUF export checks these
        before any work)."""
        return []

    def gguf_blocker(self, config) -> str | None:
        """Why llama.cpp could not run this model after the stage, if it could not (checked
        before any work when a recipe exports GGUF)."""
        return None
