"""Sparse storage of pruned linears: a bitmask (1 bit per weight, rows packed to bytes) plus the
kept values in row-major order, in ``sparse.safetensors`` beside the model's dense tensors.
N:M masks are stored the same way (at 1 bit per weight they cost what 2-bit indices of 2:4 do)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import PocketError



def pack(weight: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    w = weight.detach().cpu()
    keep = keep.cpu().bool()
    bits = torch.from_numpy(np.packbits(keep.numpy(), axis=1))
    return {"mask": bits, "values": w[keep].contiguous(),
            "shape": torch.tensor(list(w.shape), dtype=torch.int64)}


def unpack(mask: torch.Tensor, values: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    d_out, d_in = (int(x) for x in shape)
    keep = torch.from_numpy(np.unpackbits(mask.numpy(), axis=1, count=d_in).astype(bool))
    if keep.shape != (d_out, d_in) or int(keep.sum()) != values.numel():
        raise ValueError("mask and values disagree")
    w = torch.zeros(d_out, d_in, dtype=values.dtype)
    w[keep] = values
    return w


def save(model: nn.Module, masks: dict[str, torch.Tensor], path: Path) -> list[str]:
    """Write the pruned linears' weights sparsely; returns the state-dict keys it holds."""
    tensors, keys = {}, []
    for name, keep in masks.items():
        for part, t in pack(model.get_submodule(name).weight, keep).items():
            tensors[f"{name}.weight.{part}"] = t
        keys.append(f"{name}.weight")
    save_file(tensors, str(path), metadata={"format": "pocketlm-sparse-bitmask-v1"})
    return keys


def restore(model: nn.Module, path: Path) -> int:
    """Fill the model's pruned linears from ``path``; returns how many were restored."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise PocketError(f"{path} is damaged ({e}); re-run the compression that wrote it") from None
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    for key in names:
        try:
            w = unpack(tensors[f"{key}.mask"], tensors[f"{key}.values"], tensors[f"{key}.shape"])
            param = model.get_parameter(key)
        except (KeyError, AttributeError, ValueError) as e:
            raise PocketError(f"{path}: entry {key} is invalid ({e}); re-run the compression that wrote it") from None
        if tuple(param.shape) != tuple(w.shape):
            raise PocketError(f"{path}: {key} has shape {tuple(w.shape)}, the model expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(w.to(param.dtype))
    return len(names)


def masks(path: Path) -> dict[str, torch.Tensor]:
    """{linear name: kept-weights mask} of a ``sparse.safetensors`` file."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise PocketError(f"{path} is damaged ({e}); re-run the compression that wrote it") from None
    out = {}
    for key in sorted({k.rsplit(".", 1)[0] for k in tensors}):
        d_in = int(tensors[f"{key}.shape"][1])
        keep = np.unpackbits(tensors[f"{key}.mask"].numpy(), axis=1, count=d_in).astype(bool)
        out[key.removesuffix(".weight")] = torch.from_numpy(keep)
    return out
