import json
import os
import subprocess
import sys

import pytest
import torch

from pocketlm import PocketError, compress, models
from pocketlm.recipe import from_dict, from_yaml, preset, preset_names
from tests.conftest import make_tiny


def test_presets_load_and_validate():
    assert {"rtn-w8", "rtn-w4-g128"} <= set(preset_names())
    s = preset("rtn-w4-g128").stages[0]
    assert (s.method, s.bits, s.group_size, s.sym) == ("rtn", 4, 128, False)
    for name in preset_names():  # every shipped preset parses, validates and names a registered method
        from pocketlm.stages import REGISTRY

        assert all(type(st) is REGISTRY[st.method] for st in preset(name).stages), name
    low = preset("aptq-low").stages[0]
    assert (low.bpw, low.clip, low.grad_windows, -1 in low.group_sizes) == (3.0, True, 16, True)


def test_recipe_typo_names_the_bad_key_and_the_valid_ones(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stages:\n  - method: rtn\n    bitz: 4\n")
    with pytest.raises(PocketError) as e:
        from_yaml(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert "unknown key 'bitz'" in msg and "valid keys: method, targets, ignore, bits, group_size" in msg


def test_unknown_method_and_bad_values():
    with pytest.raises(PocketError, match="unknown method 'rnt'; valid methods: .*rtn"):
        from_dict({"stages": [{"method": "rnt"}]})
    with pytest.raises(PocketError, match="'bits'"):
        from_dict({"stages": [{"method": "rtn", "bits": 12}]})
    with pytest.raises(PocketError, match="unknown key 'stage'"):
        from_dict({"stage": []})


@pytest.mark.parametrize("path", ["../victim.txt", "/tmp/victim.gguf", "a/../../b.gguf", "~/x.gguf", "", "."])
def test_export_paths_cannot_leave_the_output_directory(path):
    """A recipe is untrusted: its export paths are refused when it is read, before any work."""
    with pytest.raises(PocketError, match="relative path inside the output directory"):
        from_dict({"stages": [{"method": "rtn"}], "export": [{"format": "gguf", "path": path}]})
    ok = from_dict({"stages": [{"method": "rtn"}], "export": [{"format": "gguf", "path": "g/m.gguf"}]})
    assert ok.export[0].path == "g/m.gguf"


def test_cli_recipe_typo_is_one_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("stages:\n  - method: rtn\n    group: 64\n")
    r = subprocess.run([sys.executable, "-m", "pocketlm.cli", "compress", "smollm2-135m", "--recipe", str(p),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "unknown key 'group'" in r.stderr and "group_size" in r.stderr
    assert not (tmp_path / "o").exists()


def _tiny_with_tokenizer(tokenizer):
    return make_tiny(layers=2), tokenizer


def test_compress_saves_a_model_that_reloads_to_the_same_logits(tmp_path, tokenizer):
    model, tok = _tiny_with_tokenizer(tokenizer)
    res = compress(model, "rtn-w4-g128", tokenizer=tok)
    out = res.save(tmp_path / "out")
    man = json.loads((out / "pocketlm.json").read_text())
    assert man["recipe"] == "rtn-w4-g128" and len(man["linears"]) == 14
    # 64 inputs (q/k/v/o, gate/up) fit one group of 128 -> 1 group; down_proj 160 -> 2 groups
    lin = man["linears"]["model.layers.0.self_attn.q_proj"]
    assert lin["bpw"] == pytest.approx((64 * 64 * 4 + 64 * 1 * 20) / (64 * 64))
    again, _, _ = models.load(str(out))
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert (out / "recipe.yaml").is_file() and (out / "quantization.safetensors").is_file()


def test_interrupted_compress_leaves_no_output(tmp_path, tokenizer, monkeypatch):
    model, tok = _tiny_with_tokenizer(tokenizer)
    res = compress(model, "rtn-w8", tokenizer=tok)
    real_save = models.save

    def save_then_interrupt(*a, **k):
        real_save(*a, **k)  # files are half-way written when the user hits Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        res.save(tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_existing_output_is_refused_and_input_untouched(tmp_path, tokenizer):
    model, tok = _tiny_with_tokenizer(tokenizer)
    (tmp_path / "out").mkdir()
    res = compress(model, "rtn-w8", tokenizer=tok)
    with pytest.raises(PocketError, match="already exists"):
        res.save(tmp_path / "out")


def test_budget_override_applies_to_aptq_only():
    from pocketlm.recipe import with_budget

    r = with_budget(preset("aptq"), bpw=3.5)
    assert r.stages[0].bpw == 3.5 and r.stages[0].bytes is None
    assert preset("aptq").stages[0].bpw == 4.0  # the preset itself is untouched
    with pytest.raises(PocketError, match="no stage that takes a budget"):
        with_budget(preset("rtn-w8"), bpw=3.5)


def test_methods_are_discovered_from_packages_and_entry_points(monkeypatch):
    """Every module under prune/ and quant/ registers itself; a plugin's entry point adds a method
    that recipes then accept by name."""
    from typing import Literal

    from pocketlm import methods, stages

    class Plugin:
        def load(self):
            @stages.register
            class Halve(stages.Stage):
                method: Literal["halve-plugin"] = "halve-plugin"

    monkeypatch.setattr(methods, "entry_points", lambda group: [Plugin()] if group == "pocketlm.methods" else [])
    try:
        methods.load_builtin_methods()
        assert {"gptq", "rtn", "imatrix", "aptq", "wanda", "sparsegpt", "magnitude", "barber",
                "remove-layers", "halve-plugin"} <= set(stages.REGISTRY)
        assert from_dict({"stages": [{"method": "halve-plugin"}]}).stages[0].method == "halve-plugin"
    finally:
        stages.REGISTRY.pop("halve-plugin", None)
