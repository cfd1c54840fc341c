"""How a transformers model's tensors sit in a GGUF file: names, the q/k row order of llama.cpp's
``llama`` graph, Gemma's norm offset; and a source that reads one tensor at a time from a
memory-mapped GGUF file (for streaming a model that does not fit in RAM).

llama.cpp's ``llama`` graph applies RoPE to interleaved pairs, transformers' Llama to the two
halves of each head, so llama.cpp's converter permutes the rows of q_proj and k_proj within each
head; Gemma 3's RMSNorms scale by (1 + w) where llama.cpp's scale by w, so its norm weights are
stored plus one. ``to_gguf`` / ``from_gguf`` apply these and their inverses.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import PocketError

#: transformers model_type -> llama.cpp architecture, and whether q/k rows need the RoPE permutation
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
                 "qwen3": ("qwen3", False), "gemma3_text": ("gemma3", False)}
#: architectures whose RMSNorm multiplies by (1 + weight)
UNIT_OFFSET_NORMS = ("gemma3_text",)


def rope_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's llama graph expects for q/k (leading dimension = output rows)."""
    d = rows.shape[0]
    return rows.reshape(n_head, 2, d // n_head // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def rope_unpermute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of ``rope_permute``: llama.cpp's q/k rows back in transformers' order."""
    d = rows.shape[0]
    return rows.reshape(n_head, d // n_head // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def permuted_heads(config, hf_name: str) -> int | None:
    """The head count whose RoPE permutation tensor ``hf_name`` carries in GGUF, or None."""
    if not ARCHITECTURES.get(config.model_type, (None, False))[1]:
        return None
    lin = hf_name.removesuffix(".weight")
    if lin.endswith("q_proj"):
        return config.num_attention_heads
    if lin.endswith("k_proj"):
        return getattr(config, "num_key_value_heads", config.num_attention_heads)
    return None


def name_map(config):
    """gguf-py's map from transformers tensor names to GGUF names for this config."""
    import gguf

    mt = getattr(config, "model_type", None)
    if mt not in ARCHITECTURES:
        raise PocketError(f"GGUF supports {', '.join(ARCHITECTURES)} models here, not '{mt}'")
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[ARCHITECTURES[mt][0].upper()], config.num_hidden_layers)


class GGUFSource:
    """Tensors of a GGUF file under their transformers names, each dequantized to float32 only
    when asked for (the file is memory-mapped; nothing else is read)."""

    ROWS = 4096  # rows dequantized at a time

    def __init__(self, path: str, config):
        from gguf import GGUFReader

        self.path, self.config = path, config
        self.reader = GGUFReader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.tmap = name_map(config)
        self.folder = None  # no side files (a generation config) to carry over

    def _gguf_name(self, name: str) -> str | None:
        g = self.tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        return g if g in self.tensors else None

    def __contains__(self, name: str) -> bool:
        return self._gguf_name(name) is not None

    def get(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        g = self._gguf_name(name)
        if g is None:
            raise PocketError(f"{self.path} has no tensor for {name}; the file does not match its metadata")
        t = self.tensors[g]
        shape = [int(v) for v in reversed(t.shape)]  # GGUF lists dimensions fastest first
        raw = t.data.reshape(shape[0], -1) if len(shape) > 1 else t.data.reshape(1, -1)
        out = np.empty((raw.shape[0], int(np.prod(shape)) // raw.shape[0]), dtype=np.float32)
        for r in range(0, raw.shape[0], self.ROWS):  # in row blocks: dequantize's temporaries stay small
            out[r:r + self.ROWS] = dequantize(raw[r:r + self.ROWS], t.tensor_type).reshape(-1, out.shape[1])
        x = torch.from_numpy(out).reshape(shape)
        n_head = permuted_heads(self.config, name)
        if n_head:
            x = rope_unpermute(x, n_head)
        if x.dim() == 1 and g.endswith("norm.weight") and self.config.model_type in UNIT_OFFSET_NORMS:
            x = x - 1.0
        self._drop_pages()
        return x

    def _drop_pages(self) -> None:
        """Unmap the file pages read so far from this process (the page cache keeps them), so
        that its resident memory does not grow to the whole file as the layers are read."""
        import mmap

        raw = getattr(self.reader.data, "_mmap", None)
        if raw is not None and hasattr(raw, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            raw.madvise(mmap.MADV_DONTNEED)
