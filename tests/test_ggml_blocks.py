import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from pocketlm.errors import PocketError
from pocketlm.export.ggml_blocks import FORMATS, format_for, pack, unpack_codes
from pocketlm.quant.grid import quantize_weight


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_packed_blocks_hold_our_codes_and_dequantize_like_ggml(name):
    fmt = FORMATS[name]
    W = torch.randn(48, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    qw = quantize_weight(W, fmt.spec)
    assert format_for(fmt.spec) is fmt
    data = pack(qw.codes, qw.scales, qw.zeros, fmt)
    assert data.shape == (48, 96 // 32 * fmt.block_bytes)
    assert np.array_equal(unpack_codes(data, 96, fmt), qw.codes.numpy())  # codes as the quantizer chose
    theirs = quants.dequantize(data, GGMLQuantizationType[name])  # the gguf package's reading
    ours = qw.dequantize().numpy()
    if fmt.sym:
        assert np.array_equal(theirs, ours)
    else:  # the offset m = -s*z is rounded to float16
        assert np.abs(theirs - ours).max() <= np.abs(qw.scales.numpy() * qw.zeros.numpy()).max() * 2**-10


def test_grids_that_no_format_holds_are_refused():
    W = torch.randn(8, 64)
    qw = quantize_weight(W, FORMATS["Q4_1"].spec)
    with pytest.raises(PocketError, match="asymmetric"):
        pack(qw.codes, qw.scales, qw.zeros, FORMATS["Q4_0"])
    assert format_for(FORMATS["Q4_0"].spec.model_copy(update={"group_size": 128})) is None
    with pytest.raises(PocketError, match="multiple of 32"):
        pack(torch.zeros(2, 40, dtype=torch.uint8), torch.ones(2, 2), torch.zeros(2, 2), FORMATS["Q8_0"])


def test_recipe_format_puts_quantizers_on_ggml_types():
    from pocketlm import compress
    from pocketlm.recipe import from_dict
    from tests.conftest import make_tiny

    res = compress(make_tiny(layers=1), {"stages": [{"method": "rtn", "format": "gguf-q4_1"}]})
    rec = res.context.quant["model.layers.0.mlp.down_proj"]
    assert rec.type == "Q4_1" and rec.weight.bpw == 5.0  # d and m both float16, as the file stores
    with pytest.raises(Exception, match="unknown GGML type 'gguf-q7_k'"):
        from_dict({"stages": [{"method": "rtn", "format": "gguf-q7_k"}]})


def test_ggml_type_rtn_beats_ggmls_reference_quantizer():
    """The weighted search (here with every weight counting alike) against gguf-py's port of
    ggml's reference rounding, on the same weights."""
    import gguf

    from pocketlm.quant.ggml import quantize_matrix

    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    for name in ("Q4_0", "Q5_0", "Q8_0"):
        qtype = gguf.GGMLQuantizationType[name]
        ggml = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(W.numpy(), qtype), qtype)).reshape(W.shape)
        ours = quantize_matrix(W, name)[0]
        assert (ours - W).pow(2).mean() < 0.97 * (ggml - W).pow(2).mean(), name


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0"])
def test_q4_0_and_q5_0_grids_use_every_level_like_ggml(name):
    """GGML's *_0 quantizer puts each block's largest-magnitude weight on code 0 (a signed
    scale), using 2^b levels; our grid for these formats does the same, so RTN onto Q4_0 is as
    accurate as llama.cpp's own, and clearly better than a +-(2^(b-1) - 1) symmetric grid."""
    import gguf

    from pocketlm.export.ggml_blocks import FORMATS, pack
    from pocketlm.quant.grid import QuantSpec, quantize_weight

    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    fmt = FORMATS[name]
    qw = quantize_weight(W, fmt.spec)
    qtype = gguf.GGMLQuantizationType[name]
    ours = torch.from_numpy(gguf.quants.dequantize(pack(qw.codes, qw.scales, qw.zeros, fmt), qtype)).reshape(W.shape)
    ggml = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(W.numpy(), qtype), qtype)).reshape(W.shape)
    narrow = quantize_weight(W, QuantSpec(bits=fmt.bits, group_size=32, sym=True)).dequantize()
    err = lambda D: float((D - W).pow(2).mean())  # noqa: E731
    assert torch.equal(ours, qw.dequantize())
    assert err(ours) < 1.01 * err(ggml) and err(ours) < 0.92 * err(narrow)
    assert bool((qw.codes == 0).any())  # the extra level is used
