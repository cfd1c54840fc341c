"""Reading compressed-tensors checkpoints (the pack-quantized format pocketlm and llm-compressor
write) back to float weights. The writer is ``export.compressed``; reading sits at the bottom,
beside the model loaders, so that loading a model needs nothing from the compression side.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import PocketError

WEIGHT_FILE = "model.safetensors"


def _library():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise PocketError("compressed-tensors is not installed; pip install compressed-tensors") from None
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    return pack_to_int32, unpack_from_int32


def unpack_linear(tensors: dict[str, torch.Tensor], bits: int, group: int, sym: bool) -> torch.Tensor:
    """Float32 weight from one linear's packed tensors (exact: float16 scale x small integer)."""
    _, unpack_from_int32 = _library()
    shape = torch.Size(tensors["weight_shape"].tolist())
    q = unpack_from_int32(tensors["weight_packed"], bits, shape).float()
    scale = tensors["weight_scale"].float()
    g = shape[1] if group in (-1, None) else group
    idx = torch.arange(shape[1]) // g
    if sym:
        return scale[:, idx] * q
    zp = unpack_from_int32(tensors["weight_zero_point"], bits, torch.Size((shape[0], scale.shape[1])), packed_dim=0)
    return scale[:, idx] * (q - zp.float()[:, idx])


def is_checkpoint(path: str | Path) -> bool:
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        q = json.loads(p.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return q.get("quant_method") == "compressed-tensors"


def read_weights(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict without its quantization block, float32 state dict) of a pack-quantized checkpoint."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    conf = json.loads((path / "config.json").read_text())
    q = conf.pop("quantization_config")
    try:
        tensors = load_file(str(path / WEIGHT_FILE))
    except (SafetensorError, OSError) as e:
        raise PocketError(f"{path / WEIGHT_FILE} is damaged or missing ({e}); re-export it") from None
    state = {k: v for k, v in tensors.items() if ".weight_" not in k}
    groups = list(q.get("config_groups", {}).values())
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        name = key.removesuffix(".weight_packed")
        group = _group_of(name, groups)
        if group is None:
            raise PocketError(f"{path}: no quantization config group targets {name}; the config is damaged")
        if group.get("format", q.get("format")) != "pack-quantized":
            raise PocketError(f"{path}: only the pack-quantized compressed-tensors format is read by pocketlm; "
                              f"load this checkpoint with transformers")
        w = group["weights"]
        parts = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".weight_")}
        try:
            state[f"{name}.weight"] = unpack_linear(parts, w["num_bits"], w.get("group_size") or -1, w["symmetric"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise PocketError(f"{path}: {name}'s packed tensors are inconsistent ({e}); re-export it") from None
    return conf, state


def _group_of(name: str, groups: list[dict]) -> dict | None:
    """The config group whose targets name this linear: its exact name, a ``re:`` pattern, or
    the class name ``Linear`` (how llm-compressor writes them)."""
    import re

    for g in groups:
        for t in g.get("targets", []):
            if t == name or t == "Linear" or (t.startswith("re:") and re.match(t[3:], name)):
                return g
    return None
