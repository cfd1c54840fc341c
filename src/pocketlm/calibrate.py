"""Layer-wise calibration: drive calibration windows through a model one decoder layer at a time.

The engine captures the inputs of decoder layer 0 for every window, then for each layer:
1. runs the layer on every window with forward hooks on the linears the processor wants,
   handing it each linear's inputs (so it can accumulate H = 2/N X X^T, column norms, ...);
2. lets the processor transform the layer (quantize, prune, ...);
3. recomputes the layer's outputs with the transformed layer when it changed (the
   "sequential" scheme: later layers see the errors of earlier ones) and moves on.
Only the current layer's inputs and outputs live in memory (or on disk with ``offload``).
With a ``stream.Streamer`` the layer's weights too: it is read from the source before its
windows run and written out (and freed) once transformed, with a journal to resume from.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import progress
from .models import ModelAdapter


class ActivationStore:
    """N hidden-state windows of shape (L, H), in RAM or in a memory-mapped file on disk."""

    def __init__(self, n: int, seq_len: int, hidden: int, dtype: torch.dtype, on_disk: bool = False):
        self.n = n
        self.dtype = dtype
        self._tmp = None
        if on_disk:
            self._tmp = tempfile.NamedTemporaryFile(prefix="pocketlm-acts-", suffix=".bin")
            np_dtype = np.float32 if dtype == torch.float32 else np.float16
            if dtype == torch.bfloat16:  # numpy has no bfloat16: keep the raw 16 bits
                np_dtype = np.int16
            self._arr = np.memmap(self._tmp.name, dtype=np_dtype, mode="w+", shape=(n, seq_len, hidden))
            self._data = torch.from_numpy(self._arr)
            if dtype == torch.bfloat16:
                self._data = self._data.view(torch.bfloat16)
        else:
            self._data = torch.empty(n, seq_len, hidden, dtype=dtype)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._data[i : i + 1]

    def __setitem__(self, i: int, value: torch.Tensor) -> None:
        self._data[i] = value.reshape(self._data.shape[1:]).to(self.dtype)

    def close(self) -> None:
        if self._tmp is not None:
            del self._data, self._arr
            self._tmp.close()
            self._tmp = None


@dataclass
class LayerView:
    """What a processor sees of the layer being processed."""

    index: int
    prefix: str  # e.g. "model.layers.3"
    module: nn.Module
    linears: dict[str, nn.Linear]  # full names -> modules
    inputs: ActivationStore
    kwargs: dict = field(repr=False, default_factory=dict)
    #: every layer's keyword arguments, by layer index (for methods that run later layers too)
    all_kwargs: list = field(repr=False, default_factory=list)
    #: run the layer under autocast to this dtype (e.g. bfloat16; the weights keep theirs)
    compute_dtype: torch.dtype | None = None

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for one window (inputs live on the CPU or disk; the layer may not)."""
        x = x.to(self.device)
        if self.compute_dtype is None:
            out = self.module(x, **self.kwargs)
        else:
            with torch.autocast(self.device.type, dtype=self.compute_dtype):
                out = self.module(x, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


class LayerProcessor:
    """A method's per-layer behaviour. Override what the method needs."""

    #: Does ``process`` change the layer (so its outputs must be recomputed)?
    modifies_layer: bool = True

    def begin(self, layer: LayerView) -> None:
        """Called before the layer's windows run (e.g. to hook a module other than a linear)."""

    def wants(self, name: str) -> bool:
        """Hook this linear (full name) and pass its inputs to ``observe``."""
        return False

    def observe(self, name: str, x: torch.Tensor) -> None:
        """Inputs of one hooked linear for one window, as (tokens, d_in)."""

    def share(self, name: str, source: str, x: torch.Tensor) -> None:
        """``name`` got the very same input tensor as ``source`` in this window (q/k/v, gate/up).
        Processors whose statistics depend only on the input can alias instead of recomputing."""
        self.observe(name, x)

    def process(self, layer: LayerView) -> None:
        """Transform the layer in place, after every window has been observed."""

    def after(self, layer: LayerView, outputs: ActivationStore) -> None:
        """Called with the layer's final outputs (e.g. for layer-similarity statistics)."""

    def finish(self, adapter: ModelAdapter, hidden: ActivationStore) -> "ActivationStore | None":
        """Called once with the last layer's outputs (before the final norm), e.g. for statistics
        of the output head's inputs; returning ``hidden`` keeps it (the engine does not close it)."""

    def state(self) -> dict:
        """What the processor carries from layer to layer (JSON-able), for a resumable run."""
        return {}

    def restore(self, state: dict) -> None:
        """Take back ``state()`` when a streamed run resumes."""


class _Stop(Exception):
    pass


class _Recorder(nn.Module):
    """Stands in for a decoder layer while inputs are captured: records the keyword arguments the
    model passes to that layer (and layer 0's hidden states), computes nothing."""

    def __init__(self, index: int, last: bool, seen: dict):
        super().__init__()
        self.index, self.last, self.seen = index, last, seen

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.seen["hidden"] = hidden_states
        self.seen.setdefault("kwargs", {})[self.index] = kwargs
        if self.last:
            raise _Stop
        return hidden_states


def capture_inputs(adapter: ModelAdapter, windows: torch.Tensor, offload: bool = False):
    """Inputs of decoder layer 0 for every window, and for each layer the keyword arguments the
    model passes it (position embeddings, masks), which are the same for windows of equal length
    but may differ between layers (sliding-window and global layers get different masks and
    rotary tables). The layers are swapped for recorders meanwhile, so nothing is computed."""
    model, layers = adapter.model, adapter.layers
    n, seq_len = windows.shape
    dev = next(model.parameters()).device
    store = ActivationStore(n, seq_len, model.config.hidden_size, model.dtype, offload)
    seen: dict = {}
    real = list(layers)
    for i in range(len(real)):
        layers[i] = _Recorder(i, i == len(real) - 1, seen)
    try:
        for i in range(n):
            try:
                model(windows[i : i + 1].to(dev), use_cache=False)
            except _Stop:
                pass
            store[i] = seen["hidden"]
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer
    kwargs = [{k: v for k, v in seen["kwargs"][i].items() if k != "hidden_states"} for i in range(len(real))]
    return store, kwargs


def run_layerwise(model: nn.Module, windows: torch.Tensor, processor: LayerProcessor,
                  offload: bool = False, description: str = "layers",
                  compute_dtype: torch.dtype | None = None, stream=None) -> None:
    """Drive ``windows`` (n, L) token ids through the model layer by layer (see module doc);
    ``compute_dtype`` runs the layers under autocast (bfloat16: 2-3x faster on CPUs with
    bfloat16 units; activations are kept in the model's dtype between layers).

    A processor that modifies layers needs one activation buffer: the observing pass discards
    its outputs, and the recomputing pass overwrites each window's input with its output.
    A read-only processor gets the observing pass's outputs in a second buffer.

    ``stream`` (a ``stream.Streamer``): the model is a skeleton; each layer is read before its
    turn and written and freed after it, a journal kept after each; a journal of this stage
    resumes the run at the layer after the last one written."""
    adapter = ModelAdapter(model)
    dec_prefix = _layers_prefix(model, adapter)
    if stream is not None:
        stream.load_resident()
    with torch.no_grad():
        inputs, kwargs = capture_inputs(adapter, windows, offload)
    n, seq_len = windows.shape
    outputs = None if processor.modifies_layer else \
        ActivationStore(n, seq_len, model.config.hidden_size, model.dtype, offload)
    n_layers = len(adapter.layers)
    start = stream.resumes_layers() if stream is not None else 0
    kept = None
    if start:
        processor.restore(stream.resume(inputs))
    try:
        with progress.bar(description, n_layers * n) as advance:
            if start:
                advance(start * n, note=f"resumed after {start}/{n_layers}")
            for idx in range(start, n_layers):
                layer = adapter.layers[idx] if stream is None else stream.load(idx)
                prefix = f"{dec_prefix}.{idx}"
                lin = {f"{prefix}.{k}": m for k, m in layer.named_modules() if isinstance(m, nn.Linear)}
                view = LayerView(idx, prefix, layer, lin, inputs, kwargs[idx], kwargs, compute_dtype)
                inputs, outputs = _one_layer(view, processor, inputs, outputs)
                if stream is not None:
                    stream.finish_layer(idx)
                    stream.checkpoint(idx, inputs, processor.state())
                advance(n, note=f"{idx + 1}/{n_layers}")
        kept = processor.finish(adapter, inputs)
    finally:
        if inputs is not kept:
            inputs.close()
        if outputs is not None:
            outputs.close()


def _one_layer(view: LayerView, processor: LayerProcessor, inputs: ActivationStore,
               outputs: ActivationStore | None) -> tuple[ActivationStore, ActivationStore | None]:
    """One layer's turn: observe it on every window (hooks on the linears the processor wants),
    let the processor transform it, and leave the layer's outputs in the returned first store."""
    n = len(inputs)
    processor.begin(view)
    last = {}  # the previous hooked input in this window, to detect shared inputs
    handles = [m.register_forward_hook(_observer(processor, name, last))
               for name, m in view.linears.items() if processor.wants(name)]
    try:
        # the observing pass; a modifying processor that hooks nothing skips it
        with torch.no_grad():
            for i in range(n if handles or outputs is not None else 0):
                out = view.forward(inputs[i])
                if outputs is not None:
                    outputs[i] = out
                last.clear()
    finally:
        for h in handles:
            h.remove()
    processor.process(view)
    if outputs is None:
        with torch.no_grad():
            for i in range(n):
                inputs[i] = view.forward(inputs[i])
        processor.after(view, inputs)
        return inputs, None
    processor.after(view, outputs)
    return outputs, inputs


def _observer(processor: LayerProcessor, name: str, last: dict):
    def hook(module, args, output):
        x = args[0]
        flat = x.reshape(-1, x.shape[-1])
        if last.get("x") is x:
            processor.share(name, last["name"], flat)
        else:
            last["x"], last["name"] = x, name
            processor.observe(name, flat)

    return hook


def _layers_prefix(model: nn.Module, adapter: ModelAdapter) -> str:
    for name, mod in model.named_modules():
        if mod is adapter.layers:
            return name
    raise RuntimeError("decoder layer list not found among the model's modules")
