import math

import torch

from pocketlm import compress
from pocketlm.quant.gptq import gptq
from pocketlm.quant.grid import QuantSpec, quantize_weight
from tests.conftest import make_tiny


def _layer(seed=0, d_out=128, d_in=320, n=2048):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) / d_in**0.5
    X = (torch.randn(n, d_in, generator=g) @ mix) * torch.linspace(0.2, 3, d_in)
    W = torch.randn(d_out, d_in, generator=g) * 0.05
    return W, X, 2 / n * X.T @ X


def _out_err(W, Q, X):
    return ((W - Q) @ X.T).pow(2).sum().item()


def test_gptq_layer_error_clearly_below_rtn():
    W, X, H = _layer()
    for bits, g in [(4, 128), (3, 128), (3, 32), (2, -1)]:
        spec = QuantSpec(bits=bits, group_size=g)
        rtn = _out_err(W, quantize_weight(W, spec).dequantize(), X)
        for act in (False, True):
            Q, qw, _ = gptq(W, H, spec, act_order=act)
            assert _out_err(W, Q, X) < 0.85 * rtn, (bits, g, act)
            torch.testing.assert_close(qw.dequantize(), Q, rtol=0, atol=1e-6)  # codes reproduce Q


def test_identity_hessian_reduces_to_rtn():
    W, _, _ = _layer(1)
    spec = QuantSpec(bits=3, group_size=64)
    rtn = quantize_weight(W, spec)
    for act in (False, True):
        Q, qw, _ = gptq(W, torch.eye(W.shape[1]), spec, act_order=act)
        assert torch.equal(Q, rtn.dequantize())
        assert torch.equal(qw.codes, rtn.codes)


def test_act_order_keeps_contiguous_static_groups():
    W, X, H = _layer(2, d_in=192)
    spec = QuantSpec(bits=3, group_size=64)
    Q, qw, _ = gptq(W, H, spec, act_order=True)
    # the grids are those of the original weights' contiguous groups (static groups) ...
    assert torch.equal(qw.scales, quantize_weight(W, spec).scales)
    # ... and every contiguous group of 64 columns takes its values from its own 8-level grid
    for g in range(3):
        cols = slice(64 * g, 64 * (g + 1))
        grid = qw.scales[:, g : g + 1] * (torch.arange(8).float()[None] - qw.zeros[:, g : g + 1].float())
        dist = (Q[:, cols, None] - grid[:, None, :]).abs().min(-1).values
        assert dist.max() < 1e-6
    assert not torch.equal(torch.argsort(torch.diag(H), descending=True), torch.arange(192))


def test_damping_is_raised_when_cholesky_fails():
    W, _, _ = _layer(3, d_in=64)
    H = torch.eye(64)
    H[0, 0] = -0.05  # not positive definite with 1% damping; fine with 10%
    Q, _, loss = gptq(W, H, QuantSpec(bits=4, group_size=32))
    assert torch.isfinite(Q).all() and math.isfinite(float(loss)) and float(loss) >= 0


def test_dead_inputs_zero_their_columns():
    W, X, _ = _layer(4, d_in=64)
    X[:, 5] = 0
    H = 2 / X.shape[0] * X.T @ X
    Q, _, _ = gptq(W, H, QuantSpec(bits=4, group_size=32))
    assert (Q[:, 5] == 0).all()


def test_gptq_model_output_closer_than_rtn(tokenizer):
    from pocketlm.data import calibration_windows, eval_windows

    calib = calibration_windows(tokenizer, n=8, seq_len=128)
    test = eval_windows(tokenizer, "wikitext2", seq_len=128, max_windows=4)
    ref = make_tiny(layers=2, seed=0)

    def err(preset):
        m = make_tiny(layers=2, seed=0)
        compress(m, {"stages": [{"method": preset, "bits": 3, "group_size": 32}]}, tokenizer=tokenizer,
                 calibration=calib)
        with torch.no_grad():
            return (m(test).logits - ref(test).logits).pow(2).mean().item()

    assert err("gptq") < 0.9 * err("rtn")


def test_stacked_widths_equal_separate_runs():
    from pocketlm.quant.gptq import gptq_widths

    W, _, H = _layer(5, d_out=32, d_in=96)
    spec = QuantSpec(bits=4, group_size=32)
    stacked = gptq_widths(W, H, spec, [2, 3, 8], act_order=True)
    for b in (2, 3, 8):
        alone, _, _ = gptq(W, H, QuantSpec(bits=b, group_size=32), act_order=True)
        torch.testing.assert_close(stacked[b], alone, rtol=0, atol=1e-6)


def test_clipping_search_weighted_by_input_energy_lowers_output_error():
    """With act-order (static groups), the clipping search weighs each input column by diag(H):
    on inputs of uneven energy it leaves less layer-output error than no clipping, and less
    than an unweighted search would."""
    from pocketlm.quant.grid import QuantSpec, find_params, fake_quant

    g = torch.Generator().manual_seed(0)
    X = torch.randn(4096, 256, generator=g) * (torch.rand(256, generator=g) * 3 + 0.1)
    X[:, :8] *= 8
    W = torch.randn(128, 256, generator=g) * 0.05
    H = 2 * X.T @ X / 4096
    err = lambda Q: float(((X @ (W - Q).T) ** 2).mean())  # noqa: E731
    clipped = err(gptq(W, H, QuantSpec(bits=3, group_size=128, clip=True), act_order=True)[0])
    plain = err(gptq(W, H, QuantSpec(bits=3, group_size=128), act_order=True)[0])
    assert clipped < 0.9 * plain
    # the weighted search itself: per group, its weighted error is never above the unweighted choice's
    spec, hd = QuantSpec(bits=3, group_size=128, clip=True), torch.diag(H)[:128]
    blk = W[:, :128]
    for weight in (hd, None):
        s, z = find_params(blk, spec, weight=weight)
        e = ((fake_quant(blk, s[:, None], z[:, None], spec.maxq) - blk) ** 2 * hd).sum(1)
        if weight is not None:
            best = e
    assert bool((best <= e + 1e-9).all())
