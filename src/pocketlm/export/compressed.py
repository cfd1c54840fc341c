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

from ..checkpoint import WEIGHT_FILE, _library, is_checkpoint, read_weights, unpack_linear  # noqa: F401
from ..context import QuantRecord
from ..errors import PocketError

COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
          "chat_template.jinja")


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
