"""What the report shows, read from pocketlm's output directories (their ``pocketlm.json``) and
from benchmark lines of other tools' files (llama.cpp, AutoRound), into plain records."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PocketError
from ..outdir import manifest

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Run:
    """One compressed model: its directory's manifest, with the views the report needs."""
    label: str
    path: Path
    manifest: dict
    layers: int | None = None

    @classmethod
    def load(cls, path: str | Path, label: str | None = None) -> "Run":
        p = Path(path)
        man = manifest(p) if p.is_dir() else None
        if man is None:
            raise PocketError(f"{path} is not a pocketlm output directory (no pocketlm.json); "
                              "pass the --out folder of pocketlm compress or recover")
        layers = None
        cfg = p / "config.json"
        if cfg.is_file():
            try:
                layers = json.loads(cfg.read_text()).get("num_hidden_layers")
            except (json.JSONDecodeError, UnicodeDecodeError):
                layers = None
        return cls(label or p.name, p, man, layers)

    @property
    def eval(self) -> dict:
        return self.manifest.get("eval") or {}

    @property
    def size(self) -> dict:
        return self.manifest.get("size") or {}

    def gguf(self) -> tuple[str, dict] | None:
        """The first GGUF export (its path inside the directory and its report), if any."""
        exports = self.manifest.get("exports") or {}
        return next(((k, v) for k, v in exports.items() if v.get("format") == "gguf"), None)

    def file_bytes(self) -> int | None:
        """Bytes of what a runtime loads: the GGUF export, else the whole directory."""
        g = self.gguf()
        return g[1].get("bytes") if g else self.manifest.get("bytes_on_disk")

    def stage(self, method: str) -> dict | None:
        return next((s for s in self.manifest.get("stages") or [] if s.get("method") == method), None)

    def point(self) -> dict:
        ev = self.eval
        return {"label": self.label, "bytes": self.file_bytes(), "kl": ev.get("kl"), "ppl": ev.get("ppl"),
                "top1": ev.get("top1"), "anchor": False}

    def allocation(self) -> tuple[list[str], list[str], list[list[float | None]], list[list[str]]] | None:
        """Per decoder layer and projection: the bits per weight of the grid each linear got."""
        lin = self.manifest.get("linears") or {}
        if not lin:
            return None
        return _grid({n: (r.get("bpw"), _grid_name(r)) for n, r in lin.items()}, "bpw")

    def sensitivity(self) -> tuple[list[str], list[str], list[list[float | None]], list[list[str]]] | None:
        """APTQ's estimated cost of each linear at the option the plan chose most often."""
        st = self.stage("aptq")
        if not st or not st.get("costs"):
            return None
        hist = st.get("plan_histogram") or {}
        common = max(hist, key=hist.get) if hist else None
        costs = st["costs"]
        if common and all(common in c for c in costs.values()):
            label = common
        else:
            label = next(iter(next(iter(costs.values()))))
        return _grid({n: (c.get(label), label) for n, c in costs.items()}, "estimated loss increase")


def _grid_name(r: dict) -> str:
    if "ggml_type" in r:
        return r["ggml_type"]
    g = r.get("group_size")
    return f"w{r.get('bits')}" + (f"-g{g}" if g and g > 0 else "")


def _where(name: str) -> tuple[int, str] | None:
    parts = name.split(".")
    i = next((k for k, p in enumerate(parts) if p.isdigit()), None)
    return None if i is None else (int(parts[i]), parts[-1])


def _grid(values: dict[str, tuple[float | None, str]], what: str):
    cells, cols = {}, []
    for name, (v, desc) in values.items():
        w = _where(name)
        if w is None:
            continue
        layer, proj = w
        if proj not in cols:
            cols.append(proj)
        cells[(layer, proj)] = (v, desc)
    if not cells:
        return None
    cols.sort(key=lambda c: PROJECTIONS.index(c) if c in PROJECTIONS else len(PROJECTIONS))
    layers = sorted({k[0] for k in cells})
    vals = [[cells.get((l, c), (None, ""))[0] for c in cols] for l in layers]
    tips = [[f"layer {l} {c}: {cells[(l, c)][1]}, {what} {cells[(l, c)][0]:.4g}" if (l, c) in cells
             and cells[(l, c)][0] is not None else "" for c in cols] for l in layers]
    return [str(l) for l in layers], cols, vals, tips


@dataclass
class Anchors:
    """Other tools' files measured by the same evaluation (bench/results/gguf.jsonl lines)."""
    points: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path | None) -> "Anchors":
        if path is None:
            return cls()
        p = Path(path)
        if not p.is_file():
            raise PocketError(f"anchors file {path} does not exist; give a benchmark's JSON lines "
                              "(e.g. bench/results/gguf.jsonl)")
        pts = []
        for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                raise PocketError(f"{path} line {n} is not JSON; give a benchmark's JSON lines") from None
            if not isinstance(r, dict) or r.get("source") not in ("llama.cpp", "auto-round"):
                continue
            if isinstance(r.get("bytes"), (int, float)) and isinstance(r.get("kl"), (int, float)) \
                    and math.isfinite(r["kl"]):
                pts.append({"label": r.get("config", "?"), "bytes": r["bytes"], "kl": r["kl"], "ppl": r.get("ppl"),
                            "top1": r.get("top1"), "anchor": True})
        return cls(pts)
