"""GGML block types as grids: byte layouts against gguf's dequantizers, the weighted search,
llama.cpp's fallback rule, GPTQ on the types."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from pocketlm.errors import PocketError
from pocketlm.quant.ggml import FALLBACK, TYPES, fallback, get_type, quantize_matrix
from pocketlm.quant.ggml.search import fp16, nearest

ALL = list(TYPES)


def _weights(rows=8, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[1, 3] = 0.7  # an outlier
    w[2, :40] = 0.0  # an all-zero block
    w[3, 256:] = w[3, 256:].abs()  # an all-positive super-block
    imp = torch.rand(cols, generator=g) ** 4
    return w, imp


@pytest.mark.parametrize("name", ALL)
def test_packed_bytes_read_back_by_gguf_exactly(name):
    w, imp = _weights()
    deq, gw, q, p = quantize_matrix(w, name, imp)
    t = get_type(name)
    assert gw.data.shape == (8, 512 // t.block * t.type_size) and gw.bpw == pytest.approx(t.bpw)
    theirs = dequantize(gw.data, GGMLQuantizationType[name]).reshape(w.shape)
    assert np.array_equal(theirs, deq.numpy()), name
    assert torch.equal(gw.dequantize(), deq)
    assert int(q.max()) < len(t.levels)
    assert deq[2, :32].abs().max() == 0  # a zero block stays zero


def _range_error(x, w, levels):
    """Weighted error of the range-based scale: the largest-magnitude weight on the outer level
    llama.cpp's reference rounding uses (the negative end when the levels are not symmetric)."""
    xmax = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    d = fp16(xmax / (levels[0] if levels[0] != -levels[-1] else levels[-1]))
    d = torch.where(d == 0, torch.ones_like(d), d)
    q = nearest(x / d, levels)
    return (w * (x - d * levels[q]).pow(2)).sum(-1)


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0", "Q8_0", "IQ4_NL"])
def test_weighted_search_never_worse_than_the_range_scale(name):
    t = get_type(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, 32, generator=g) * torch.rand(4000, 1, generator=g)
    x[::7] = torch.randn(572, 32, generator=g).pow(3)  # heavy tails
    w = torch.rand(4000, 32, generator=g) ** 3
    q, p = t.quantize(x, w)
    ours = t.error(x, w, q, p)
    ref = _range_error(x, w, t.levels)
    assert (ours <= ref * (1 + 1e-6) + 1e-12).all()
    assert ours.sum() < 0.9 * ref.sum()  # and clearly better on average


@pytest.mark.parametrize("name", ALL)
def test_importance_lowers_the_weighted_error(name):
    w, imp = _weights(rows=32, cols=1024, seed=2)
    err = {}
    for key, m in (("weighted", imp), ("plain", None)):
        deq = quantize_matrix(w, name, m)[0]
        err[key] = float(((w - deq) ** 2 * imp).sum())
    assert err["weighted"] < err["plain"]


def test_fallback_rule_of_llama_cpp():
    """llama-quant.cpp's ``tensor_type_fallback``: a 256-block type on rows that are not a
    multiple of 256 becomes a 32-block type; checked against llama.cpp itself in test_llamacpp."""
    assert fallback("Q4_K", 576) == "Q5_0" and fallback("Q4_K", 1536) == "Q4_K"
    assert fallback("Q5_K", 640) == "Q5_1" and fallback("Q6_K", 896) == "Q8_0"
    assert fallback("Q2_K", 576) == "Q4_0" and fallback("Q3_K", 640) == "Q4_0"
    assert fallback("IQ4_XS", 896) == "IQ4_NL" and fallback("IQ4_XS", 2048) == "IQ4_XS"
    assert fallback("Q4_0", 576) == "Q4_0" and fallback("Q4_0", 100) == "F16"
    assert set(FALLBACK) == {n for n, t in TYPES.items() if t.block == 256}


def test_a_type_that_does_not_fit_the_rows_is_a_clear_error():
    with pytest.raises(PocketError, match="multiple of 256.*Q5_0"):
        quantize_matrix(torch.randn(4, 576), "Q4_K")
    with pytest.raises(PocketError, match="unknown GGML type 'gguf-q7_k'"):
        get_type("gguf-q7_k")


def test_gptq_on_a_ggml_type_beats_weighted_rtn_on_the_layer_output():
    from pocketlm.quant.gptq import gptq_ggml

    g = torch.Generator().manual_seed(3)
    X = torch.randn(2048, 256, generator=g) @ (torch.randn(256, 256, generator=g) * 0.2)  # correlated inputs
    W = torch.randn(64, 256, generator=g) * 0.05
    H = 2 * X.T @ X / X.shape[0]
    for name in ("IQ4_NL", "Q4_K", "Q3_K"):
        Q, gw, _ = gptq_ggml(W, H, name)
        R = quantize_matrix(W, name, torch.diag(H))[0]
        assert torch.equal(gw.dequantize(), Q)  # what GPTQ left is exactly what the file stores
        err_g = ((W - Q) @ X.T).pow(2).sum()
        err_r = ((W - R) @ X.T).pow(2).sum()
        assert err_g < 0.8 * err_r, name
