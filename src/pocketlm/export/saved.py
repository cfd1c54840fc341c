"""Read back what ``compress`` wrote: the quantizers' records and the model's source."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..context import QuantRecord
from ..errors import PocketError
from ..outdir import QUANT, manifest


def quant_records(model_dir: str | Path, lazy: bool = False) -> Mapping[str, QuantRecord]:
    """{linear: record} of a pocketlm output directory ({} for any other model). ``lazy``: each
    record is read from the file when asked for (a streamed export holds one at a time)."""
    man = manifest(model_dir)
    if not man or not man.get("linears"):
        return {}
    path = Path(model_dir) / QUANT
    try:
        tensors = _Tensors(safe_open(str(path), "pt")) if lazy else load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise PocketError(f"{path} is damaged or missing ({e}); re-run the compression that wrote it") from None
    records = _Records(path, man["linears"], tensors)
    return records if lazy else {name: records[name] for name in records}


class _Records(Mapping):
    """{linear: record} built from the saved tensors when asked for."""

    def __init__(self, path: Path, summaries: dict, tensors):
        self.path, self.summaries, self.tensors = path, summaries, tensors

    def __getitem__(self, name: str) -> QuantRecord:
        summary = self.summaries[name]  # KeyError: not a quantized linear, as a dict says
        try:
            return QuantRecord.from_saved(summary, self.tensors, name)
        except KeyError:
            raise PocketError(f"{self.path} has no scales for {name}; re-run the compression that wrote it") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.summaries)

    def __len__(self) -> int:
        return len(self.summaries)


class _Tensors:
    """``tensors[key]`` read from an open safetensors file; a missing key raises KeyError."""

    def __init__(self, file):
        self.file, self.keys = file, set(file.keys())

    def __getitem__(self, key: str):
        if key not in self.keys:
            raise KeyError(key)
        return self.file.get_tensor(key)


def source_gguf(model_dir: str | Path) -> str | None:
    """The GGUF file a pocketlm output was made from, if it still exists (its tokenizer is reused)."""
    man = manifest(model_dir) or {}
    src = man.get("source") or ""
    return src if src.endswith(".gguf") and Path(src).is_file() else None
