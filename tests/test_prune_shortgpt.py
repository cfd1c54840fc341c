"""ShortGPT layer removal by Block Influence (prune/shortgpt.py) and `analyze --layers`."""

import pytest
import torch

from pocketlm import compress, models
from pocketlm.errors import PocketError
from pocketlm.prune.shortgpt import remove_layers
from tests.conftest import make_tiny, random_windows


def test_removing_layers_equals_skipping_them_and_reloads(tmp_path, tokenizer):
    m, ref = make_tiny(layers=4), make_tiny(layers=4)
    ids = random_windows(1, 32)
    handles = [ref.model.layers[i].register_forward_hook(lambda mod, args, kw, out: args[0] if args else
                                                         kw["hidden_states"], with_kwargs=True) for i in (1, 2)]
    with torch.no_grad():
        want = ref(ids).logits
    for h in handles:
        h.remove()
    res = compress(m, {"stages": [{"method": "remove-layers", "layers": [1, 2]}]}, tokenizer=tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, want, rtol=0, atol=1e-5)
    assert [lay.self_attn.layer_idx for lay in m.model.layers] == [0, 1]
    res.save(tmp_path / "short")
    back, _, _ = models.load(str(tmp_path / "short"))
    assert back.config.num_hidden_layers == 2
    assert sum(p.numel() for p in back.parameters()) < sum(p.numel() for p in ref.parameters())
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, want, rtol=0, atol=1e-5)
    with pytest.raises(PocketError, match="do not exist"):
        remove_layers(make_tiny(layers=2), [5])


def test_block_influence_picks_the_layer_that_changes_least(tokenizer):
    m = make_tiny(layers=3)
    with torch.no_grad():  # layer 1 nearly the identity: its attention and MLP write almost nothing
        m.model.layers[1].self_attn.o_proj.weight.mul_(1e-3)
        m.model.layers[1].mlp.down_proj.weight.mul_(1e-3)
    res = compress(m, {"stages": [{"method": "remove-layers", "n": 1}]}, calibration=random_windows())
    rep = res.stages[0]
    assert rep["removed"] == [1]
    assert min(rep["block_influence"]) == rep["block_influence"][1]


@pytest.mark.slow
def test_cli_analyze_layers_writes_block_influence(tmp_path):
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "pocketlm.cli", "analyze", "smollm2-135m", "--layers",
                        "--calib-windows", "2", "--calib-len", "64", "--out", str(tmp_path / "a")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "a" / "block_influence.json").read_text())
    bi = res["block_influence"]
    assert len(bi) == 30 and all(0 < v < 1 for v in bi)
    assert len(res["lowest"]) == 8 and max(bi[i] for i in res["lowest"]) <= min(
        bi[i] for i in range(30) if i not in res["lowest"])
    assert (tmp_path / "a" / "block_influence.png").stat().st_size > 5000
