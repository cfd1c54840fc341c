"""The memory plan: Melon's order, a refusal that names the budget that would fit, and a
predicted peak that a real run under a tight budget honours."""
import json
import subprocess
import sys

import pytest

from pocketlm.errors import PocketError
from pocketlm.recover.plan import LayerProfile, Profile, make_plan

pytestmark = pytest.mark.slow  # the real model, llama.cpp, training or a browser (not in make test-fast)

MiB = 2**20


def profile(layers=4):
    # the MLP keeps 3x what attention keeps and costs the same to recompute: it goes first
    lp = LayerProfile(saved={"attention": 20 * MiB, "mlp": 60 * MiB, "glue": 4 * MiB},
                      inputs={"attention": 1 * MiB, "mlp": 1 * MiB, "layer": 1 * MiB},
                      seconds={"attention": 0.1, "mlp": 0.1, "layer": 0.25})
    return Profile([lp] * layers, seq_len=64, hidden=64, vocab=100)


def test_roomy_budget_recomputes_nothing_and_takes_the_whole_batch():
    p = make_plan(profile(), 4096 * MiB, 100 * MiB, 1000, batch=8)
    assert p.micro_batch == 8 and set(p.states) == {"none"}
    assert p.max_batch_without_recompute == 8


def test_tighter_budgets_recompute_the_mlp_first_then_more():
    p = make_plan(profile(), 100 * MiB + 8 * 300 * MiB, 100 * MiB, 1000, batch=8)
    assert p.micro_batch == 8
    assert "mlp" in p.states and "attention" not in p.states  # most bytes freed per second first
    q = make_plan(profile(), 100 * MiB + 8 * 140 * MiB, 100 * MiB, 1000, batch=8)
    assert q.micro_batch == 8 and q.recompute_seconds > p.recompute_seconds
    assert q.max_batch_with_recompute > q.max_batch_without_recompute
    assert p.peak <= 100 * MiB + 8 * 300 * MiB and q.peak <= 100 * MiB + 8 * 140 * MiB


def test_a_budget_no_plan_fits_is_refused_with_the_smallest_that_would():
    with pytest.raises(PocketError, match=r"smallest needs about \d+ MiB"):
        make_plan(profile(), 110 * MiB, 100 * MiB, 10_000_000, batch=8)


SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, ".")
from tests.conftest import make_tiny, make_tiny_tokenizer
from pocketlm.context import CalibrationConfig
from pocketlm.pipeline import compress
torch.manual_seed(0)
tok = make_tiny_tokenizer()
m = make_tiny(layers=6, vocab=len(tok), hidden=128, inter=512, heads=4, kv_heads=2, head_dim=32)
open(sys.argv[3], "w").write("the quick brown fox jumps over the lazy dog; a model of words, " * 2000)
rec = {"method": "recover", "tokens": 2 * 8 * 512, "seq_len": 512, "windows_per_step": 8, "memory": sys.argv[1],
       "compute_dtype": "float32", "recompute": sys.argv[2] == "planned"}
res = compress(m, {"stages": [rec]}, tokenizer=tok, calibration=CalibrationConfig(text=sys.argv[3]))
s = res.stages[-1]
print(json.dumps({"plan": s["plan"], "peak": s["peak_rss_bytes"]}))
"""


def run(budget, how, tmp_path):
    r = subprocess.run([sys.executable, "-c", SCRIPT, budget, how, str(tmp_path / "t.txt")], capture_output=True,
                       text=True, env={"POCKETLM_QUIET": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_plan_peak_is_honoured_under_a_tight_budget(tmp_path):
    roomy = run("64GiB", "planned", tmp_path)
    resident = roomy["plan"]["parts_bytes"]["resident"]
    acts = roomy["plan"]["predicted_peak_bytes"] - resident
    budget = resident + acts // 2  # half the room the unplanned run needs
    tight = run(f"{budget}B", "planned", tmp_path)
    assert tight["plan"]["micro_batch"] == 8 and tight["plan"]["recompute"].get("none", 0) < 6
    assert tight["peak"] <= budget
    assert abs(tight["peak"] - tight["plan"]["predicted_peak_bytes"]) < 0.15 * tight["peak"]
    # the same micro-batch with nothing recomputed does not fit
    unplanned = run(f"{budget}B", "unplanned", tmp_path)
    assert unplanned["peak"] > budget
