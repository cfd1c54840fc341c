import pytest
import torch

from pocketlm import PocketError, compress
from pocketlm.calibrate import LayerProcessor, run_layerwise
from pocketlm.context import Context
from pocketlm.quant.aptq import APTQ
from pocketlm.quant.sensitivity import layer_curvature
from tests.conftest import make_tiny

pytestmark = pytest.mark.slow  # the real model, llama.cpp, training or a browser (not in make test-fast)


def test_too_small_budget_fails_with_a_clear_message():
    model = make_tiny(layers=2)
    stage = APTQ(bpw=2.0, bits=[2, 3, 4], group_sizes=[128])
    names = [n for n in Context(model=model).linears() if stage.selects(n)]
    with pytest.raises(PocketError, match=r"budget 2.0 bpw is below the smallest allowed plan \(2\.\d+ bpw"):
        stage.budget_bits(Context(model=model), names)


def test_budget_needs_exactly_one_of_bpw_and_bytes():
    with pytest.raises(ValueError, match="exactly one budget"):
        APTQ()


@pytest.mark.parametrize("mode,bpw", [("attention", 3.3), ("trace", 2.9)])
def test_aptq_honours_the_budget_to_the_bit_and_mixes_widths(tokenizer, mode, bpw):
    from pocketlm.data import calibration_windows

    model = make_tiny(layers=2)
    calib = calibration_windows(tokenizer, n=4, seq_len=64)
    res = compress(model, {"stages": [{"method": "aptq", "bpw": bpw, "sensitivity": mode, "group_sizes": [32, -1],
                                       "analysis_windows": 2, "grad_windows": 2}]},
                   tokenizer=tokenizer, calibration=calib)
    size = res.context.size_report()
    stored = sum(r.storage_bits for r in res.context.quant.values())
    assert stored <= int(bpw * size["quantized_params"]) and size["bpw_quantized"] <= bpw
    assert size["bpw_quantized"] > bpw - 0.15  # the budget is spent, not wasted
    assert len({(r.spec.bits, r.spec.group_size) for r in res.context.quant.values()}) > 1


class _Curv(LayerProcessor):
    modifies_layer = False

    def __init__(self, name):
        self.name, self.result = name, None

    def process(self, layer):
        if self.name in layer.linears:
            self.result = (layer_curvature(layer, [self.name], windows=len(layer.inputs)), layer)


@pytest.mark.parametrize("proj", ["self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"])
def test_curvature_predicts_the_layer_output_error(proj):
    """Gauss-Newton through the attention/MLP: the predicted cost of a small weight change
    matches the squared change it causes at the layer's output."""
    torch.manual_seed(0)
    model = make_tiny(layers=1)
    name = f"model.layers.0.{proj}"
    windows = torch.randint(0, 3000, (24, 32))
    proc = _Curv(name)
    run_layerwise(model, windows, proc)
    curv, layer = proc.result
    lin = layer.linears[name]
    dW = torch.randn_like(lin.weight) * 1e-3
    with torch.no_grad():
        before = [layer.forward(layer.inputs[i]).clone() for i in range(len(layer.inputs))]
        lin.weight += dW
        after = [layer.forward(layer.inputs[i]) for i in range(len(layer.inputs))]
    n_tokens = sum(b.shape[1] for b in before)
    actual = 2.0 / n_tokens * sum((a - b).pow(2).sum() for a, b in zip(after, before)).item()
    predicted = curv[name].cost(dW)
    assert 0.5 < predicted / actual < 2.0, (predicted, actual)


def test_model_sampled_labels_estimate_the_kl_and_data_labels_do_not():
    """target "kl": with next tokens drawn from the model, sum_t (g_t . d_t)^2 / 2 over a small
    change d of the last layer's output estimates the KL it causes; the text's own tokens (here
    random) overestimate it on a model with peaked distributions."""
    from pocketlm.quant.sensitivity import loss_gradients

    model = make_tiny(layers=2, vocab=512)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # peaked next-token distributions (entropy ~2.5 nats)
    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(1))
    delta = 0.05 * torch.randn(8, 64, 64, generator=torch.Generator().manual_seed(2))

    def logp(shift: bool) -> torch.Tensor:
        out = []
        for w in range(ids.shape[0]):
            add = lambda mod, args, o: (o[0] + delta[w : w + 1], *o[1:]) if isinstance(o, tuple) \
                else o + delta[w : w + 1]  # noqa: E731
            h = model.model.layers[-1].register_forward_hook(add) if shift else None
            with torch.no_grad():
                out.append(model(ids[w : w + 1]).logits[0, :-1].float().log_softmax(-1))
            if h is not None:
                h.remove()
        return torch.cat(out)

    p, q = logp(False), logp(True)
    kl = float((p.exp() * (p - q)).sum())
    est = {lab: float(((loss_gradients(model, ids, labels=lab)[-1][:, :-1] * delta[:, :-1]).sum(-1) ** 2).sum()) / 2
           for lab in ("model", "data")}
    assert abs(est["model"] / kl - 1) < 0.15, (est, kl)
    assert est["data"] / kl > 1.5, (est, kl)


