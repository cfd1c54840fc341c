"""KV-cache accounting."""
import pytest

from pocketlm import kv
from tests.conftest import make_tiny, make_tiny_gemma3


def test_full_attention_cache_grows_with_every_token():
    c = make_tiny(layers=3, heads=4, kv_heads=2, head_dim=16).config  # 3 layers x 2 x 2 heads x 16
    assert kv.cache_bytes(c, 1) == 3 * 2 * 2 * 16 * 2
    assert kv.cache_bytes(c, 1000) == 1000 * kv.cache_bytes(c, 1)
    assert kv.cache_bytes(c, 1024, "q8_0") == pytest.approx(kv.cache_bytes(c, 1024) * 34 / 64, abs=1)


def test_sliding_window_layers_stop_growing_at_their_window():
    c = make_tiny_gemma3(layers=3).config  # two layers of window 16, one global; 1 KV head of 32
    per_layer = 2 * 1 * 32 * 2
    assert kv.cache_bytes(c, 10) == 3 * 10 * per_layer
    assert kv.cache_bytes(c, 1000) == (1000 + 2 * 16) * per_layer


def test_smollm2_numbers():
    """30 layers x 3 KV heads x 64 x (K, V) x 2 bytes = 23,040 bytes per token."""
    from transformers import LlamaConfig

    c = LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    assert kv.report(c)["kv_bytes_per_token_f16"] == 23040
    assert kv.report(c)["kv_cache_8k_f16"] == 23040 * 8192
