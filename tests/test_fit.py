"""pocketlm fit (fit.py): budgets turned into one file size, candidates measured in llama.cpp,
the lowest KL within the budget chosen, everything written down."""
import json

import pytest

from pocketlm import fit
from pocketlm.errors import PocketError
from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # the real model, llama.cpp, training or a browser (not in make test-fast)


def test_every_budget_becomes_a_file_limit_and_the_tightest_wins():
    m = fit.Machine(metadata_bytes=1000, decode_k=200.0 * 100_000, kv_bytes=30_000, overhead_bytes=50_000)
    limit, each = m.file_limit(fit.Budget(bytes=120_000, ram=160_000, min_decode=250))
    assert each == {"bytes": 120_000, "ram": 80_000, "min_decode": 80_000} and limit == 80_000
    assert m.predict(100_000) == {"file_bytes": 100_000, "ram_bytes": 180_000, "decode_tok_s": 200.0}
    with pytest.raises(PocketError, match="give a budget"):
        fit.Budget().check()


@pytest.fixture(scope="module")
def fitted(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "out"
    probe = fit.probe(*_load(tiny_dir), 256, 2, tmp_path_factory.mktemp("probe"))
    budget = fit.Budget(bytes=int(probe.probe["bytes"] * 0.75), ctx=256)
    res = fit.run(str(tiny_dir), budget, out, windows=2, seq_len=64, calib_windows=4, calib_len=64, layers=(0, 1))
    return out, res, budget


def _load(d):
    from pocketlm import models

    m, tok, src = models.load(str(d))
    return m, tok, None


def test_fit_measures_the_candidates_and_keeps_the_best_within_the_budget(fitted):
    out, res, budget = fitted
    assert (out / "model.gguf").stat().st_size <= budget.bytes
    assert json.loads((out / "fit.json").read_text()) == res
    measured = [c for c in res["candidates"] if c["measured"]]
    assert [c["name"] for c in res["candidates"]] == ["aptq-gguf", "aptq-gguf-minus1layers"] and len(measured) == 2
    assert [c["measured"]["layers"] for c in measured] == [3, 2]
    best = min(measured, key=lambda c: c["measured"]["kl"])
    assert res["chosen"] == best["name"] and res["meets"] == {"bytes": True}
    assert (out / "model.gguf").stat().st_size == best["measured"]["file_bytes"]
    page = (out / "report.html").read_text()
    assert all(c["name"] in page for c in res["candidates"]) and "<svg" in page


def test_a_budget_no_candidate_fits_is_refused_and_writes_nothing(tiny_dir, tmp_path):
    with pytest.raises(PocketError, match="raise the budget"):
        fit.run(str(tiny_dir), fit.Budget(bytes=20_000, ctx=256), tmp_path / "o", windows=1, seq_len=64,
                calib_windows=2, calib_len=64, layers=(0,))
    assert not (tmp_path / "o").exists()


def test_cli_refuses_bad_budgets_in_one_line(tmp_path):
    for args, msg in ((["--bytes", "lots"], "is not a size"), ([], "give a budget"),
                      (["--bytes", "90MB", "--layers", "a"], "comma-separated"),
                      (["--min-decode", "0"], "--min-decode must be")):
        code, err = run_cli(["fit", "smollm2-135m", "--out", str(tmp_path / "o"), *args])
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "o").exists()
