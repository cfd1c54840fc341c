"""`pocketlm recover DIR`: a saved compressed model healed and written anew, structure intact."""
import json

import torch

from pocketlm import models, outdir, sparse
from tests.conftest import run_cli
import pytest

pytestmark = pytest.mark.slow  # the real model, llama.cpp, training or a browser (not in make test-fast)


def test_recover_a_saved_pruned_model_end_to_end(tiny_dir, tmp_path):
    a, b = tmp_path / "pruned", tmp_path / "healed"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: magnitude\n    pattern: '2:4'\n")
    code, msg = run_cli(["compress", str(tiny_dir), "--recipe", str(recipe), "--out", str(a), "--eval-windows", "0"])
    assert code == 0, msg
    code, msg = run_cli(["recover", str(a), "--out", str(b), "--tokens", "2048", "--seq-len", "64",
                         "--eval-windows", "1", "--memory", "8GiB"])
    assert code == 0, msg
    man = json.loads((b / "pocketlm.json").read_text())
    rec = man["stages"][-1]
    assert [s["method"] for s in man["stages"]] == ["magnitude", "recover"]
    assert rec["loss_last"] < rec["loss_first"] and rec["plan"]["predicted_peak_bytes"] > 0
    assert man["eval"]["kl"] >= 0 and man["source"] == str(tiny_dir)
    before, after = sparse.masks(a / outdir.SPARSE), sparse.masks(b / outdir.SPARSE)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    m, _, _ = models.load(str(b))
    for name, keep in after.items():
        assert bool((m.get_submodule(name).weight[~keep] == 0).all())
    assert not (tmp_path / "healed.recover-state.pt").exists()


def test_recover_refuses_what_it_cannot_use(tiny_dir, tmp_path):
    code, msg = run_cli(["recover", str(tiny_dir), "--out", str(tmp_path / "o"), "--tokens", "64"])
    assert code == 2 and "not a pocketlm output" in msg and "\n" not in msg.strip()
    code, msg = run_cli(["recover", str(tiny_dir), "--out", str(tmp_path / "o"), "--memory", "lots"])
    assert code == 2 and "not a size" in msg
    code, msg = run_cli(["recover", str(tiny_dir), "--out", str(tmp_path / "o"), "--optimizer", "sgd"])
    assert code == 2 and "optimizer" in msg
