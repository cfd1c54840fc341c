"""Exports that real runtimes load: GGUF (llama.cpp) and compressed-tensors (transformers, vLLM).

``export_model`` writes an in-memory model (``compress`` calls it for a recipe's ``export``
list); ``run_export`` loads a model or pocketlm output first (``pocketlm export``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ExportTarget(BaseModel):
    """One file a recipe asks ``compress`` to write next to the model."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["gguf", "compressed-tensors"]
    type: str = Field("F16", description="GGUF: type of linears not already on a GGUF grid (F16, F32, Q8_0, ...)")
    embed_type: str = Field("F16", description="GGUF: type of the token embedding")
    path: str | None = Field(None, description="file or folder inside the output directory "
                                               "(default model.gguf / compressed-tensors)")

    @field_validator("path")
    @classmethod
    def _inside(cls, v: str | None) -> str | None:
        """A recipe is untrusted input: its paths stay inside the output directory."""
        if v is None:
            return v
        p = Path(v)
        if not v.strip() or p.is_absolute() or v.startswith("~") or ".." in p.parts or p == Path("."):
            raise ValueError(f"export path '{v}' must be a relative path inside the output directory "
                             "(no absolute path, '~' or '..'), e.g. model.gguf or gguf/model.gguf")
        return v

    def check(self, config, stages=()) -> None:
        """Refuse, before any work, a target this model or these stages cannot be written to."""
        if self.format != "gguf":
            return
        from ..errors import PocketError
        from .ggml_blocks import format_for
        from .gguf import check_exportable, check_type

        check_exportable(config)
        check_type(self.type), check_type(self.embed_type)
        for k, st in enumerate(stages, 1):
            why = st.gguf_blocker(config)
            if why:
                raise PocketError(f"stage {k} ({st.method}): {why}")
        for k, st in enumerate(stages, 1):  # GGML type names always fit; integer grids must match one
            off = [g.label() for g in st.grids() if not isinstance(g, str) and format_for(g) is None]
            if off:
                raise PocketError(f"stage {k} ({st.method}) quantizes onto {off[0]}, which no GGUF block type holds; "
                                  f"give it format: gguf-q4_k (or formats: [...] for aptq), or drop the gguf export")

    def out_path(self, out_dir: Path) -> Path:
        return out_dir / (self.path or ("model.gguf" if self.format == "gguf" else "compressed-tensors"))


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export_model(model, tokenizer, records: dict, fmt: str, out: Path, qtype: str = "F16", embed_type: str = "F16",
                 source_gguf: str | None = None, source_dir: str | Path | None = None,
                 name: str | None = None, tensors=None) -> dict:
    """Write ``model`` to ``out`` (a .gguf file, or a new directory for compressed-tensors).
    ``tensors``: GGUF only, the (name, tensor) pairs of a streamed model, read one at a time."""
    out = Path(out)
    if fmt == "gguf":
        from . import gguf as G

        types = G.write(model, tokenizer, out, records, source_gguf, qtype, embed_type, name=name, tensors=tensors)
        counts = {t: list(types.values()).count(t) for t in sorted(set(types.values()))}
        return {"bytes": _size(out), "tensor types": counts}
    from . import compressed

    out.mkdir(parents=True, exist_ok=True)
    rep = compressed.write(model, records, out, source_dir)
    if tokenizer is not None and not (out / "tokenizer.json").is_file():
        tokenizer.save_pretrained(out)
    return {"bytes": _size(out), **rep}


def run_export(spec: str, fmt: str, out: Path, qtype: str = "F16", embed_type: str = "F16",
               overwrite: bool = False, stream: bool = False) -> dict:
    """Load ``spec`` (a pocketlm output keeps its quantizer's codes) and export it atomically.
    ``stream`` (GGUF): never hold the model, read and write one tensor at a time."""
    from .. import models
    from ..fsutil import atomic_dir, atomic_file
    from .saved import quant_records, source_gguf

    config = models.load_config(spec)
    if fmt == "gguf":
        from .gguf import check_exportable, check_type

        check_exportable(config)
        check_type(qtype), check_type(embed_type)  # an unknown type is refused before the model loads
    src = models.resolve(spec)
    records = quant_records(src.path) if src.kind == "dir" else {}
    if fmt == "compressed-tensors" and not records:
        from ..errors import PocketError

        raise PocketError(f"{spec} has no quantized linears; compress it with rtn/gptq/aptq before a "
                          f"compressed-tensors export (GGUF takes float models)")
    gguf_src = src.describe() if src.kind == "gguf" else source_gguf(src.path) if src.kind == "dir" else None
    tensors = None
    if stream:
        model, tok, tensors = _streamed(spec, fmt, src)
        records = quant_records(src.path, lazy=True) if src.kind == "dir" else {}
    else:
        model, tok, _ = models.load(spec)
    if fmt == "gguf":
        with atomic_file(out, overwrite=overwrite) as tmp:
            rep = export_model(model, tok, records, fmt, tmp, qtype, embed_type, gguf_src, name=Path(spec).name,
                               tensors=tensors)
    else:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            rep = export_model(model, tok, records, fmt, tmp, source_dir=src.path if src.kind == "dir" else None)
    rep["bytes"] = _size(out)
    return rep


def _streamed(spec: str, fmt: str, src):
    """(skeleton, tokenizer, tensors read one at a time) of ``spec`` for a streamed export."""
    from .. import outdir
    from ..checkpoint import is_checkpoint
    from ..errors import PocketError
    from ..stream import open_streamed, streamed_tensors

    if fmt != "gguf":
        raise PocketError("--stream exports GGUF only; a compressed-tensors export loads the model (drop --stream)")
    if src.kind == "dir" and ((Path(src.path) / outdir.SPARSE).is_file() or is_checkpoint(src.path)):
        raise PocketError(f"{spec} stores packed or sparse weights, which a streamed export does not read; "
                          "export it without --stream")
    model, tok, _, streamer = open_streamed(spec, None)
    return model, tok, streamed_tensors(model, streamer.source)
