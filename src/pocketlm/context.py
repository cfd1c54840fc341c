"""The state a recipe's stages share while they compress one model."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .data import DEFAULT_CALIBRATION, calibration_windows
from .errors import PocketError
from .models import ModelAdapter
from .quant.ggml import GGMLWeight
from .quant.grid import QuantizedWeight, QuantSpec, codes


@dataclass
class CalibrationConfig:
    windows: int = 128
    seq_len: int = 2048
    text: str = DEFAULT_CALIBRATION
    seed: int = 0
    offload: bool = False  # keep layer activations on disk instead of RAM


@dataclass
class QuantRecord:
    """What a quantizer chose for one linear: enough to rebuild its integer codes from the
    (dequantized) weight it left in the model, for packing and export."""

    method: str
    spec: QuantSpec
    scales: torch.Tensor  # d_out x n_groups
    zeros: torch.Tensor  # d_out x n_groups
    shape: tuple[int, int]

    def to_quantized(self, weight: torch.Tensor) -> QuantizedWeight:
        """The codes behind a weight this record's quantizer left in the model."""
        d_in = self.shape[1]
        idx = torch.arange(d_in) // self.spec.group_len(d_in)
        s, z = self.scales[:, idx], self.zeros[:, idx].float()
        q = codes(weight.detach().float().cpu(), s, z, self.spec.maxq).to(torch.uint8)
        return QuantizedWeight(self.spec, q, self.scales, self.zeros)

    @property
    def storage_bits(self) -> int:
        return self.spec.storage_bits(*self.shape)

    def summary(self) -> dict:
        s = self.spec
        return {"method": self.method, "bits": s.bits, "group_size": s.group_size, "sym": s.sym,
                "zero_bits": s.zero_bits, "signed_scale": s.signed_scale, "bpw": round(s.bpw(*self.shape), 6),
                "shape": list(self.shape)}

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.scales": self.scales.contiguous(), f"{name}.zeros": self.zeros.contiguous()}

    @classmethod
    def from_saved(cls, summary: dict, tensors: dict[str, torch.Tensor], name: str) -> "QuantRecord | GGMLRecord":
        """Rebuild a record from ``pocketlm.json``'s entry and ``quantization.safetensors``."""
        if "ggml_type" in summary:
            return GGMLRecord.from_saved(summary, tensors, name)
        scales, zeros = tensors[f"{name}.scales"], tensors[f"{name}.zeros"]
        spec = QuantSpec(bits=summary["bits"], group_size=summary["group_size"], sym=summary["sym"],
                         zero_bits=summary.get("zero_bits"), signed_scale=summary.get("signed_scale", False))
        return cls(summary["method"], spec, scales, zeros, tuple(summary["shape"]))


