"""Read back what ``compress`` wrote: the quantizers' records and the model's source."""
from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from ..context import QuantRecord
from ..errors import PocketError
from ..outdir import QUANT, manifest


def quant_records(model_dir: str | Path) -> dict[str, QuantRecord]:
    """{linear: record} of a pocketlm output directory ({} for any other model)."""
    man = manifest(model_dir)
    if not man or not man.get("linears"):
        return {}
    path = Path(model_dir) / QUANT
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise PocketError(f"{path} is damaged or missing ({e}); re-run the compression that wrote it") from None
    out = {}
    for name, summary in man["linears"].items():
        try:
            out[name] = QuantRecord.from_saved(summary, tensors, name)
        except KeyError:
            raise PocketError(f"{path} has no scales for {name}; re-run the compression that wrote it") from None
    return out


def source_gguf(model_dir: str | Path) -> str | None:
    """The GGUF file a pocketlm output was made from, if it still exists (its tokenizer is reused)."""
    man = manifest(model_dir) or {}
    src = man.get("source") or ""
    return src if src.endswith(".gguf") and Path(src).is_file() else None
