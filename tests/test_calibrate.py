"""The layer-wise calibration engine (calibrate.py): each linear sees the inputs of a full forward."""
import torch
from torch import nn

from pocketlm.calibrate import LayerProcessor, run_layerwise
from pocketlm.context import Context
from pocketlm.quant.rtn import RTN
from tests.conftest import make_tiny, make_tiny_gemma3


class Recorder(LayerProcessor):
    modifies_layer = False

    def __init__(self):
        self.seen = {}

    def wants(self, name):
        return True

    def observe(self, name, x):
        self.seen.setdefault(name, []).append(x.clone())


def full_forward_inputs(model, windows):
    """Inputs of every linear inside the decoder layers from ordinary full forward passes."""
    seen, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and ".layers." in name:
            handles.append(mod.register_forward_hook(
                lambda m, a, o, name=name: seen.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]).clone())))
    with torch.no_grad():
        for w in windows:
            model(w[None], use_cache=False)
    for h in handles:
        h.remove()
    return seen


def test_engine_gives_each_linear_the_inputs_of_a_full_forward():
    """Also for Gemma 3, whose sliding-window layers (window 16 < 40 tokens) get other masks and
    rotary tables than its global layers: each layer must get its own."""
    for arch in ("llama", "qwen2", "gemma3_text"):
        model = make_tiny_gemma3(layers=3) if arch == "gemma3_text" else make_tiny(arch, layers=3)
        windows = torch.randint(0, 1000, (3, 40))
        rec = Recorder()
        run_layerwise(model, windows, rec)
        ref = full_forward_inputs(model, windows)
        assert set(rec.seen) == set(ref) and len(ref) == 3 * 7
        for name in ref:
            for a, b in zip(rec.seen[name], ref[name]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class QuantizeAndRecord(Recorder):
    """Quantizes each layer after observing it: later layers must see the quantized ones."""

    modifies_layer = True

    def process(self, layer):
        for name, lin in layer.linears.items():
            with torch.no_grad():
                lin.weight.copy_(torch.round(lin.weight * 8) / 8)


def test_sequential_scheme_feeds_later_layers_from_transformed_layers(tmp_path):
    model = make_tiny(layers=3)
    windows = torch.randint(0, 1000, (2, 32))
    rec = QuantizeAndRecord()
    run_layerwise(model, windows, rec)
    # after the run every layer is transformed; each layer's input (what its q_proj sees, through
    # the input norm) must be what a full forward of the transformed model gives it. Within a
    # layer, o_proj and the MLP were observed before that layer itself was transformed.
    ref = full_forward_inputs(model, windows)
    untouched = full_forward_inputs(make_tiny(layers=3), windows)
    for name in [n for n in ref if n.endswith("q_proj")]:
        if not name.startswith("model.layers.0."):
            assert not torch.allclose(untouched[name][0], ref[name][0], atol=1e-3)
        for a, b in zip(rec.seen[name], ref[name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_offload_to_disk_gives_the_same_inputs():
    model = make_tiny(layers=2)
    windows = torch.randint(0, 1000, (2, 24))
    a, b = Recorder(), Recorder()
    run_layerwise(model, windows, a)
    run_layerwise(model, windows, b, offload=True)
    for name in a.seen:
        for x, y in zip(a.seen[name], b.seen[name]):
            assert torch.equal(x, y)


def test_rtn_stage_quantizes_only_decoder_linears():
    model = make_tiny(layers=2)
    head = model.lm_head.weight.clone()
    ctx = Context(model=model)
    RTN(bits=3, group_size=32).run(ctx)
    assert set(ctx.quant) == {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    assert torch.equal(model.lm_head.weight, head)
    q = model.model.layers[0].mlp.down_proj.weight  # 64 x 160: groups of 32
    for g in range(5):
        assert q[0, 32 * g: 32 * (g + 1)].unique().numel() <= 8
