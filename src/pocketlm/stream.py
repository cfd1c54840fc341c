"""Models larger than RAM: a model skeleton on the ``meta`` device whose parts are read from the
source only while the engine works on them, and written out as soon as they are done.

The decoder layers are the unit: ``Streamer.load`` reads one layer's tensors from the source
(safetensors shards through ``safe_open``, or a memory-mapped GGUF file's tensors dequantized,
one tensor at a time), the engine calibrates and
transforms it, ``Streamer.finish_layer`` writes it to its own shard and returns it to ``meta``.
The parts outside the layers (embedding, final norm, head) stay loaded for the whole run. Peak
memory is therefore one layer + those parts + the calibration activations (which ``offload``
puts on disk).

A stage that finishes hands its shards to the next stage as its source. After every layer the
streamer writes a journal (layers done, the activations entering the next layer, each done
layer's quantizer records and the processor's state), so a killed run resumes at the next layer
and ends with the very bytes an uninterrupted run writes.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import memory
from .errors import PocketError
from .fsutil import atomic_file

INDEX = "model.safetensors.index.json"
JOURNAL = "journal.json"


class SafetensorsSource:
    """Tensors of a transformers directory (``model.safetensors`` or shards with their index),
    read one at a time; nothing is read until asked for."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            self.where = {k: self.folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (self.folder / "model.safetensors").is_file():
            from safetensors import safe_open

            single = self.folder / "model.safetensors"
            with safe_open(str(single), "pt") as f:
                self.where = {k: single for k in f.keys()}
        else:
            raise PocketError(f"{folder} holds no safetensors weights (model.safetensors or {INDEX}); "
                              "streaming reads a transformers directory saved with safetensors")

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.where:
            raise PocketError(f"{self.folder} has no tensor {name}; the weights do not match the config")
        with safe_open(str(self.where[name]), "pt") as f:
            return f.get_tensor(name)


def skeleton(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model with every parameter on ``meta`` (no memory) and its buffers (rotary tables)
    real, in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    mod = module.get_submodule(owner) if owner else module
    old = mod._parameters[leaf]
    mod._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)


def _unload(module: nn.Module) -> None:
    """Return a module's parameters to ``meta`` (freeing them); buffers (computed, not read)
    stay."""
    for name, p in list(module.named_parameters()):
        _set(module, name, torch.empty_like(p, device="meta"))


def _layer_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise PocketError("decoder layer list not found among the model's modules")


