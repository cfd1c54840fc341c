import json

import pytest
import torch
from safetensors.torch import load_file

from pocketlm import compress, models
from pocketlm.errors import PocketError
from pocketlm.export import compressed as C
from pocketlm.export import run_export
from tests.conftest import make_tiny

pytestmark = pytest.mark.slow  # the real model, llama.cpp, training or a browser (not in make test-fast)

IDS = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(3))


def _compressed_dir(tmp_path, tokenizer, stage, name="q"):
    model = make_tiny(seed=1)
    res = compress(model, {"stages": [stage]}, tokenizer=tokenizer)
    res.save(tmp_path / name)
    with torch.no_grad():
        logits = model(IDS).logits
    return tmp_path / name, res, logits


@pytest.mark.parametrize("stage", [
    {"method": "rtn", "bits": 4, "group_size": 32},
    {"method": "rtn", "bits": 3, "group_size": 64, "sym": True},
    {"method": "rtn", "bits": 8, "group_size": -1},
    {"method": "rtn", "bits": 4, "group_size": 128},  # 64-wide rows: stored with group 64
])
def test_checkpoint_reloads_to_the_same_logits(tmp_path, tokenizer, stage):
    src, res, logits = _compressed_dir(tmp_path, tokenizer, stage)
    rep = run_export(str(src), "compressed-tensors", tmp_path / "ct")
    back, _, _ = models.load(str(tmp_path / "ct"))
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, logits)
    conf = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert conf["quant_method"] == "compressed-tensors" and conf["format"] == "pack-quantized"
    # codes are packed: bits on disk match what the grid promises (up to int32 word padding)
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    assert f"{name}.weight" not in tensors and tensors[f"{name}.weight_packed"].dtype == torch.int32
    assert tensors[f"{name}.weight_packed"].numel() * 32 == 64 * 160 * stage["bits"]
    if stage["group_size"] in (32, 64, -1):
        assert rep["bpw_stored"] == pytest.approx(rep["bpw_promised"], abs=0.05)


@pytest.mark.parametrize("sym", [True, False])
def test_transformers_loads_the_checkpoint(tmp_path, tokenizer, sym):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    stage = {"method": "rtn", "bits": 4, "group_size": 32, "sym": sym}
    src, res, logits = _compressed_dir(tmp_path, tokenizer, stage)
    run_export(str(src), "compressed-tensors", tmp_path / "ct")
    # transformers' compressed path cannot take packed asymmetric zero points (llm-compressor
    # issue #1618); its dequantize-on-load path can
    kw = {} if sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        got = m(IDS).logits
    # compressed-tensors dequantizes in the scale's dtype (float16): weights within 2^-11 relative
    assert (got - logits).abs().max() < 5e-3 * logits.abs().max()
    assert (got.argmax(-1) == logits.argmax(-1)).float().mean() > 0.95


def test_mixed_precision_plan_gets_one_group_per_grid(tmp_path, tokenizer):
    model = make_tiny(seed=1)
    recipe = {"stages": [{"method": "rtn", "bits": 4, "group_size": 32, "ignore": ["*mlp*"]},
                         {"method": "rtn", "bits": 8, "group_size": 64, "targets": ["*mlp*"]}]}
    compress(model, recipe, tokenizer=tokenizer).save(tmp_path / "q")
    with torch.no_grad():
        logits = model(IDS).logits
    run_export(str(tmp_path / "q"), "compressed-tensors", tmp_path / "ct")
    conf = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    groups = {g["weights"]["num_bits"]: g["targets"] for g in conf["config_groups"].values()}
    assert sorted(groups) == [4, 8] and all("mlp" in t for t in groups[8])
    back, _, _ = models.load(str(tmp_path / "ct"))
    with torch.no_grad():
        assert torch.equal(back(IDS).logits, logits)


def test_float_model_and_damaged_checkpoint_are_clear_errors(tmp_path, tokenizer):
    src, res, logits = _compressed_dir(tmp_path, tokenizer, {"method": "rtn", "bits": 4, "group_size": 32})
    run_export(str(src), "compressed-tensors", tmp_path / "ct")
    w = tmp_path / "ct" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(PocketError, match="damaged"):
        models.load(str(tmp_path / "ct"))
    make_tiny().save_pretrained(tmp_path / "float")
    with pytest.raises(PocketError, match="no quantized linears"):
        run_export(str(tmp_path / "float"), "compressed-tensors", tmp_path / "ct2")
    assert not (tmp_path / "ct2").exists()


def test_recipe_exports_at_the_end_of_compress(tmp_path, tokenizer):
    recipe = {"stages": [{"method": "rtn", "format": "gguf-q4_0"}],
              "export": [{"format": "gguf", "embed_type": "Q8_0"}, {"format": "compressed-tensors"}]}
    model = make_tiny(seed=2)
    res = compress(model, recipe, tokenizer=tokenizer)
    out = res.save(tmp_path / "o")
    man = json.loads((out / "pocketlm.json").read_text())
    assert set(man["exports"]) == {"model.gguf", "compressed-tensors"}
    assert man["exports"]["model.gguf"]["tensor types"]["Q4_0"] == 14
    assert C.is_checkpoint(out / "compressed-tensors")


def test_recipe_export_typo_is_a_one_line_error():
    from pocketlm.recipe import from_dict

    with pytest.raises(PocketError, match="export"):
        from_dict({"stages": [{"method": "rtn"}], "export": [{"format": "ggml"}]})


def test_gguf_export_of_a_grid_gguf_cannot_hold_fails_before_any_work(tokenizer):
    model = make_tiny(seed=2)
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    recipe = {"stages": [{"method": "rtn", "bits": 4, "group_size": 128}], "export": [{"format": "gguf"}]}
    with pytest.raises(PocketError, match=r"stage 1 \(rtn\) quantizes onto w4-g128-asym.*format: gguf-q4_k"):
        compress(model, recipe, tokenizer=tokenizer)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


def test_reads_checkpoints_that_target_by_class_or_regex(tmp_path, tokenizer):
    """llm-compressor writes targets as ["Linear"] or "re:" patterns instead of module names."""
    src, res, logits = _compressed_dir(tmp_path, tokenizer, {"method": "rtn", "bits": 4, "group_size": 32})
    run_export(str(src), "compressed-tensors", tmp_path / "ct")
    cfg_path = tmp_path / "ct" / "config.json"
    for targets in (["Linear"], ["re:.*layers\\.\\d+\\..*proj$"]):
        conf = json.loads(cfg_path.read_text())
        (group,) = conf["quantization_config"]["config_groups"].values()
        group["targets"] = targets
        cfg_path.write_text(json.dumps(conf))
        back, _, _ = models.load(str(tmp_path / "ct"))
        with torch.no_grad():
            assert torch.equal(back(IDS).logits, logits)
