"""GGUF export that llama.cpp loads unmodified.

Metadata (architecture hyper-parameters) comes from the transformers config; the tokenizer from
the source GGUF file when the model came from one (its ``tokenizer.*`` keys are copied as they
are), otherwise from the transformers tokenizer (byte-level BPE via the gguf package's vocab
readers). Every linear a pocketlm quantizer left on a GGML block grid is written with the codes
the quantizer chose (``ggml_blocks``); other linears are quantized to ``linear_type`` by RTN on
that format's grid, or written as F16/F32; norms are F32.

llama.cpp's ``llama`` graph applies RoPE to interleaved pairs, transformers' Llama to the two
halves of each head; as llama.cpp's own converter does, the rows of q_proj and k_proj are
permuted within each head (rows carry their scales and codes along, so quantization is unchanged).
Gemma 3 keeps its row order; its RMSNorms scale by (1 + w) where llama.cpp's scale by w, so its
norm weights are written plus one, and its sliding-window layers and their rotary base are
written per layer.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import PocketError
from ..gguf_tensors import ARCHITECTURES, UNIT_OFFSET_NORMS, rope_permute as _rope_permute
from ..models import head_dim as head_dim_of, rope_theta
from ..quant.ggml import TYPES, fallback, quantize_matrix
from .ggml_blocks import format_for, pack

FLOAT_TYPES = ("F16", "F32")
#: general.file_type (llama_ftype) named after a file's most common tensor type
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 12,
              "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30}


def check_exportable(config) -> str:
    """The llama.cpp architecture of a model with this config, or a one-line error before any
    work starts."""
    mt = getattr(config, "model_type", None)
    if mt not in ARCHITECTURES:
        raise PocketError(f"GGUF export supports {', '.join(ARCHITECTURES)} models, not '{mt}'")
    if mt != "gemma3_text" and "sliding_attention" in (getattr(config, "layer_types", None) or []) \
            and getattr(config, "use_sliding_window", True):
        raise PocketError(f"this {mt} model has sliding-window layers, which llama.cpp's {mt} graph does not "
                          "run (it would attend globally); keep it in transformers")
    return ARCHITECTURES[mt][0]


def check_type(t: str, allowed=(*FLOAT_TYPES, *TYPES)) -> str:
    """A GGUF tensor type by name (upper case), or a one-line error with the valid names."""
    t = t.upper()
    if t not in allowed:
        raise PocketError(f"unknown GGUF type '{t}'; use one of {', '.join(allowed)}")
    return t


def _metadata(w, cfg, arch: str) -> None:
    head_dim = head_dim_of(cfg)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", cfg.num_attention_heads))
    w.add_rope_freq_base(rope_theta(cfg))
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    types = getattr(cfg, "layer_types", None) or []
    if getattr(cfg, "sliding_window", None) and "sliding_attention" in types:
        w.add_sliding_window(int(cfg.sliding_window))
        w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        w.add_rope_freq_base_swa(rope_theta(cfg, "sliding_attention"))
    if getattr(cfg, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))


def _tokenizer_from_gguf(w, path: str) -> None:
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), vtype, sub)


def _tokenizer_from_hf(w, tokenizer) -> None:
    from gguf.vocab import BpeVocab, SpecialVocab

    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        try:
            vocab = BpeVocab(Path(d))
        except Exception as e:  # the reader raises on anything but byte-level BPE
            raise PocketError(f"GGUF export handles byte-level BPE tokenizers only ({e})") from None
        tokens, scores, types = zip(*vocab.all_tokens())
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(list(tokens))
        w.add_token_types(list(types))
        SpecialVocab(Path(d), load_merges=True).add_to_gguf(w, quiet=True)
        w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))


def write(model, tokenizer, path: str | Path, quant: dict | None = None, source_gguf: str | None = None,
          linear_type: str = "F16", embed_type: str = "F16", name: str | None = None, tensors=None) -> dict:
    """Write ``model`` as GGUF at ``path``; returns {gguf tensor name: type name}.

    ``quant``: the quantizers' records (``Context.quant``); their codes are kept when a block
    format holds them. ``linear_type``: the type of every other decoder linear (F16, F32, or a
    block type quantized here by RTN). ``embed_type``: the token embedding's type.
    ``tensors``: (name, tensor) pairs read one at a time in place of ``model.state_dict()`` (a
    streamed model, ``model`` a skeleton on ``meta``); each one's bytes then go to a temporary
    file as soon as they are encoded, so that memory holds one tensor at a time."""
    import gguf

    arch = check_exportable(model.config)
    linear_type, embed_type = check_type(linear_type), check_type(embed_type)
    quant = quant or {}
    cfg = model.config
    permute = ARCHITECTURES[cfg.model_type][1]
    norm_offset = 1.0 if cfg.model_type in UNIT_OFFSET_NORMS else 0.0
    n_kv = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch, use_temp_file=tensors is not None)
    w.add_name(name or getattr(cfg, "name_or_path", None) or "pocketlm model")
    _metadata(w, cfg, arch)
    if source_gguf:
        _tokenizer_from_gguf(w, source_gguf)
    else:
        _tokenizer_from_hf(w, tokenizer)
    types: dict[str, str] = {}
    for hf_name, t in tensors if tensors is not None else model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        gname = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise PocketError(f"no GGUF name for tensor {hf_name}; this model layout is not exportable")
        t = t.detach().float().cpu()
        lin = hf_name.removesuffix(".weight")
        n_head = cfg.num_attention_heads if lin.endswith("q_proj") else n_kv if lin.endswith("k_proj") else None
        rows = (lambda x: _rope_permute(x, n_head)) if permute and n_head else (lambda x: x)
        if t.dim() == 1:
            w.add_tensor(gname, (t + norm_offset if gname.endswith("norm.weight") else t).numpy().astype(np.float32))
            types[gname] = "F32"
            continue
        want = embed_type if gname == "token_embd.weight" or gname == "output.weight" else linear_type
        data, types[gname] = _encode(lin, t, quant.get(lin), want, rows)
        if types[gname] in FLOAT_TYPES:
            w.add_tensor(gname, data)
        else:
            w.add_tensor(gname, data, raw_dtype=gguf.GGMLQuantizationType[types[gname]])
    counts = {k: list(types.values()).count(k) for k in set(types.values())}
    main = max((k for k in counts if k not in FLOAT_TYPES), key=counts.get, default="F16")
    w.add_file_type(FILE_TYPES[main])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def _encode(lin: str, t: torch.Tensor, rec, want: str, rows) -> tuple[np.ndarray, str]:
    """The bytes and GGML type of one matrix: a GGML record's own bytes; a pocketlm grid's codes
    packed into the block type that holds them; else ``want`` (RTN here onto a block type, or a
    float type). ``rows`` reorders rows as llama.cpp expects (RoPE permutation of q/k)."""
    if rec is not None and hasattr(rec, "type"):  # a GGML type: the quantizer's own bytes
        return rows(torch.from_numpy(rec.weight.data)).numpy(), rec.type
    if rec is not None:
        fmt = format_for(rec.spec)
        if fmt is None:
            raise PocketError(f"{lin} is quantized as {rec.spec.label()}, which no GGUF block type holds; "
                              f"quantize with a GGML type instead (format: gguf-q4_k, gguf-iq4_nl, ...)")
        qw = rec.to_quantized(t)
        return pack(rows(qw.codes), rows(qw.scales), rows(qw.zeros), fmt), fmt.name
    if want in TYPES and fallback(want, t.shape[1]) != "F16":
        got = fallback(want, t.shape[1])
        _, gw, _, _ = quantize_matrix(rows(t), got)
        return gw.data, got
    want = want if want in FLOAT_TYPES else "F16"
    return rows(t).numpy().astype(np.float16 if want == "F16" else np.float32), want


def tensor_name(model, hf_name: str) -> str:
    """The GGUF tensor name of a module's weight (e.g. model.layers.0.self_attn.q_proj -> blk.0.attn_q.weight)."""
    import gguf

    arch = check_exportable(model.config)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.config.num_hidden_layers)
    name = tmap.get_name(f"{hf_name}.weight", try_suffixes=(".weight", ".bias"))
    if name is None:
        raise PocketError(f"no GGUF name for {hf_name}")
    return name


def tensor_types_of(path: str | Path, model) -> dict[str, str]:
    """{linear name: GGML type} of the GGUF file at ``path`` for ``model``'s linears (the token
    embedding under its module name), e.g. to put pocketlm's codes in the very mix of types a
    llama.cpp file uses."""
    import gguf

    arch = check_exportable(model.config)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.config.num_hidden_layers)
    to_hf = {}
    for hf_name, t in model.state_dict().items():
        if t.dim() == 2:
            g = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if g is not None:
                to_hf.setdefault(g, hf_name.removesuffix(".weight"))
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name in to_hf:
            out[to_hf[t.name]] = t.tensor_type.name
    return out