class Streamer:
    """Reads a skeleton model's parts from ``source`` and writes the transformed ones under
    ``work`` (one safetensors file per decoder layer, one for the rest)."""

    #: least time between two journal entries within a stage (POCKETLM_CHECKPOINT_SECONDS)
    CHECKPOINT_SECONDS = float(os.environ.get("POCKETLM_CHECKPOINT_SECONDS", "60"))

    def __init__(self, model: nn.Module, source: SafetensorsSource, work: "str | os.PathLike | None",
                 device: str = "cpu"):
        """``work`` None: a read-only pass (evaluation): layers are freed, nothing is written."""
        from .models import ModelAdapter

        self.model, self.source, self.device = model, source, device
        self.origin = source.folder  # the model's own directory (its side files: generation config)
        self.work = Path(work) if work is not None else None  # made when the first file is written
        self.layers = ModelAdapter(model).layers
        self.prefix = _layer_prefix(model, self.layers)
        self.stage = 0  # which stage's shards are being written
        self.resident = False
        self._journaled = time.monotonic()
        #: set by the pipeline: () -> {linear: quantizer record} so far, for the journal
        self.records = None
        #: and (summaries, tensors) -> None, to take them back when a run resumes
        self.restore_records = None
        #: the reports of the stages finished so far (kept in the journal)
        self.reports: list[dict] = []
        #: the journal's record files, and the records written to them (to see a record replaced)
        self._record_files: list[str] = []
        self._written: dict[str, object] = {}
        j = self.journal() if self.work is not None else None
        if j is not None:  # a stopped run: go on from the stage it was in
            self.stage, self.reports = j["stage"], list(j["reports"])
            self._record_files = list(j["record_files"])
            if self.stage > 0:
                self.source = SafetensorsSource(self.stage_dir(self.stage - 1))

    # --- loading --------------------------------------------------------------------------
    def _load(self, module: nn.Module, prefix: str) -> None:
        with memory.mapped_allocations():  # a freed layer goes back to the kernel, not into the heap
            for name, p in list(module.named_parameters()):
                if p.device.type == "meta":
                    full = f"{prefix}.{name}" if prefix else name
                    _set(module, name, self.source.get(full).to(self.device, p.dtype))

    def load_resident(self) -> None:
        """Read every tensor outside the decoder layers (embedding, final norm, head)."""
        if self.resident:
            return
        inside = {id(p) for p in self.layers.parameters()}
        tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        untied_head = False
        for name, p in list(self.model.named_parameters()):
            if id(p) in inside or p.device.type != "meta":
                continue
            if tied and name not in self.source:
                untied_head = True  # the head the source leaves to its embedding: tied below
                continue
            _set(self.model, name, self.source.get(name).to(self.device, p.dtype))
        if untied_head:  # as transformers does: a head stored beside the embedding stays its own
            self.model.tie_weights()
        self.resident = True

    def load(self, idx: int) -> nn.Module:
        layer = self.layers[idx]
        self._load(layer, f"{self.prefix}.{idx}")
        return layer

    # --- writing --------------------------------------------------------------------------
    def stage_dir(self, stage: int | None = None) -> Path:
        return self.work / f"stage-{self.stage if stage is None else stage}"

    def layer_file(self, idx: int) -> Path:
        return self.stage_dir() / f"layer-{idx:05d}.safetensors"

    def finish_layer(self, idx: int) -> None:
        """Write layer ``idx`` as it is now and return its weights to ``meta``."""
        from safetensors.torch import save_file

        layer = self.layers[idx]
        if self.work is None:
            _unload(layer)
            memory.trim()
            return
        prefix = f"{self.prefix}.{idx}"
        tensors = {f"{prefix}.{k}": v.detach().to("cpu").contiguous() for k, v in layer.state_dict().items()}
        self.stage_dir().mkdir(parents=True, exist_ok=True)
        with atomic_file(self.layer_file(idx), overwrite=True) as tmp:
            save_file(tensors, str(tmp))
        _unload(layer)
        memory.trim()

    def finish_stage(self) -> None:
        """The stage is done: write the resident parts and an index, and read the next stage
        from these shards."""
        from safetensors.torch import save_file

        out = self.stage_dir()
        out.mkdir(parents=True, exist_ok=True)
        inside = {id(p) for p in self.layers.parameters()}
        rest, seen = {}, set()
        for name, p in self.model.named_parameters():
            if id(p) in inside or id(p) in seen:
                continue
            seen.add(id(p))
            rest[name] = p.detach().to("cpu").contiguous()
        with atomic_file(out / "rest.safetensors", overwrite=True) as tmp:
            save_file(rest, str(tmp))
        weight_map = {k: "rest.safetensors" for k in rest}
        from safetensors import safe_open

        for idx in range(len(self.layers)):
            f = self.layer_file(idx)
            with safe_open(str(f), "pt") as h:
                weight_map.update({k: f.name for k in h.keys()})
        with atomic_file(out / INDEX, overwrite=True) as tmp:
            Path(tmp).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
        self.source = SafetensorsSource(out)
        self.stage += 1
        self._journal(0, None, {})  # before the previous stage's shards go: the journal names these
        if self.stage > 1:
            shutil.rmtree(self.stage_dir(self.stage - 2), ignore_errors=True)

    def move_weights(self, out_dir: Path) -> None:
        """Move the last finished stage's shards into ``out_dir`` under transformers' names."""
        src = self.stage_dir(self.stage - 1)
        index = json.loads((src / INDEX).read_text())
        files = sorted(set(index["weight_map"].values()))
        names = {f: f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k, f in enumerate(files)}
        for f, new in names.items():
            shutil.move(str(src / f), str(Path(out_dir) / new))
        index["weight_map"] = {k: names[v] for k, v in index["weight_map"].items()}
        (Path(out_dir) / INDEX).write_text(json.dumps(index, indent=1))
        side = self.origin / "generation_config.json" if self.origin is not None else None
        if side is not None and side.is_file():
            shutil.copyfile(side, Path(out_dir) / side.name)

    def close(self) -> None:
        """The run is saved: its work directory goes."""
        shutil.rmtree(self.work, ignore_errors=True)

    # --- journal --------------------------------------------------------------------------
    def journal(self) -> dict | None:
        path = self.work / JOURNAL
        return json.loads(path.read_text()) if path.is_file() else None

    def checkpoint(self, idx: int, acts, state: dict) -> None:
        """Layer ``idx`` of the current stage is written: keep the activations that enter the
        next layer, the records so far and the processor's state, then the journal; at most every
        ``CHECKPOINT_SECONDS`` (and after a stage's last layer), since writing the activations of
        every layer costs as much as a fraction of the run: a resumed run redoes the layers
        written after the last journal (their shards are overwritten with the same bytes)."""
        last = idx + 1 == len(self.layers)
        if self.work is None or (not last and time.monotonic() - self._journaled < self.CHECKPOINT_SECONDS):
            return
        self._journal(idx + 1, acts, state)
        self._journaled = time.monotonic()

    def _journal(self, layers_done: int, acts, state: dict) -> None:
        """The journal is written last, so that it only ever names complete files."""
        from safetensors.torch import save_file

        self.work.mkdir(parents=True, exist_ok=True)
        shape, dtype = None, None
        if acts is not None:
            arr = acts._data
            shape, dtype = list(arr.shape), str(arr.dtype).removeprefix("torch.")
            with atomic_file(self.work / "activations.bin", overwrite=True) as tmp:
                (arr.view(torch.int16) if arr.dtype == torch.bfloat16 else arr).numpy().tofile(str(tmp))
        records = self.records() if self.records else {}
        new = {n: r for n, r in records.items() if self._written.get(n) is not r}
        if new:  # each record once (a later stage's new record of a linear again), not all so far each time
            name = f"records-{len(self._record_files):05d}.safetensors"
            tensors = {k: v for n, r in new.items() for k, v in r.saved_tensors(n).items()}
            with atomic_file(self.work / name, overwrite=True) as tmp:
                save_file(tensors, str(tmp))
            self._record_files.append(name)
            self._written.update(new)  # held, so that a replaced record's id cannot come back
        entry = {"stage": self.stage, "layers_done": layers_done, "activations": shape, "dtype": dtype, "state": state,
                 "records": {n: r.summary() for n, r in records.items()}, "record_files": self._record_files,
                 "reports": self.reports}
        with atomic_file(self.work / JOURNAL, overwrite=True) as tmp:
            Path(tmp).write_text(json.dumps(entry))

    def restore_run(self) -> None:
        """Take back the records of a stopped run (at the start of a resumed one)."""
        from safetensors.torch import load_file

        j = self.journal()
        if j is not None and self.restore_records:
            tensors = {}
            for name in j["record_files"]:  # in order: a later file's record of a linear replaces an earlier one
                tensors.update(load_file(str(self.work / name)))
            self.restore_records(j["records"], tensors)

    def resumes_layers(self) -> int:
        """Layers of the current stage a stopped run already wrote (0: start the stage afresh)."""
        j = self.journal() if self.work is not None else None
        return j["layers_done"] if j is not None and j["stage"] == self.stage and j["activations"] else 0

    def resume(self, acts) -> dict:
        """Put back the activations entering the next layer; returns the processor's state."""
        j = self.journal()
        data = acts._data
        raw = data.view(torch.int16) if data.dtype == torch.bfloat16 else data
        arr = np.fromfile(str(self.work / "activations.bin"), dtype=raw.numpy().dtype).reshape(j["activations"])
        raw.copy_(torch.from_numpy(arr))
        return j["state"]


