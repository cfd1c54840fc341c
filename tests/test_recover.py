"""Recovery keeps the compressed structure exactly and lowers the loss toward the teacher."""
import copy

import pytest
import torch

from tests.conftest import make_tiny, make_tiny_tokenizer
from pocketlm.context import CalibrationConfig, GGMLRecord
from pocketlm.errors import PocketError
from pocketlm.pipeline import compress
from pocketlm.recover import distill
from pocketlm.recover.trainable import attach
from pocketlm.models import layer_linears

pytestmark = pytest.mark.slow  # the real model, llama.cpp, training or a browser (not in make test-fast)

TEXT = "the quick brown fox jumps over the lazy dog; a model of words, " * 300


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    p = tmp_path_factory.mktemp("rec") / "text.txt"
    p.write_text(TEXT)
    return str(p)


def run(stages, text, layers=3, **rec):
    tok = make_tiny_tokenizer()
    model = make_tiny(layers=layers, vocab=len(tok))
    teacher = copy.deepcopy(model)
    recover = {"method": "recover", "tokens": 2048, "seq_len": 64, "windows_per_step": 4, "lr": 3e-3, **rec}
    res = compress(model, {"stages": [*stages, recover]}, tokenizer=tok,
                   calibration=CalibrationConfig(windows=4, seq_len=64, text=text))
    return res, teacher, tok


def kl_to(teacher, model, ids):
    with torch.no_grad():
        lt = teacher(ids).logits.log_softmax(-1)
        ls = model(ids).logits.log_softmax(-1)
    return float((lt.exp() * (lt - ls)).sum(-1).mean())


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_pruned_weights_stay_exactly_zero_and_n_m_holds(text, mode):
    res, teacher, tok = run([{"method": "magnitude", "pattern": "2:4"}], text, mode=mode)
    moved = 0
    for name, keep in res.context.masks.items():
        w = res.model.get_submodule(name).weight
        assert bool((w[~keep] == 0).all()), name
        assert int(keep.reshape(keep.shape[0], -1, 4).sum(-1).max()) == 2
        moved += int((w[keep] != teacher.get_submodule(name).weight[keep]).sum())
    assert moved > 0  # the kept weights did train
    s = res.stages[-1]
    assert s["loss_last"] < s["loss_first"]


def test_recovery_lowers_kl_to_the_teacher_on_held_out_text(text):
    tok = make_tiny_tokenizer()
    ids = tok("a lazy model jumps over the quick words of the brown dog " * 6, return_tensors="pt").input_ids[:, :64]
    res0, teacher, _ = run([{"method": "remove-layers", "layers": [1]}], text, layers=4, tokens=64)
    res1, _, _ = run([{"method": "remove-layers", "layers": [1]}], text, layers=4, tokens=8192)
    assert res1.model.config.num_hidden_layers == 3
    assert kl_to(teacher, res1.model, ids) < 0.7 * kl_to(teacher, res0.model, ids)


def test_a_quantized_linear_keeps_its_codes_and_moves_its_scales(text):
    res, teacher, _ = run([{"method": "rtn", "bits": 4, "group_size": 32, "targets": ["*.mlp.*"]}], text)
    before = compress(copy.deepcopy(teacher), {"stages": [{"method": "rtn", "bits": 4, "group_size": 32,
                                                           "targets": ["*.mlp.*"]}]})
    assert res.context.quant
    for name, rec in res.context.quant.items():
        w = res.model.get_submodule(name).weight
        qw = rec.to_quantized(w)
        assert torch.equal(qw.dequantize(), w)  # on its grid: the scales it records, integer codes
        old = before.context.quant[name]
        assert torch.equal(qw.codes, old.to_quantized(before.model.get_submodule(name).weight).codes)
        assert not torch.equal(rec.scales, old.scales)
        assert rec.scales.dtype == old.scales.dtype and torch.equal(rec.scales, rec.scales.half().float())


@pytest.mark.parametrize("fmt", ["gguf-q4_0", "gguf-q4_1", "gguf-iq4_nl", "gguf-q8_0"])
def test_a_ggml_linear_is_repacked_to_the_bytes_it_now_holds(text, fmt):
    res, teacher, _ = run([{"method": "rtn", "format": fmt}], text)
    before = compress(teacher, {"stages": [{"method": "rtn", "format": fmt}]}).context.quant
    assert all(isinstance(r, GGMLRecord) for r in res.context.quant.values())
    changed = 0
    for name, rec in res.context.quant.items():
        w = res.model.get_submodule(name).weight
        assert torch.equal(rec.weight.dequantize(), w)  # the bytes the GGUF export writes
        changed += int(not (rec.weight.data == before[name].weight.data).all())
    assert changed > 0


