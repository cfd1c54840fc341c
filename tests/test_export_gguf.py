import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from pocketlm import compress, models
from pocketlm.errors import PocketError
from pocketlm.export import gguf as G
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from tests.conftest import make_tiny

pytestmark = pytest.mark.slow  # the real model, llama.cpp, training or a browser (not in make test-fast)


def _gguf_tensors(path):
    return {t.name: t for t in GGUFReader(str(path)).tensors}


def test_f32_export_reloads_to_identical_logits(tmp_path, tokenizer):
    m = make_tiny(layers=2)
    G.write(m, tokenizer, tmp_path / "t.gguf", linear_type="F32", embed_type="F32")
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="t.gguf", dtype=torch.float32)
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # q/k rows were permuted for llama.cpp's RoPE; transformers undoes it
        assert torch.equal(back(ids).logits, m(ids).logits)


@pytest.mark.parametrize("fmt", ["gguf-q4_0", "gguf-q4_1", "gguf-q8_0", "gguf-q5_1", "gguf-iq4_nl"])
def test_exported_bytes_are_the_quantizers_bytes(tmp_path, tokenizer, fmt):
    m = make_tiny(layers=1)
    windows = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    res = compress(m, {"stages": [{"method": "gptq", "format": fmt}]}, calibration=windows)
    types = G.write(m, tokenizer, tmp_path / "q.gguf", res.context.quant)
    want_type = fmt.removeprefix("gguf-").upper()
    tensors = _gguf_tensors(tmp_path / "q.gguf")
    n_head, n_kv = m.config.num_attention_heads, m.config.num_key_value_heads
    for name, rec in res.context.quant.items():
        gname = name.replace("model.layers.", "blk.").replace("self_attn.q_proj", "attn_q") \
            .replace("self_attn.k_proj", "attn_k").replace("self_attn.v_proj", "attn_v") \
            .replace("self_attn.o_proj", "attn_output").replace("mlp.", "ffn_").replace("_proj", "") + ".weight"
        assert types[gname] == want_type
        stored = torch.from_numpy(np.asarray(tensors[gname].data).copy())
        heads = n_head if name.endswith("q_proj") else n_kv if name.endswith("k_proj") else None
        mine = torch.from_numpy(rec.weight.data.copy())
        weight = m.get_submodule(name).weight.detach()
        if heads:  # llama.cpp's row order for q/k
            mine, weight = G._rope_permute(mine, heads), G._rope_permute(weight, heads)
        assert torch.equal(stored, mine), name
        back = dequantize(np.asarray(tensors[gname].data), GGMLQuantizationType[want_type]).reshape(weight.shape)
        assert np.array_equal(back, weight.numpy()), name  # the model holds exactly what the file stores
    assert types["blk.0.attn_norm.weight"] == "F32" and types["token_embd.weight"] == "F16"


def test_linears_off_any_gguf_grid_are_refused(tmp_path, tokenizer):
    m = make_tiny(layers=1)
    res = compress(m, "rtn-w4-g128")
    with pytest.raises(PocketError, match="no GGUF block type holds.*format: gguf-q4_k"):
        G.write(m, tokenizer, tmp_path / "x.gguf", res.context.quant)


def test_unsupported_architecture_fails_before_any_work(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    r = subprocess.run([sys.executable, "-m", "pocketlm.cli", "export", str(d), "--out", str(tmp_path / "o.gguf")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "gpt2" in r.stderr
    assert not (tmp_path / "o.gguf").exists()


def test_truncated_gguf_is_a_clear_error(tmp_path):
    src = models.resolve("smollm2-135m").describe()
    bad = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    with pytest.raises(PocketError,
                       match="not a valid GGUF file: tensor .token_embd.weight. .* runs past the end of the file"):
        models.load(str(bad))