@dataclass
class GGMLRecord:
    """A linear a quantizer put on a GGML block type: the very bytes a GGUF file stores for it
    (rows in the model's order), from which the weight in the model dequantizes exactly."""

    method: str
    weight: GGMLWeight

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape

    @property
    def type(self) -> str:
        return self.weight.type

    @property
    def storage_bits(self) -> int:
        return self.weight.nbytes * 8

    def summary(self) -> dict:
        return {"method": self.method, "ggml_type": self.type, "bpw": round(self.weight.bpw, 6),
                "shape": list(self.shape)}

    def saved_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.ggml": torch.from_numpy(self.weight.data.copy())}

    #: the GGML types that are plain symmetric integer grids: (bits, codes' zero point)
    INTEGER_GRIDS = {"Q4_0": (4, 8), "Q5_0": (5, 16), "Q8_0": (8, 128)}

    def as_grid(self) -> "QuantRecord | None":
        """The same weights as a pocketlm integer grid (groups of 32, a float16 scale each) when
        the type is one (Q4_0, Q5_0, Q8_0), else None."""
        if self.type not in self.INTEGER_GRIDS:
            return None
        bits, zero = self.INTEGER_GRIDS[self.type]
        d_out, d_in = self.shape
        blocks = self.weight.data.reshape(d_out, d_in // 32, -1)
        d = torch.from_numpy(blocks[..., :2].copy().view(np.float16).astype(np.float32)).reshape(d_out, -1)
        spec = QuantSpec(bits=bits, group_size=32, sym=True, signed_scale=bits < 8)
        return QuantRecord(self.method, spec, d, torch.full_like(d, zero, dtype=torch.uint8), self.shape)

    @classmethod
    def from_saved(cls, summary: dict, tensors: dict[str, torch.Tensor], name: str) -> "GGMLRecord":
        data = tensors[f"{name}.ggml"].numpy()
        return cls(summary["method"], GGMLWeight(summary["ggml_type"], tuple(summary["shape"]), data))


@dataclass
class Context:
    model: nn.Module
    tokenizer: object = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    calib_windows: torch.Tensor | None = None
    quant: dict[str, "QuantRecord | GGMLRecord"] = field(default_factory=dict)
    device: str = "cpu"
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # pruned linears: True = weight kept
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # their weights before pruning, if kept
    keep_dense: bool = False  # a later stage (a mask rebuild) needs the dense weights
    pruned_by: str | None = None  # the method that chose the masks
    teacher: nn.Module | None = None  # the model before the recipe, for stages that distil from it
    stream: object = None  # a stream.Streamer when the model is streamed layer by layer (larger than RAM)

    def __post_init__(self):
        self.adapter = ModelAdapter(self.model)

    def linears(self) -> dict[str, nn.Linear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, nn.Linear)}

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def windows(self) -> torch.Tensor:
        """Calibration windows (n, L), drawn once and shared by every stage."""
        if self.calib_windows is None:
            if self.tokenizer is None:
                raise PocketError("this recipe needs calibration data: pass a tokenizer or calibration windows")
            c = self.calibration
            self.calib_windows = calibration_windows(self.tokenizer, c.windows, c.seq_len, c.text, c.seed)
        return self.calib_windows

    def prune(self, name: str, keep: torch.Tensor, method: str, weight: torch.Tensor | None = None) -> None:
        """Zero the weights of linear ``name`` outside ``keep`` (after replacing them with
        ``weight``, for pruners that update the kept weights) and remember the mask and, when a
        later stage needs them, the dense weights."""
        lin = self.module(name)
        with torch.no_grad():
            if self.keep_dense and name not in self.dense:
                self.dense[name] = lin.weight.detach().to("cpu", copy=True)
            if weight is not None:
                lin.weight.copy_(weight.to(lin.weight.dtype))
            lin.weight.mul_(keep.to(lin.weight.device, lin.weight.dtype))
        self.masks[name] = keep.to("cpu", torch.bool)
        self.pruned_by = method

    def rename_layers(self, mapping: dict[int, int], prefix: str) -> None:
        """Follow a change of decoder-layer indices (layer removal) in the per-linear records;
        records of removed layers are dropped."""
        def move(d: dict) -> dict:
            out = {}
            for name, v in d.items():
                head = f"{prefix}."
                if not name.startswith(head):
                    out[name] = v
                    continue
                idx, rest = name[len(head):].split(".", 1)
                if int(idx) in mapping:
                    out[f"{head}{mapping[int(idx)]}.{rest}"] = v
            return out

        self.quant, self.masks, self.dense = move(self.quant), move(self.masks), move(self.dense)

    def restore_records(self, summaries: dict, tensors: dict) -> None:
        self.quant = {n: QuantRecord.from_saved(s, tensors, n) for n, s in summaries.items()}

    def record_quant(self, name: str, qw: QuantizedWeight, method: str) -> None:
        self.quant[name] = QuantRecord(method, qw.spec, qw.scales, qw.zeros, tuple(qw.codes.shape))

    def record_ggml(self, name: str, weight: GGMLWeight, method: str) -> None:
        self.quant[name] = GGMLRecord(method, weight)

    def other_params(self, quantized_linears) -> int:
        """Parameters outside the given linears' weights (tied tensors counted once)."""
        qnames = {f"{n}.weight" for n in quantized_linears}
        seen, other = set(), 0
        for n, p in self.model.named_parameters():
            if n not in qnames and id(p) not in seen:  # id: a streamed model's parameters may be on meta
                other += p.numel()
            seen.add(id(p))
        return other

    def size_report(self) -> dict:
        """Bits of the quantized linears (codes + scales + zeros) and of the whole model when
        the other tensors are kept in 16-bit. A pruned linear stores a bitmask (1 bit per
        weight) and only its kept weights (quantized or 16-bit)."""
        q_bits = 0
        for name, r in self.quant.items():
            keep = self.masks.get(name)
            if keep is None or isinstance(r, GGMLRecord):  # a GGML type stores zeros as codes
                q_bits += r.storage_bits
            else:
                n_groups = r.spec.n_groups(r.shape[1])
                q_bits += int(keep.sum()) * r.spec.bits + r.shape[0] * n_groups * r.spec.param_bits + keep.numel()
        q_params = sum(r.shape[0] * r.shape[1] for r in self.quant.values())
        sparse_only = {n: k for n, k in self.masks.items() if n not in self.quant}
        s_bits = sum(int(k.sum()) * 16 + k.numel() for k in sparse_only.values())
        s_params = sum(k.numel() for k in sparse_only.values())
        other = self.other_params([*self.quant, *sparse_only])
        total_params = q_params + s_params + other
        total_bits = q_bits + s_bits + 16 * other
        kept = sum(int(k.sum()) for k in self.masks.values())
        total_masked = sum(k.numel() for k in self.masks.values())
        return {
            "quantized_params": q_params,
            "bpw_quantized": round(q_bits / q_params, 6) if q_params else None,
            "pruned_params": total_masked,
            "sparsity": round(1 - kept / total_masked, 6) if total_masked else None,
            "other_params_16bit": other,
            "bpw_model": round(total_bits / total_params, 6),
            "packed_bytes": total_bits // 8,
        }