def test_with_rounding_codes_move_and_every_weight_stays_on_its_grid(text):
    """The straight-through rounding: codes change (some), and the weights left in the model are
    exactly their records' grids, for the integer grid and for GGML block types."""
    stages = [{"method": "rtn", "bits": 3, "group_size": 32, "targets": ["*.mlp.*"]},
              {"method": "rtn", "format": "gguf-iq4_nl", "targets": ["*.self_attn.*"]}]
    # the latent weights start on their grid points: a code moves once its weight has travelled
    # half a step, so this learning rate is high on purpose
    res, teacher, _ = run(stages, text, rounding=True, lr=3e-3, grid_lr=1e-4)
    before = compress(copy.deepcopy(teacher), {"stages": stages})
    moved = {"grid": 0, "ggml": 0}
    for name, rec in res.context.quant.items():
        w = res.model.get_submodule(name).weight
        old = before.context.quant[name]
        if isinstance(rec, GGMLRecord):
            assert torch.equal(rec.weight.dequantize(), w)
            codes = lambda r: r.weight.data.reshape(-1, 18)[:, 2:]  # noqa: E731  IQ4_NL: float16 d, 16 code bytes
            moved["ggml"] += int((codes(rec) != codes(old)).any())
        else:
            qw = rec.to_quantized(w)
            assert torch.equal(qw.dequantize(), w)
            moved["grid"] += int((qw.codes != old.to_quantized(before.model.get_submodule(name).weight).codes).any())
    assert moved["grid"] > 0 and moved["ggml"] > 0, moved


def test_straight_through_gradient_reaches_the_latent_weight_as_the_rounded_weight_gets_it():
    from pocketlm.context import QuantRecord
    from pocketlm.quant.grid import QuantSpec, quantize_weight
    from pocketlm.recover.trainable import GroupGrid

    lin = torch.nn.Linear(64, 8, bias=False)
    qw = quantize_weight(lin.weight.detach(), QuantSpec(bits=4, group_size=32))
    lin.weight.data = qw.dequantize()
    grid = GroupGrid(lin, QuantRecord("rtn", qw.spec, qw.scales, qw.zeros, (8, 64)), None, rounding=True)
    x = torch.randn(5, 64)
    w = grid.weight_from(grid.scales())
    assert torch.equal(w, lin.weight)  # starts exactly where the quantizer left it
    w.retain_grad()
    (torch.nn.functional.linear(x, w) ** 2).sum().backward()
    inside = (grid.latent / grid.scales()[:, grid.idx] + grid.zeros[:, grid.idx]).round().clamp(0, 15) \
        == (grid.latent / grid.scales()[:, grid.idx] + grid.zeros[:, grid.idx]).round()
    assert torch.allclose(grid.latent.grad[inside], w.grad[inside])  # d w / d latent = 1 inside the range
    assert grid.t.grad is not None and grid.t.grad.abs().sum() > 0  # and the scales learn from the rounded weight


def test_removed_layers_and_merged_heads_stay(text):
    res, _, _ = run([{"method": "kv-heads", "kv_heads": 1}, {"method": "remove-layers", "layers": [0]}], text)
    assert res.model.config.num_hidden_layers == 2
    assert res.model.config.num_key_value_heads == 1
    assert res.model.model.layers[0].self_attn.k_proj.weight.shape[0] == 16


def test_without_a_teacher_it_says_how_to_get_one():
    from pocketlm.context import Context
    from pocketlm.recover.stage import Recover

    with pytest.raises(PocketError, match="teacher"):
        Recover().run(Context(make_tiny(layers=1)))


@pytest.mark.parametrize("optimizer,state_dtype", [("adashift", None), ("adashift", torch.bfloat16),
                                                   ("adamw", None)])
def test_resumed_training_ends_where_an_uninterrupted_one_does(tmp_path, optimizer, state_dtype):
    tok = make_tiny_tokenizer()
    ids = tok(TEXT, return_tensors="pt").input_ids[0]
    windows = ids[: 12 * 32].view(12, 32)

    def train(state=None, stop=None, seed_model=None):
        student = make_tiny(layers=2, vocab=len(tok), seed=1)
        teacher = make_tiny(layers=2, vocab=len(tok), seed=2)
        tr = attach(student, layer_linears(student), {}, {}, "full")
        cfg = distill.TrainConfig(steps=6, windows_per_step=2, micro_batch=1, lr=1e-3, grid_lr=1e-3,
                                  optimizer=optimizer, adashift_n=2, checkpoint_every=2, state_file=state,
                                  stop_after=stop, state_dtype=state_dtype)
        log = distill.train(student, teacher, windows, [{"params": tr.parameters()}], cfg)
        return student, log

    whole, log_whole = train()
    state = tmp_path / "state.pt"
    _, log_cut = train(state, stop=3)  # killed after step 3: the last checkpoint is step 2
    assert state.is_file() and len(log_cut.loss) == 3
    resumed, log_res = train(state)
    assert log_res.resumed_from == 2
    assert log_res.loss == log_whole.loss
    for (n, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    assert not state.exists()  # a finished run leaves no state behind


def test_an_unreadable_state_file_is_refused_with_the_fix(tmp_path):
    state = tmp_path / "state.pt"
    state.write_bytes(b"not a checkpoint")
    student, teacher = make_tiny(layers=1, seed=1), make_tiny(layers=1, seed=2)
    cfg = distill.TrainConfig(steps=2, windows_per_step=1, micro_batch=1, lr=1e-3, grid_lr=1e-3, state_file=state)
    windows = torch.randint(0, student.config.vocab_size, (2, 16))
    with pytest.raises(PocketError, match="delete it"):
        distill.train(student, teacher, windows, [{"params": list(student.parameters())}], cfg)
    assert state.read_bytes() == b"not a checkpoint"
