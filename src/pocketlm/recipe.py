"""Recipes: an ordered list of validated stages, from YAML, a dict, or a named preset."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import PocketError
from .export import ExportTarget
from .methods import load_builtin_methods
from .stages import REGISTRY, Stage


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    description: str = ""
    stages: list[Stage] = Field(min_length=1)
    export: list[ExportTarget] = Field(default_factory=list,
                                       description="files compress writes next to the model (gguf, compressed-tensors)")

    @field_validator("stages", mode="before")
    @classmethod
    def _build_stages(cls, value: Any):
        load_builtin_methods()
        if not isinstance(value, list):
            raise ValueError("'stages' must be a list")
        out = []
        for i, raw in enumerate(value, 1):
            if isinstance(raw, Stage):
                out.append(raw)
                continue
            if not isinstance(raw, dict) or "method" not in raw:
                raise ValueError(f"stage {i} needs a 'method' key (one of: {', '.join(sorted(REGISTRY))})")
            method = raw["method"]
            if not isinstance(method, str) or method not in REGISTRY:
                raise ValueError(f"stage {i}: unknown method '{method}'; valid methods: {', '.join(sorted(REGISTRY))}")
            stage_cls = REGISTRY[method]
            try:
                out.append(stage_cls.model_validate(raw))
            except ValidationError as e:
                raise ValueError(f"stage {i} ({method}): {_one_line(e, stage_cls)}") from None
        return out

    def to_yaml(self) -> str:
        data = {"name": self.name, "description": self.description,
                "stages": [s.model_dump(mode="json") for s in self.stages]}
        if self.export:
            data["export"] = [e.model_dump(mode="json", exclude_none=True) for e in self.export]
        return yaml.safe_dump(data, sort_keys=False)

    @property
    def needs_calibration(self) -> bool:
        return any(s.needs_calibration for s in self.stages)


def _one_line(err: ValidationError, model_cls: type[BaseModel]) -> str:
    errs = err.errors()
    e = next((x for x in errs if x["type"] == "extra_forbidden"), errs[0])  # a typo explains the rest
    loc = ".".join(str(x) for x in e["loc"]) or "value"
    if e["type"] == "extra_forbidden":
        valid = ", ".join(k for k in model_cls.model_fields)
        return f"unknown key '{loc}'; valid keys: {valid}"
    msg = e["msg"].removeprefix("Value error, ")
    return f"'{loc}': {msg}"


def from_dict(data: dict, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise PocketError(f"{source}: a recipe is a mapping with a 'stages' list")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise PocketError(f"{source}: {_one_line(e, Recipe)}") from None


def from_yaml(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise PocketError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise PocketError(f"{path} is not UTF-8 text; save the recipe as UTF-8 YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise PocketError(f"{path}: not valid YAML{where}; check indentation and colons") from None
    return from_dict(data, str(path))


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str) -> int:
    """'95000000', '95MB' (10^6) or '90MiB' (2^20) -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise PocketError(f"--bytes '{text}' is not a size; write e.g. 95000000, 95MB or 90MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def with_budget(recipe: Recipe, bpw: float | None = None, nbytes: int | None = None) -> Recipe:
    """Set the budget of every stage that takes one (APTQ's bpw or bytes)."""
    if bpw is None and nbytes is None:
        return recipe
    stages, hit = [], False
    for s in recipe.stages:
        if "bpw" in type(s).model_fields:
            data = {**s.model_dump(), "bpw": bpw, "bytes": nbytes}
            try:
                s = type(s).model_validate(data)
            except ValidationError as e:
                raise PocketError(f"budget: {_one_line(e, type(s))}") from None
            hit = True
        stages.append(s)
    if not hit:
        raise PocketError(f"recipe '{recipe.name}' has no stage that takes a budget; --bpw/--bytes apply to aptq")
    return recipe.model_copy(update={"stages": stages})


def preset_names() -> list[str]:
    folder = resources.files("pocketlm") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset(name: str) -> Recipe:
    if name not in preset_names():
        raise PocketError(f"unknown preset '{name}'; presets: {', '.join(preset_names())}")
    text = (resources.files("pocketlm") / "presets" / f"{name}.yaml").read_text()
    return from_dict(yaml.safe_load(text), f"preset {name}")


def resolve(recipe: "Recipe | dict | str | Path") -> Recipe:
    """A Recipe from a Recipe, a dict, a preset name or a YAML path."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return from_dict(recipe)
    s = str(recipe)
    if s.endswith((".yaml", ".yml")) or Path(s).is_file():
        return from_yaml(s)
    return preset(s)