def streamed_tensors(model: nn.Module, source):
    """(name, tensor) of every entry of ``model.state_dict()`` (a skeleton's: its order and names),
    each read from ``source`` only when asked for; a tied head the source leaves to its embedding
    is skipped (writers that tie it skip it anyway)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name in model.state_dict():
        if name not in source:
            if tied and name == "lm_head.weight":
                continue
            raise PocketError(f"the model's weights have no tensor {name}; they do not match its config")
        yield name, source.get(name)


def open_streamed(spec: str, work: "str | os.PathLike | None", dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(skeleton model, tokenizer, source, Streamer) for a model given by ``spec`` (a transformers
    directory with safetensors weights, a hub id, downloaded first, or a GGUF file, its tensors
    dequantized one at a time), nothing loaded yet."""
    from . import models

    source = models.resolve(spec)
    config = models.load_config(source)
    tokenizer = models.load_tokenizer(source)
    model = skeleton(config, dtype)
    if source.kind == "gguf":
        from .gguf_tensors import GGUFSource

        return model, tokenizer, source, Streamer(model, GGUFSource(source.describe(), config), work, device)
    folder = source.path
    if source.kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
        except Exception as e:  # no network, no such repository, ...
            raise PocketError(f"could not download {spec} ({type(e).__name__}); use a local model directory") from None
    return model, tokenizer, source, Streamer(model, SafetensorsSource(folder), work, device)
