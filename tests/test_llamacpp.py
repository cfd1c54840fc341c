"""The exported GGUF files in llama.cpp itself (llama-cpp-python)."""
import json
import subprocess
import sys

import pytest
import torch

from pocketlm import compress
from pocketlm.errors import PocketError
from pocketlm.export import gguf as G
from pocketlm.measure import evaluate_windows
from pocketlm.runtime.llamacpp import LlamaCppScorer, load
from tests.conftest import make_tiny

pytestmark = pytest.mark.slow  # the real model, llama.cpp, training or a browser (not in make test-fast)

WINDOWS = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(5))


def _torch_vs_cpp(model, path):
    """Mean KL(torch || llama.cpp) and top-1 agreement over the windows, llama.cpp as 'model'."""
    return evaluate_windows(LlamaCppScorer(path, n_ctx=64, threads=2), WINDOWS, reference=model, chunk=16)


def test_f32_gguf_runs_in_llama_cpp_with_the_same_logits(tmp_path, tokenizer):
    m = make_tiny(layers=2)
    G.write(m, tokenizer, tmp_path / "f32.gguf", linear_type="F32", embed_type="F32")
    r = _torch_vs_cpp(m, tmp_path / "f32.gguf")
    assert r.kl < 1e-5 and r.top1 == 1.0
    assert r.ppl == pytest.approx(r.ref_ppl, rel=1e-4)


def _logprobs(scorer):
    return torch.cat([torch.cat(list(scorer.window(i, w, 16))) for i, w in enumerate(WINDOWS)])


@pytest.mark.parametrize("fmt", ["gguf-q8_0", "gguf-q4_0", "gguf-q4_1", "gguf-q5_0"])
def test_quantized_gguf_matches_the_pytorch_model_it_came_from(tmp_path, tokenizer, fmt):
    """Tolerance: llama.cpp multiplies the quantized weights with activations rounded to Q8_0
    blocks (and *_1 offsets are float16), so its log-probabilities differ from the PyTorch
    model's by noise of std < 0.02 nats (the log-probs spread ~0.64) and at most 0.15; at 4 and
    5 bits that is far below the distance from the unquantized model."""
    from pocketlm.measure import TorchScorer

    m = make_tiny(layers=2)
    res = compress(m, {"stages": [{"method": "gptq", "format": fmt}]}, calibration=WINDOWS)
    G.write(m, tokenizer, tmp_path / "q.gguf", res.context.quant, embed_type="F32")
    cpp = _logprobs(LlamaCppScorer(tmp_path / "q.gguf", n_ctx=64, threads=2))
    ours = _logprobs(TorchScorer(m))
    dense = _logprobs(TorchScorer(make_tiny(layers=2)))
    assert (cpp - ours).std() < 0.02 and (cpp - ours).abs().max() < 0.15
    if fmt != "gguf-q8_0":  # at 8 bits the weight error is below the activation rounding
        assert (cpp - ours).std() < 0.3 * (cpp - dense).std()


def test_aptq_on_gguf_types_exports_one_type_per_tensor(tmp_path, tokenizer):
    """APTQ restricted to GGML types: the budget holds, the plan mixes types, and the GGUF file
    stores each linear in the type the plan chose (llama.cpp runs it as PyTorch does)."""
    from pocketlm.measure import TorchScorer

    m = make_tiny(layers=2)
    formats = ["gguf-q4_0", "gguf-iq4_nl", "gguf-q5_0", "gguf-q8_0"]
    res = compress(m, {"stages": [{"method": "aptq", "bpw": 5.5, "formats": formats, "sensitivity": "trace"}]},
                   calibration=WINDOWS)
    quant = res.context.quant
    assert res.context.size_report()["bpw_quantized"] <= 5.5
    chosen = {r.type for r in quant.values()}
    assert len(chosen) >= 2 and chosen <= {"Q4_0", "IQ4_NL", "Q5_0", "Q8_0"}
    types = G.write(m, tokenizer, tmp_path / "mix.gguf", quant, embed_type="F32")
    for name, rec in quant.items():
        layer, rest = name.split(".")[2], name.split(".")[-1]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[rest]
        assert types[f"blk.{layer}.{gname}.weight"] == rec.type
    assert sum(r.storage_bits for r in quant.values()) <= 5.5 * sum(r.shape[0] * r.shape[1] for r in quant.values())
    cpp = _logprobs(LlamaCppScorer(tmp_path / "mix.gguf", n_ctx=64, threads=2))
    ours = _logprobs(TorchScorer(m))
    assert (cpp - ours).std() < 0.02


