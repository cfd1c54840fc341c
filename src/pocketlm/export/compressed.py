"""compressed-tensors checkpoints: the packed format transformers and vLLM load.

Each quantized linear is stored as its integer codes packed into int32 words
(``weight_packed``, the library's ``pack-quantized`` format) with float16 scales per group and,
for asymmetric grids, packed integer zero points; every other tensor stays as it was. The
codes are the ones the quantizer chose (rebuilt from its records), shifted to the library's
signed range, so the checkpoint reads back to the very weights pocketlm evaluated.

compressed-tensors needs the group size to divide the row; a grid whose last group is shorter
(group 128 on a 576-wide row) is written with the largest group that does divide it, the
scales repeated, which costs the extra scale bits this reports. The library has no sparse
format since 0.15, so a pruned model's zeros are stored as codes like any other weight.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from ..context import QuantRecord
from ..errors import PocketError

WEIGHT_FILE = "model.safetensors"
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
          "chat_template.jinja")


def _library():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise PocketError("compressed-tensors is not installed; pip install compressed-tensors") from None
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    return pack_to_int32, unpack_from_int32


def stored_group(rec: QuantRecord) -> int:
    """The group size written: the record's, or the largest divisor of the row that it is a multiple of."""
    d_in, g = rec.shape[1], rec.spec.group_size
    return -1 if g == -1 else math.gcd(g, d_in)


def _as_grid(name: str, rec) -> QuantRecord:
    if isinstance(rec, QuantRecord):
        return rec
    grid = rec.as_grid()
    if grid is None:
        raise PocketError(f"{name} is on GGML type {rec.type}, which compressed-tensors cannot hold; export it as "
                          f"GGUF, or quantize with format gguf-q4_0/q5_0/q8_0 or bits/group_size for this export")
    return grid


def _check(name: str, rec: QuantRecord) -> None:
    if rec.spec.zero_bits not in (None, rec.spec.bits) and not rec.spec.sym:
        raise PocketError(f"{name} is on a grid with a float zero offset ({rec.spec.label()}, GGUF *_1 style), "
                          f"which compressed-tensors cannot hold; export it as GGUF instead")


def pack_linear(rec: QuantRecord, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one linear (names relative to the module)."""
    pack_to_int32, _ = _library()
    qw = rec.to_quantized(weight)
    bits, half = rec.spec.bits, 1 << (rec.spec.bits - 1)
    d_in = rec.shape[1]
    g, g_out = rec.spec.group_len(d_in), stored_group(rec)
    g_out = d_in if g_out == -1 else g_out
    idx = (torch.arange(0, d_in, g_out) // g).long()  # each stored group's source group
    out = {"weight_packed": pack_to_int32((qw.codes.to(torch.int16) - half).to(torch.int8), bits),
           "weight_scale": qw.scales[:, idx].to(torch.float16).contiguous(),
           "weight_shape": torch.tensor(rec.shape, dtype=torch.int64)}
    if not rec.spec.sym:
        zp = (qw.zeros[:, idx].to(torch.int16) - half).to(torch.int8)
        out["weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0).contiguous()
    return out


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


def _scheme_key(rec: QuantRecord) -> tuple[int, int, bool]:
    return rec.spec.bits, stored_group(rec), rec.spec.sym


def quantization_config(records: dict[str, QuantRecord]) -> dict:
    """The ``quantization_config`` block of config.json: one config group per distinct grid,
    targeting its linears by name; everything else is left unquantized."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups: dict[tuple, list[str]] = {}
    for name, rec in records.items():
        groups.setdefault(_scheme_key(rec), []).append(name)
    config_groups = {}
    for k, ((bits, group, sym), names) in enumerate(sorted(groups.items())):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym,
                                strategy="channel" if group == -1 else "group",
                                group_size=None if group == -1 else group, scale_dtype=torch.float16)
        config_groups[f"group_{k}"] = QuantizationScheme(targets=sorted(names), weights=args, format="pack-quantized")
    cfg = QuantizationConfig(config_groups=config_groups, format="pack-quantized", quantization_status="compressed",
                             ignore=["lm_head"])
    import compressed_tensors

    return {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
            **cfg.model_dump(exclude={"quant_method"}, mode="json")}


def storage_report(records: dict[str, QuantRecord], state: dict[str, torch.Tensor]) -> dict:
    """Bits the quantized linears take in the checkpoint (packed codes, scales, zero points)
    against the bits their grids promise."""
    promised = sum(r.storage_bits for r in records.values())
    stored = sum(t.numel() * t.element_size() * 8 for k, t in state.items()
                 if k.rsplit(".", 1)[0] in records and k.rsplit(".", 1)[1] != "weight_shape")
    params = sum(r.shape[0] * r.shape[1] for r in records.values())
    return {"params": params, "bpw_promised": round(promised / params, 6), "bpw_stored": round(stored / params, 6)}


def write(model, records: dict[str, QuantRecord], out_dir: str | Path, source_dir: str | Path | None = None) -> dict:
    """Write ``model`` with its quantized linears packed into ``out_dir`` (an empty directory)."""
    from safetensors.torch import save_file

    if not records:
        raise PocketError("the model has no quantized linears; compress it with rtn/gptq/aptq before a "
                          "compressed-tensors export (or export GGUF F16)")
    # linears only: a quantized token embedding stays float here (compressed-tensors packs linears)
    records = {name: _as_grid(name, rec) for name, rec in records.items()
               if isinstance(model.get_submodule(name), torch.nn.Linear)}
    for name, rec in records.items():
        _check(name, rec)
    out_dir = Path(out_dir)
    cfg = model.config
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    state: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        lin = key.removesuffix(".weight")
        if key.endswith(".weight") and lin in records:
            for k, v in pack_linear(records[lin], t.detach().float().cpu()).items():
                state[f"{lin}.{k}"] = v
        else:
            state[key] = t.detach().cpu().contiguous()
    save_file(state, str(out_dir / WEIGHT_FILE), metadata={"format": "pt"})
    conf = cfg.to_dict()
    conf["quantization_config"] = quantization_config(records)
    conf["torch_dtype"] = conf.get("torch_dtype") or "float32"
    (out_dir / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True, default=str))
    if source_dir is not None:
        for f in COPIED:
            if (Path(source_dir) / f).is_file():
                shutil.copy2(Path(source_dir) / f, out_dir / f)
    return storage_report(records, state)


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
