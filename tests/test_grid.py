import pytest
import torch

from pocketlm.quant.grid import QuantSpec, quantize_weight


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("sym", [False, True])
def test_round_trip_within_half_a_step(bits, group_size, sym):
    torch.manual_seed(bits)
    w = torch.randn(48, 576) * torch.rand(48, 1) * 3  # 576 = 4*128 + 64: a short last group
    qw = quantize_weight(w, QuantSpec(bits=bits, group_size=group_size, sym=sym))
    g = qw.spec.group_len(576)
    step = qw.scales[:, torch.arange(576) // g]
    err = (w - qw.dequantize()).abs()
    assert (err <= 0.5 * step * (1 + 1e-5)).all()
    assert qw.codes.max() <= 2**bits - 1
    # every group uses at most 2^bits distinct values
    deq = qw.dequantize()
    assert deq[0, :g].unique().numel() <= 2**bits


def test_bpw_to_the_bit_for_a_known_layer():
    # q_proj of the default model: 576 x 576, 4-bit, groups of 128 -> 5 groups per row
    # (4 of 128 and one of 64), each with a float16 scale and a 4-bit zero point.
    spec = QuantSpec(bits=4, group_size=128, sym=False)
    bits = 576 * 576 * 4 + 576 * 5 * (16 + 4)
    assert spec.storage_bits(576, 576) == bits == 1_384_704
    assert spec.bpw(576, 576) == pytest.approx(bits / (576 * 576), abs=0)
    # symmetric: no zero point; per row: one scale for 1536 inputs
    assert QuantSpec(bits=3, group_size=-1, sym=True).storage_bits(576, 1536) == 576 * 1536 * 3 + 576 * 16


def test_clip_search_lowers_error_on_outliers():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    w[:, ::50] *= 8  # outliers stretch the min/max grid
    plain = quantize_weight(w, QuantSpec(bits=3, group_size=128))
    clipped = quantize_weight(w, QuantSpec(bits=3, group_size=128, clip=True))
    assert (w - clipped.dequantize()).pow(2).sum() < 0.95 * (w - plain.dequantize()).pow(2).sum()


def test_scales_are_float16_values():
    w = torch.randn(8, 64)
    qw = quantize_weight(w, QuantSpec(bits=4, group_size=32))
    assert torch.equal(qw.scales, qw.scales.half().float())
