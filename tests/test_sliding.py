"""Attention span and sliding-window layers: a planted local layer is found, the conversion keeps
the function inside the window, the KV budget picks the right count, runtimes that cannot run
the result are refused before any work."""
import pytest
import torch

from pocketlm import compress, kv, models
from pocketlm.attention.sliding import SlidingWindow
from pocketlm.attention.span import attention_span, local_mass
from pocketlm.errors import PocketError
from tests.conftest import make_tiny, make_tiny_gemma3

WINDOWS = torch.randint(0, 5000, (2, 96), generator=torch.Generator().manual_seed(1))


def _planted(layer: int = 1):
    """A tiny Llama whose layer ``layer`` attends (almost) only to the current token: its keys
    equal its queries, scaled up, so q.k peaks at distance 0 (RoPE rotates the rest away)."""
    m = make_tiny(layers=3, heads=4, kv_heads=4)
    a = m.model.layers[layer].self_attn
    with torch.no_grad():
        a.q_proj.weight.mul_(6.0)
        a.k_proj.weight.copy_(a.q_proj.weight)
    return m


def test_local_mass_of_known_attention():
    L = 6
    eye = torch.eye(L)[None]  # every query on itself
    uniform = torch.tril(torch.ones(L, L))
    uniform = (uniform / uniform.sum(-1, keepdim=True))[None]
    assert local_mass(eye, [2])[0] == (4.0, 4)  # queries 2..5, all their mass within 2 keys
    s, n = local_mass(uniform, [2])[0]
    assert n == 4 and abs(s - sum(2 / (q + 1) for q in range(2, 6))) < 1e-6


def test_the_span_analysis_finds_a_planted_local_layer():
    span = attention_span(_planted(1), WINDOWS, (8, 32))
    assert max(range(3), key=lambda i: span[i][0]) == 1 and span[1][0] > 0.8 > max(span[0][0], span[2][0])


def test_a_llama_model_becomes_a_qwen2_model_with_one_sliding_layer(tmp_path):
    """The planted layer is chosen; logits are unchanged on windows no longer than the window and
    change beyond it; the result saves and reloads with its layer types."""
    m = _planted(1)
    short, long = WINDOWS[:1, :16], WINDOWS[:1]
    with torch.no_grad():
        want_short, want_long = m(short).logits, m(long).logits
    res = compress(m, {"stages": [{"method": "sliding-window", "window": 16, "n": 1, "context": 96}]},
                   calibration=WINDOWS)
    rep = res.stages[0]
    assert rep["layers"] == [1] and rep["architecture"] == ["llama", "qwen2"]
    new = res.model
    assert new.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    assert rep["kv_bytes_at_96"] == [kv.cache_bytes(m.config, 96), kv.cache_bytes(new.config, 96)]
    assert rep["kv_bytes_at_96"][1] < rep["kv_bytes_at_96"][0]
    with torch.no_grad():
        assert torch.allclose(new(short).logits, want_short, atol=1e-5)
        assert not torch.allclose(new(long).logits, want_long, atol=1e-3)
    from tests.conftest import make_tiny_tokenizer

    res.tokenizer = make_tiny_tokenizer()
    res.save(tmp_path / "o")
    back, _, _ = models.load(str(tmp_path / "o"))
    assert back.config.model_type == "qwen2" and back.config.layer_types[1] == "sliding_attention"


def test_the_kv_budget_sets_how_many_layers_slide():
    st = SlidingWindow(window=512, kv_fraction=0.5, context=8192, choose="last")
    assert st.count(30) == 16  # (30 - k) 8192 + 512 k <= 0.5 * 30 * 8192
    with pytest.raises(PocketError, match="use a smaller window or a larger budget"):
        SlidingWindow(window=8000, kv_fraction=0.05, context=8192).count(30)


def test_gguf_export_of_a_converted_llama_is_refused_before_any_work():
    m = make_tiny(layers=2)
    recipe = {"stages": [{"method": "sliding-window", "window": 16, "n": 1, "choose": "last"}],
              "export": [{"format": "gguf"}]}
    with pytest.raises(PocketError, match="llama.cpp runs per-layer sliding windows for Gemma 3 only"):
        compress(m, recipe, calibration=WINDOWS)


def test_gemma3_keeps_its_architecture_and_gains_a_sliding_layer():
    m = make_tiny_gemma3(layers=3)  # layers 0, 1 slide (window 16), layer 2 is global
    res = compress(m, {"stages": [{"method": "sliding-window", "window": 16, "n": 1, "choose": "last"}],
                       "export": [{"format": "gguf"}]}, calibration=WINDOWS)
    assert res.model.config.model_type == "gemma3_text"
    assert res.model.config.layer_types == ["sliding_attention"] * 3


def test_the_measured_cost_converts_the_planted_local_layer_first():
    """Converting a layer that attends (almost) only to the current token changes little, so its
    cost is the lowest; converting any layer changes something."""
    res = compress(_planted(1), {"stages": [{"method": "sliding-window", "window": 8, "n": 1, "choose": "cost",
                                             "cost_windows": 2}]}, calibration=WINDOWS)
    rep = res.stages[0]
    assert rep["layers"] == [1]
    assert 0 < rep["cost"][1] < min(rep["cost"][0], rep["cost"][2])


def test_given_layers_are_converted_and_a_layer_already_sliding_is_refused():
    res = compress(make_tiny(layers=3), {"stages": [{"method": "sliding-window", "window": 16, "layers": [0, 2]}]})
    assert res.stages[0]["layers"] == [0, 2]
    assert res.model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    gemma = make_tiny_gemma3(layers=3)  # layers 0, 1 slide already
    with pytest.raises(PocketError, match=r"layers \[1\] are not global layers .* \(global: \[2\]\)"):
        compress(gemma, {"stages": [{"method": "sliding-window", "window": 16, "layers": [1]}]})
    with pytest.raises(Exception, match="exactly one of n, kv_fraction or layers"):
        SlidingWindow(window=16, n=1, layers=[0])