def _tiny_wide(hidden=256, inter=512, heads=4, head_dim=64, tied=True):
    """One layer whose rows take the super-block types (multiples of 256 inputs)."""
    return make_tiny(layers=1, hidden=hidden, inter=inter, heads=heads, kv_heads=heads, head_dim=head_dim, tied=tied)


@pytest.mark.parametrize("fmt", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs", "iq4_nl"])
def test_k_and_iq_types_read_back_by_llama_cpp_exactly(tmp_path, tokenizer, fmt):
    """llama.cpp's own dequantizer reads pocketlm's bytes as pocketlm does: a token embedding
    on the type is looked up by ggml_get_rows (exact dequantization, no activation rounding), so
    with every other tensor in F32 llama.cpp's logits equal the PyTorch model's."""
    from pocketlm.context import GGMLRecord
    from pocketlm.quant.ggml import quantize_matrix

    m = _tiny_wide(tied=False)
    emb = m.get_input_embeddings()
    deq, gw, _, _ = quantize_matrix(emb.weight, fmt.upper(), torch.rand(emb.weight.shape[1]))
    with torch.no_grad():
        emb.weight.copy_(deq)
    types = G.write(m, tokenizer, tmp_path / "e.gguf", {"model.embed_tokens": GGMLRecord("rtn", gw)},
                    linear_type="F32", embed_type="F32")
    assert types["token_embd.weight"] == fmt.upper()
    from pocketlm.measure import TorchScorer

    assert _torch_vs_cpp(m, tmp_path / "e.gguf").kl < 1e-5
    cpp = _logprobs(LlamaCppScorer(tmp_path / "e.gguf", n_ctx=64, threads=2))
    ours = _logprobs(TorchScorer(m))
    # every log-probability within llama.cpp's float rounding (a misread block would be off by
    # far more), not the argmax: this tiny model's predictions are near-uniform, and top-1
    # agreement would hinge on near-ties that the summation order can flip
    assert float((cpp - ours).abs().max()) < 0.02


@pytest.mark.parametrize("fmt", ["q2_k", "q4_k", "q6_k", "iq4_xs"])
def test_k_types_run_in_llama_cpp_as_in_pytorch(tmp_path, tokenizer, fmt):
    """Rows of 256 and 512 inputs take the super-block types; GPTQ's codes run in llama.cpp as
    in PyTorch, up to llama.cpp's rounding of activations to 8 bits per 256 (std ~0.035 nats)."""
    from pocketlm.measure import TorchScorer

    m = _tiny_wide()
    res = compress(m, {"stages": [{"method": "gptq", "format": fmt}]}, calibration=WINDOWS)
    assert {r.type for r in res.context.quant.values()} == {fmt.upper()}
    G.write(m, tokenizer, tmp_path / "k.gguf", res.context.quant, embed_type="F32")
    cpp = _logprobs(LlamaCppScorer(tmp_path / "k.gguf", n_ctx=64, threads=2))
    ours = _logprobs(TorchScorer(m))
    assert (cpp - ours).std() < 0.05 and (cpp - ours).abs().max() < 0.4


def test_fallback_matches_llama_cpps_quantizer(tmp_path, tokenizer):
    """llama.cpp's own quantizer (``llama_model_quantize``, pure mode) on rows of 576, 640, 896,
    1536 and 2048 inputs picks the types ``quant.ggml.fallback`` predicts."""
    import llama_cpp

    from pocketlm.quant.ggml import fallback

    cases = [_tiny_wide(576, 1536, 9, 64), _tiny_wide(640, 2048, 8, 112)]  # o_proj inputs 576 and 896
    for k, m in enumerate(cases):
        src = tmp_path / f"f{k}.gguf"
        G.write(m, tokenizer, src, linear_type="F32", embed_type="F32")
        widths = {n: mod.weight.shape[1] for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
        for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"):
            out = tmp_path / f"q{k}-{t}.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            ftype = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}.get(t, t)  # pure: the preset's base type
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
            params.pure = True
            params.nthread = 2
            assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) == 0
            got = {tt.name: tt.tensor_type.name for tt in __import__("gguf").GGUFReader(str(out)).tensors}
            for name, d_in in widths.items():
                if name == "lm_head":
                    continue
                gname = G.tensor_name(m, name)
                assert got[gname] == fallback(t, d_in), (t, name, d_in)


def test_cli_eval_and_bench_on_a_gguf(tmp_path, tokenizer):
    m = make_tiny(layers=2)
    G.write(m, tokenizer, tmp_path / "t.gguf", linear_type="Q8_0")
    r = subprocess.run([sys.executable, "-m", "pocketlm.cli", "eval", str(tmp_path / "t.gguf"), "--windows", "2",
                        "--seq-len", "64", "--threads", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    assert ev["dtype"] == "gguf" and ev["tokens_scored"] == 2 * 63 and ev["ppl"] > 1
    r = subprocess.run([sys.executable, "-m", "pocketlm.cli", "bench", str(tmp_path / "t.gguf"), "--prompt", "32",
                        "--gen", "8", "--reps", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout.strip().splitlines()[-1])
    assert b["bytes"] == (tmp_path / "t.gguf").stat().st_size
    params = sum(p.numel() for p in m.parameters())  # tied head counted once, as in the file
    assert b["bpw"] == pytest.approx(b["bytes"] * 8 / params, rel=1e-3)


def test_truncated_gguf_is_refused_by_the_runtime(tmp_path, tokenizer):
    G.write(make_tiny(layers=1), tokenizer, tmp_path / "t.gguf")
    data = (tmp_path / "t.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(PocketError, match="cut.gguf is not a valid GGUF file: tensor .* runs past the end of the file"):
        load(tmp_path / "cut.gguf")


def test_gemma3_runs_in_llama_cpp_with_the_same_logits(tmp_path, tokenizer):
    """Sandwich norms written plus one, per-layer sliding windows and rotary bases: llama.cpp's
    gemma3 graph gives the PyTorch model's logits, in float and with pocketlm's own codes."""
    from tests.conftest import make_tiny_gemma3

    m = make_tiny_gemma3(layers=3)
    G.write(m, tokenizer, tmp_path / "f32.gguf", linear_type="F32", embed_type="F32")
    r = _torch_vs_cpp(m, tmp_path / "f32.gguf")
    assert r.kl < 1e-5 and r.top1 == 1.0
    res = compress(m, {"stages": [{"method": "imatrix", "format": "gguf-iq4_nl"}]}, calibration=WINDOWS)
    G.write(m, tokenizer, tmp_path / "q.gguf", res.context.quant, embed_type="F32")
    assert set(G.tensor_types_of(tmp_path / "q.gguf", m).values()) == {"IQ4_NL", "F32"}
    same = _torch_vs_cpp(m, tmp_path / "q.gguf").kl
    dense = _torch_vs_cpp(make_tiny_gemma3(layers=3), tmp_path / "q.gguf").kl
    assert same < 0.1 * dense


def test_bench_reports_the_kv_cache_llama_cpp_allocates(tmp_path, tokenizer):
    """The KV memory llama.cpp reports for a context equals pocketlm's float16 accounting."""
    from pocketlm import kv
    from pocketlm.runtime.llamacpp import bench

    m = make_tiny(layers=2)
    G.write(m, tokenizer, tmp_path / "t.gguf")
    r = bench(tmp_path / "t.gguf", threads=2, prompt=8, gen=2, reps=1, ctx=2048)
    assert r["n_ctx"] == 2048 and r["kv_cache_mib"] == kv.cache_bytes(m.config, 2048) / 2**20 == 0.5
