"""KV-cache size of a model: bytes per token and at a given context, for float16 and for
llama.cpp's quantized cache types (q8_0: 34 bytes per 32 values, q4_0: 18 per 32).

Each layer caches one key and one value vector per KV head and token; a sliding-window layer
keeps only its last ``sliding_window`` tokens, so at long contexts its share stops growing."""
from __future__ import annotations

from .models import head_dim

#: bytes per cached value
CACHE_TYPES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
CONTEXTS = (2048, 8192, 32768)


def layer_windows(config) -> list[int | None]:
    """Per decoder layer: the tokens it keeps (None: all of them)."""
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    return [window if t == "sliding_attention" and window else None for t in types]


def values_per_token(config) -> int:
    """Cached values per token per layer (keys and values of every KV head)."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * kv_heads * head_dim(config)


def cache_bytes(config, context: int, cache_type: str = "f16") -> int:
    """Bytes of the KV cache holding ``context`` tokens."""
    if cache_type not in CACHE_TYPES:
        raise ValueError(f"unknown cache type {cache_type}; use one of {', '.join(CACHE_TYPES)}")
    per = values_per_token(config) * CACHE_TYPES[cache_type]
    return int(sum(per * (context if w is None else min(context, w)) for w in layer_windows(config)))


def report(config) -> dict:
    """Bytes per token (every layer holding the token) and the cache at 2k, 8k and 32k tokens."""
    out = {"kv_bytes_per_token_f16": cache_bytes(config, 1)}
    for ctx in CONTEXTS:
        for t in CACHE_TYPES:
            out[f"kv_cache_{ctx // 1024}k_{t}"] = cache_bytes(config, ctx, t)
    return out