def test_bytes_budget_is_honoured(tokenizer):
    from pocketlm.data import calibration_windows

    model = make_tiny(layers=2)
    ctx = Context(model=model)
    names = [n for n in ctx.linears() if ".layers." in n]
    qparams = sum(ctx.module(n).weight.numel() for n in names)
    budget = int((16 * ctx.other_params(names) + 3.2 * qparams) / 8)
    res = compress(model, {"stages": [{"method": "aptq", "bytes": budget, "sensitivity": "trace",
                                       "group_sizes": [32]}]},
                   tokenizer=tokenizer, calibration=calibration_windows(tokenizer, n=2, seq_len=32))
    # within budget, and less left over than the smallest upgrade (one bit more on a 64x64 linear)
    assert budget - 64 * 64 // 8 < res.context.size_report()["packed_bytes"] <= budget


def test_aptq_clip_reaches_every_candidate_grid():
    from pocketlm.recipe import from_dict

    st = from_dict({"stages": [{"method": "aptq", "bpw": 3.5, "clip": True}]}).stages[0]
    assert st.specs() and all(s.clip for s in st.specs())


def test_gguf_types_budget_below_q4_0_is_refused():
    model = make_tiny(layers=2)
    stage = APTQ(bpw=3.5, formats=["gguf-q4_0", "gguf-q8_0"])
    names = [n for n in Context(model=model).linears() if stage.selects(n)]
    with pytest.raises(PocketError, match=r"below the smallest allowed plan \(4\.5000 bpw with Q4_0\)"):
        stage.budget_bits(Context(model=model), names)
    with pytest.raises(Exception, match="unknown GGML type 'gguf-q7_k'"):
        APTQ(bpw=5.0, formats=["gguf-q7_k"])
    assert APTQ(bpw=5.0, formats=["gguf-q4_k", "iq4_nl"]).formats == ["Q4_K", "IQ4_NL"]


def test_aptq_over_ggml_types_to_a_file_bytes_budget(tmp_path, tokenizer):
    """Whole-file budget: the GGUF file's tensor data (planned linears, the embedding at its type,
    norms F32) stays within --bytes, and the plan mixes types; with the RTN quantizer too."""
    from pocketlm import compress
    from pocketlm.export import gguf as G
    from pocketlm.quant.ggml import get_type

    windows = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    for quantizer in ("gptq", "rtn"):
        m = make_tiny(layers=2, hidden=256, inter=512, heads=4, kv_heads=4, head_dim=64, vocab=512)
        emb = 512 * 256 // 32 * get_type("Q8_0").type_size
        norms = sum(p.numel() * 4 for p in m.parameters() if p.dim() == 1)
        linears = sum(mod.weight.numel() for n, mod in m.named_modules()
                      if isinstance(mod, torch.nn.Linear) and ".layers." in n)
        budget = emb + norms + int(linears * 5.0 / 8)  # 5 bpw for the linears
        stage = {"method": "aptq", "bytes": budget, "formats": ["q8_0", "q6_k", "q4_k", "iq4_nl", "q3_k"],
                 "embed": "q8_0", "sensitivity": "hessian", "quantizer": quantizer, "analysis_windows": 2}
        res = compress(m, {"stages": [stage]}, calibration=windows)
        quant = res.context.quant
        assert quant["model.embed_tokens"].type == "Q8_0"
        assert len({r.type for n, r in quant.items() if n != "model.embed_tokens"}) >= 2
        from gguf import GGUFReader

        G.write(m, tokenizer, tmp_path / f"{quantizer}.gguf", quant)  # (a small vocabulary: bytes only, not run)
        data = sum(int(t.n_bytes) for t in GGUFReader(str(tmp_path / f"{quantizer}.gguf")).tensors)
        assert budget * 0.97 < data <= budget
