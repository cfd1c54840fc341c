"""The HTML report (report/): what it reads from output directories, its charts' hover values,
the Pareto front, its refusals, and the page in a real headless browser."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pocketlm import compress, report
from pocketlm.errors import PocketError
from pocketlm.measure import perplexity
from pocketlm.report.charts import front_of
from tests.conftest import make_tiny, make_tiny_tokenizer, run_cli

pytestmark = pytest.mark.slow  # the real model, llama.cpp, training or a browser (not in make test-fast)

ARTIFACTS = Path(os.environ.get("POCKETLM_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three saved results of a tiny model, each evaluated against the uncompressed one."""
    tok = make_tiny_tokenizer()
    root = tmp_path_factory.mktemp("runs")
    win = torch.randint(0, len(tok), (4, 64), generator=torch.Generator().manual_seed(0))
    dirs = []
    for name, stages in [("aptq-3.5", [{"method": "aptq", "bpw": 3.5}]),
                         ("short-1", [{"method": "remove-layers", "n": 1}]),
                         ("wanda-2of4+recover", [{"method": "wanda", "pattern": "2:4"},
                                                 {"method": "recover", "tokens": 1024, "seq_len": 64,
                                                  "windows_per_step": 2}])]:
        m, base = make_tiny(layers=3, vocab=len(tok)), make_tiny(layers=3, vocab=len(tok))
        res = compress(m, {"name": name, "stages": stages}, tokenizer=tok, calibration=win)
        res.eval = perplexity(res.model, tok, "wikitext2", 64, 3, reference=base).to_dict()
        dirs.append(res.save(root / name))
    return dirs


def _titles(page: str) -> list[str]:
    return re.findall(r"<title>([^<]*)</title>", page)


def test_every_result_carries_its_own_report(runs):
    page = (runs[0] / "report.html").read_text()
    man = json.loads((runs[0] / "pocketlm.json").read_text())
    assert "aptq-3.5" in page and f"{man['eval']['kl']:.4g}" in page
    bars = [t for t in _titles(page) if t.startswith("window ")]
    assert len(bars) == 3 and f"KL {man['eval']['window_kl'][1]:.4g}" in bars[1]
    cells = [t for t in _titles(page) if t.startswith("layer ")]  # allocation and sensitivity: 3 x 7 each
    assert len(cells) == 2 * 21
    q0 = man["linears"]["model.layers.0.self_attn.q_proj"]
    assert any(t.startswith("layer 0 q_proj: ") and f"bpw {q0['bpw']:.4g}" in t for t in cells)
    # self-contained: nothing fetched, no script
    assert not re.search(r"(src|href)=\"(https?:|//)|url\((https?:|//)|<link|@import|<script", page)


def test_a_report_of_several_runs_with_other_tools_files(runs, tmp_path):
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text("\n".join(json.dumps(r) for r in [
        {"config": "llama.cpp-Q4_0", "source": "llama.cpp", "bytes": 900_000, "kl": 0.02},
        {"config": "ar-Q4_0", "source": "auto-round", "bytes": 300_000, "kl": 5.0},
        {"config": "mine", "source": "pocketlm", "bytes": 1, "kl": 0.0},  # not another tool's: left out
        {"bench": "gguf-time", "config": "timing"}]) + "\n")
    out = report.write(runs, tmp_path / "r.html", anchors=anchors)
    page = out.read_text()
    assert "llama.cpp-Q4_0: 0.9 MB, kl 0.02" in _titles(page) and "ar-Q4_0: 0.3 MB, kl 5" in _titles(page)
    assert "mine" not in page
    short = json.loads((runs[1] / "pocketlm.json").read_text())["stages"][0]
    bi = [t for t in _titles(page) if t.startswith("layer ") and "BI" in t]
    assert len(bi) == 3 and sum("(removed)" in t for t in bi) == 1 == len(short["removed"])
    assert any(t.startswith("tokens ") for t in _titles(page))  # the recovery's loss curve
    # each run's section, in the order given
    assert [page.index(f"<h2>{r.name}</h2>") for r in runs] == sorted(page.index(f"<h2>{r.name}</h2>") for r in runs)


def test_pareto_front_keeps_only_unbeaten_points():
    pts = [{"label": a, "bytes": b, "kl": k} for a, b, k in
           [("a", 10, 0.5), ("b", 12, 0.6), ("c", 12, 0.3), ("d", 20, 0.3), ("e", 25, 0.1), ("f", 5, 0.9)]]
    assert [p["label"] for p in front_of(pts, "kl")] == ["f", "a", "c", "e"]


def test_bad_input_is_refused_in_one_line(runs, tmp_path):
    with pytest.raises(PocketError, match="not a pocketlm output directory"):
        report.Run.load(tmp_path)
    bad = tmp_path / "a.jsonl"
    bad.write_text('{"config": 1}\nnot json\n')
    with pytest.raises(PocketError, match="line 2 is not JSON"):
        report.Anchors.load(bad)
    code, err = run_cli(["report", str(runs[0]), "--out", str(runs[0] / "r.html")])
    assert code == 2 and "inputs are never modified" in err and len(err.strip().splitlines()) == 1
    assert not (runs[0] / "r.html").exists()
    code, err = run_cli(["report", str(runs[0]), "--out", str(tmp_path / "r.html")])
    assert code == 0 and (tmp_path / "r.html").stat().st_size > 10_000


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def test_the_page_renders_in_headless_chromium(runs, tmp_path):
    """Opened in a real browser: no console message, and the screenshot shows the charts (the
    bars' and markers' blue covers a real area of the page)."""
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium here: `apt-get install chromium` (Debian) to run this test")
    page = report.write(runs, tmp_path / "report.html")
    shot = tmp_path / "report.png"
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1200,6000", f"--screenshot={shot}", "--enable-logging=stderr", "--v=0",
                        page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), r.stderr[-2000:]
    assert "CONSOLE" not in r.stderr, [line for line in r.stderr.splitlines() if "CONSOLE" in line]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "report.png")
    import matplotlib.image as mpimg

    img = mpimg.imread(str(shot))[..., :3]
    blue = torch.tensor([0x1F, 0x77, 0xB4]) / 255
    px = torch.from_numpy(img.copy()).float()
    is_blue = ((px - blue).abs().max(-1).values < 0.02)
    assert float(is_blue.float().mean()) > 0.005  # the bars and points are drawn
    rows_with_blue = is_blue.any(1).nonzero().flatten()
    assert int(rows_with_blue.max() - rows_with_blue.min()) > 2000  # in every run's section, down the page
    assert float((px < 0.9).any(-1).float().mean()) > 0.03  # not a blank page
