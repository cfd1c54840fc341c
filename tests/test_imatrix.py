"""The importance matrix and the imatrix stage (importance-weighted RTN onto GGML types)."""
import pytest
import torch

from pocketlm import compress
from pocketlm.calibrate import run_layerwise
from pocketlm.stats import ImatrixProcessor
from tests.conftest import make_tiny

WINDOWS = torch.randint(0, 49152, (3, 64), generator=torch.Generator().manual_seed(7))


def _inputs(model, name):
    got = []
    h = model.get_submodule(name).register_forward_hook(lambda m, a, o: got.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for w in WINDOWS:
            model(w[None])
    h.remove()
    return torch.cat(got)


def test_imatrix_is_the_mean_square_of_each_input():
    m = make_tiny(layers=2)
    proc = ImatrixProcessor(lambda n: True, head=True)
    run_layerwise(m, WINDOWS, proc)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        x = _inputs(m, name)
        assert torch.allclose(proc.imatrix[name], x.pow(2).mean(0), rtol=1e-4, atol=1e-7)
    head = _inputs(m, "lm_head")
    assert torch.allclose(proc.head, head.pow(2).mean(0), rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_imatrix_stage_beats_plain_rtn_on_the_linears_outputs():
    """Summed over the linears, ||(W - Q) x||^2 on the calibration inputs (of the float model:
    one-pass statistics) is lower with the importance-weighted scales than with plain ones."""
    dense = make_tiny(layers=2)
    names = [n for n, mod in dense.named_modules() if isinstance(mod, torch.nn.Linear) and ".layers." in n]
    with torch.no_grad():  # make the inputs' energies uneven, as real activations are
        dense.model.embed_tokens.weight[:, ::5] *= 6
    xs = {n: _inputs(dense, n) for n in names}
    err = {}
    for method in ("rtn", "imatrix"):
        m = make_tiny(layers=2)
        with torch.no_grad():
            m.model.embed_tokens.weight[:, ::5] *= 6
        stage = {"method": method, "format": "gguf-q4_0", "embed": "q4_0"}
        if method == "imatrix":
            stage["sequential"] = False
        res = compress(m, {"stages": [stage]}, calibration=WINDOWS)
        assert {r.type for r in res.context.quant.values()} == {"Q4_0"}
        assert "model.embed_tokens" in res.context.quant
        err[method] = sum(float(((dense.get_submodule(n).weight - m.get_submodule(n).weight) @ xs[n].T).pow(2).sum())
                          for n in names)
    assert err["imatrix"] < 0.95 * err["rtn"]


def test_one_pass_imatrix_uses_the_float_models_statistics():
    m = make_tiny(layers=2)
    x = _inputs(m, "model.layers.1.mlp.up_proj")
    res = compress(m, {"stages": [{"method": "imatrix", "format": "gguf-iq4_nl", "sequential": False}]},
                   calibration=WINDOWS)
    assert res.stages[0]["linears"] == 14
    from pocketlm.quant.ggml import quantize_matrix

    m2 = make_tiny(layers=2)
    want = quantize_matrix(m2.get_submodule("model.layers.1.mlp.up_proj").weight, "IQ4_NL", x.pow(2).mean(0))[0]
    got = m.get_submodule("model.layers.1.mlp.up_proj").weight
    assert torch.allclose(got, want, atol=1e-6)


def test_a_bfloat16_calibration_pass_gives_nearly_the_same_statistics():
    """Under bfloat16 autocast the layers run in bfloat16 (their outputs differ from float32's
    by its rounding) yet the importance matrix stays within 3% of the float32 one."""
    m = make_tiny(layers=2)
    ref, fast = ImatrixProcessor(lambda n: True), ImatrixProcessor(lambda n: True)
    run_layerwise(m, WINDOWS, ref)
    run_layerwise(m, WINDOWS, fast, compute_dtype=torch.bfloat16)
    rel = {name: ((fast.imatrix[name] - h).norm() / h.norm()).item() for name, h in ref.imatrix.items()}
    assert max(rel.values()) < 0.03 and rel["model.layers.1.mlp.down_proj"] > 0, rel
