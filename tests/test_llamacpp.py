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
    """APTQ restricted to GGUF block types: the budget holds, the plan mixes types, and the
    GGUF file stores each linear in the type the plan chose (llama.cpp runs it as PyTorch does)."""
    from pocketlm.export.ggml_blocks import FORMATS, format_for
    from pocketlm.measure import TorchScorer

    m = make_tiny(layers=2)
    formats = ["gguf-q4_0", "gguf-q5_0", "gguf-q8_0"]
    res = compress(m, {"stages": [{"method": "aptq", "bpw": 5.5, "formats": formats, "sensitivity": "trace"}]},
                   calibration=WINDOWS)
    quant = res.context.quant
    assert res.context.size_report()["bpw_quantized"] <= 5.5
    chosen = {format_for(r.spec).name for r in quant.values()}
    assert len(chosen) >= 2 and chosen <= {"Q4_0", "Q5_0", "Q8_0"}
    types = G.write(m, tokenizer, tmp_path / "mix.gguf", quant, embed_type="F32")
    for name, rec in quant.items():
        layer, rest = name.split(".")[2], name.split(".")[-1]
        gname = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                 "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[rest]
        assert types[f"blk.{layer}.{gname}.weight"] == format_for(rec.spec).name
    bits = sum(FORMATS[t].bpw * res.context.module(n).weight.numel() for n, t in
               ((n, format_for(r.spec).name) for n, r in quant.items()))
    assert bits <= 5.5 * sum(res.context.module(n).weight.numel() for n in quant)
    cpp = _logprobs(LlamaCppScorer(tmp_path / "mix.gguf", n_ctx=64, threads=2))
    ours = _logprobs(TorchScorer(m))
    assert (cpp - ours).std() < 0.02


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
    with pytest.raises(PocketError):
        load(tmp_path / "cut.gguf")
