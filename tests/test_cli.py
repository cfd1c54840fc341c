"""The pocketlm command on bad input and under signals: exit codes, one-line messages, nothing
left on disk, inputs unchanged by hash, and the checks made before any model is loaded."""
import datetime
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # the real model, llama.cpp, training or a browser (not in make test-fast)

RECIPES = {
    "esc.yaml": "stages:\n  - method: rtn\n    format: gguf-q8_0\nexport:\n  - {format: gguf, path: ../victim.txt}\n",
    "abs.yaml": "stages:\n  - method: rtn\n    format: gguf-q8_0\nexport:\n  - {format: gguf, path: /tmp/x.gguf}\n",
    "home.yaml": "stages:\n  - method: rtn\n    format: gguf-q8_0\nexport:\n  - {format: gguf, path: ~/x.gguf}\n",
    "g7.yaml": "stages:\n  - method: rtn\n    bits: 4\n    group_size: 7\n",
}


@pytest.fixture(scope="module")
def ws(tiny_dir, tmp_path_factory):
    """A folder of inputs, good and damaged: the working directory of every case."""
    ws = tmp_path_factory.mktemp("ws")
    shutil.copytree(tiny_dir, ws / "tiny")
    for name, text in RECIPES.items():
        (ws / name).write_text(text)
    (ws / "latin1.yaml").write_bytes(b"stages:\n  - method: rtn\xff\xfe\n")
    shutil.copytree(tiny_dir, ws / "trunc")
    w = ws / "trunc" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    shutil.copytree(tiny_dir, ws / "pickle", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "when": datetime.date(2026, 1, 1)},
               ws / "pickle" / "pytorch_model.bin")
    shutil.copytree(tiny_dir, ws / "badjson")
    (ws / "badjson" / "pocketlm.json").write_text("{not json")
    (ws / "empty.txt").write_text("")
    (ws / "bin.txt").write_bytes(bytes(range(256)) * 4)
    (ws / "victim.txt").write_text("data\n")
    (ws / "adir").mkdir()
    (ws / "ro").mkdir()
    return ws


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


class Loaded(BaseException):
    """Raised if a case that must be refused before any work loads a model."""


# (case, command line, exit code, message fragment, refused before any model is loaded)
CASES = [
    # a recipe's export path escapes --out
    ("export-path-dotdot", "compress tiny --recipe esc.yaml --out o --eval-windows 0", 2,
     "export path '../victim.txt' must be a relative path inside the output directory", True),
    ("export-path-absolute", "compress tiny --recipe abs.yaml --out o", 2, "must be a relative path inside", True),
    ("export-path-home", "compress tiny --recipe home.yaml --out o", 2, "must be a relative path inside", True),
    # output paths checked before the work
    ("out-exists", "export tiny --out victim.txt", 2, "victim.txt already exists", True),
    ("out-current-dir", "compress tiny --preset rtn-w8 --out . --overwrite", 2, "current directory", True),
    ("out-is-a-directory", "export tiny --out adir --overwrite", 2, "adir is a directory", True),
    ("out-under-a-file", "export tiny --out victim.txt/sub/x.gguf", 2, "victim.txt is not a writable directory", True),
    ("out-is-the-input", "export tiny --out tiny --overwrite", 2, "would replace or write into the input tiny", True),
    ("out-inside-the-input", "compress tiny --preset rtn-w8 --out tiny/sub --overwrite", 2,
     "write into the input", True),
    ("out-is-the-recipe", "compress tiny --recipe g7.yaml --out g7.yaml --overwrite", 2, "write into the input", True),
    ("export-unknown-type-makes-no-folders", "export tiny --type Q3_X --out new/sub/x.gguf", 2,
     "unknown GGUF type 'Q3_X'", True),
    # lengths and counts
    ("compress-eval-len-1", "compress tiny --preset rtn-w8 --eval-len 1 --out o", 2,
     "--eval-len must be >= 2, got 1", True),
    ("eval-windows-0", "eval tiny --windows 0", 2, "--windows must be >= 1, got 0", True),
    ("eval-windows-negative", "eval tiny --windows -1", 2, "--windows must be >= 1, got -1", True),
    ("eval-seq-len-0", "eval tiny --seq-len 0", 2, "--seq-len must be >= 2, got 0", True),
    ("eval-seq-len-1", "eval tiny --seq-len 1", 2, "--seq-len must be >= 2, got 1", True),
    ("eval-seq-len-beyond-context", "eval tiny --seq-len 100000", 2,
     "--seq-len 100000 is longer than the model's context (512 tokens)", True),
    # damaged files and impossible numbers
    ("recipe-not-utf8", "compress tiny --recipe latin1.yaml --out o", 2, "latin1.yaml is not UTF-8", True),
    ("weights-truncated", "eval trunc --windows 1 --seq-len 16", 2, "could not load the weights", False),
    ("weights-pickle-only", "eval pickle --windows 1 --seq-len 16", 2, "could not load the weights", False),
    ("manifest-damaged", "export badjson --out x.gguf", 2, "pocketlm.json is damaged", True),
    ("bpw-nan", "compress tiny --preset aptq --bpw nan --out o", 2, "--bpw must be between 1 and 16, got nan", True),
    ("bpw-inf", "compress tiny --preset aptq --bpw inf --out o", 2, "--bpw must be between 1 and 16, got inf", True),
    ("bpw-100", "compress tiny --preset aptq --bpw 100 --out o", 2, "--bpw must be between 1 and 16, got 100", True),
    ("bench-reps-0", "bench tiny.gguf --reps 0", 2, "--reps must be >= 1, got 0", True),
    ("bench-prompt-0", "bench tiny.gguf --prompt 0", 2, "--prompt must be >= 1, got 0", True),
    ("bench-not-gguf", "bench victim.txt", 2, "victim.txt is not a valid GGUF file", True),
    ("analyze-group-size-0", "analyze tiny --group-size 0 --out o", 2, "--group-size must be >= 1, got 0", True),
    ("analyze-calib-windows-0", "analyze tiny --calib-windows 0 --out o", 2,
     "--calib-windows must be >= 1, got 0", True),
    ("chat-max-tokens-negative", "chat tiny --max-tokens -1", 2, "--max-tokens must be >= 1, got -1", True),
    ("ppl-empty", "eval tiny --ppl empty.txt", 2, "empty.txt is empty", True),
    ("ppl-binary", "eval tiny --ppl bin.txt", 2, "bin.txt is not UTF-8", True),
    ("ppl-missing", "eval tiny --ppl nothere.txt", 2, "no such text file: nothere.txt", True),
    ("kl-against-missing", "eval tiny --kl-against nothere.gguf", 2, "no such GGUF file: nothere.gguf", True),
    ("aptq-budget-below-any-plan", "compress tiny --preset aptq --bpw 1.5 --out o --calib-windows 1 --calib-len 16",
     2, "below the smallest allowed plan", False),
    # usage errors: one line too
    ("not-a-number", "eval tiny --windows abc", 2, "Invalid value for '--windows'", True),
    ("unknown-option", "eval tiny --window 3", 2, "No such option: --window", True),
    ("unknown-command", "evl tiny", 2, "No such command 'evl'", True),
    ("control-characters-shown-escaped", ["analyze", "tiny", "--bits", "4\r\n5", "--out", "o"], 2,
     "--bits takes comma-separated integers", True),
]


@pytest.mark.parametrize("case,args,code,message,early", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_everything_as_it_was(ws, monkeypatch, case, args, code, message, early):
    from pocketlm import models

    if early:
        monkeypatch.setattr(models, "load", lambda *a, **k: (_ for _ in ()).throw(Loaded()))
    monkeypatch.chdir(ws)
    before = snapshot(ws)
    got, err = run_cli(args.split() if isinstance(args, str) else args)
    lines = [x for x in err.splitlines() if not x.startswith("warning: ")]
    assert got == code and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (got, err)
    assert snapshot(ws) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_is_refused_before_any_work(ws, monkeypatch):
    monkeypatch.chdir(ws)
    (ws / "ro").chmod(0o500)
    try:
        got, err = run_cli(["export", "tiny", "--out", "ro/sub/x.gguf"])
    finally:
        (ws / "ro").chmod(0o700)
    assert got == 2 and "ro is not a writable directory" in err and not list((ws / "ro").iterdir())


def test_two_runs_cannot_claim_one_output(ws, tmp_path, monkeypatch):
    """A second run on an --out another run is writing is refused at once; when that run dies
    (however it dies) the path is free again."""
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pocketlm.fsutil import claim; "
                               f"claim({str(out)!r}); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.chdir(ws)
        got, err = run_cli(["compress", "tiny", "--preset", "rtn-w8", "--out", out])
        assert got == 2 and f"another pocketlm run is writing {out}" in err, err
    finally:
        holder.kill()
        holder.wait()
    from pocketlm.fsutil import claim

    claim(out)  # the kernel released the dead run's lock
    assert not out.exists()


def test_json_into_a_new_folder_and_a_costly_group_size_warns(ws, tmp_path, monkeypatch):
    monkeypatch.chdir(ws)
    got, err = run_cli(["eval", "tiny", "--windows", "1", "--seq-len", "16", "--json", tmp_path / "new" / "r.json"])
    assert got == 0 and (tmp_path / "new" / "r.json").is_file(), err
    got, err = run_cli(["compress", "tiny", "--recipe", "g7.yaml", "--out", tmp_path / "g7", "--calib-windows", "1",
                        "--calib-len", "16", "--eval-windows", "0"])
    assert got == 0 and "warning: group_size 7 stores a 16-bit scale every 7 weights: 6.86 bits per weight" in err


def test_sigterm_during_export_exits_143_and_leaves_nothing(tmp_path):
    """SIGTERM (what kill and timeout send) in the middle of writing: the hidden partial file is
    removed, one line says nothing was written, exit 128 + 15."""
    out = tmp_path / "x.gguf"
    p = subprocess.Popen([sys.executable, "-m", "pocketlm.cli", "export", "smollm2-135m", "--type", "F32",
                          "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not any(f.name.startswith(".x.gguf.partial") for f in tmp_path.iterdir()):
        assert p.poll() is None and time.time() < deadline, "the export never started writing"
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert err.strip().splitlines()[-1] == "interrupted (SIGTERM); no output was written"
    assert list(tmp_path.iterdir()) == []


# A compress with three stages, an evaluation and a GGUF export; the driver sends the process
# SIGTERM at one point of it (after the function named returns, or as it starts).
PIPELINE = """stages:
  - {method: remove-layers, n: 1}
  - {method: wanda, sparsity: 0.3}
  - {method: rtn, format: gguf-q8_0}
export:
  - {format: gguf, path: model.gguf}
"""
DRIVER = r"""
import os, signal, sys
from pocketlm import cli, export, fsutil, models, pipeline, recipe, stages

point = sys.argv[1]
SIG = getattr(signal, os.environ.get("SIG", "SIGTERM"))
def kill():
    os.kill(os.getpid(), SIG)
def after(owner, name, nth=1):
    f, calls = getattr(owner, name), []
    def wrapped(*a, **k):
        r = f(*a, **k)
        calls.append(1)
        if len(calls) == nth:
            kill()
        return r
    setattr(owner, name, wrapped)
def before(owner, name):
    f = getattr(owner, name)
    def wrapped(*a, **k):
        kill()
        return f(*a, **k)
    setattr(owner, name, wrapped)
if point == "recipe-read": after(recipe, "from_yaml")
if point == "model-loaded": after(models, "load")
runs = []
def counted(f):
    def run(self, ctx):
        r = f(self, ctx)
        runs.append(1)
        if point == f"stage-{len(runs)}":
            kill()
        return r
    return run
stages.REGISTRY or __import__("pocketlm.methods").methods.load_builtin_methods()
for cls in stages.REGISTRY.values():
    cls.run = counted(cls.run)
if point == "evaluating": before(__import__("pocketlm.measure").measure, "perplexity")
if point == "weights-saved": after(models, "save")
if point == "exporting": before(export, "export_model")
if point == "manifest-built": after(pipeline.CompressionResult, "manifest")
if point == "before-rename": after(fsutil, "_normal_permissions")
sys.argv = ["pocketlm", "compress", "tiny", "--recipe", "pipeline.yaml", "--out", "out/model",
            "--calib-windows", "2", "--calib-len", "32", "--eval-windows", "1", "--eval-len", "32"]
cli.main()
"""
POINTS = ["recipe-read", "model-loaded", "stage-1", "stage-2", "stage-3", "evaluating", "weights-saved",
          "exporting", "manifest-built", "before-rename"]


@pytest.fixture(scope="module")
def sig_ws(tiny_dir, tmp_path_factory):
    ws = tmp_path_factory.mktemp("sig")
    shutil.copytree(tiny_dir, ws / "tiny")
    (ws / "pipeline.yaml").write_text(PIPELINE)
    (ws / "driver.py").write_text(DRIVER)
    (ws / "out").mkdir()
    return ws


@pytest.mark.parametrize("point", POINTS)
def test_sigterm_at_any_point_of_a_compress_leaves_no_output(sig_ws, point):
    """A stage-wise run killed at any of ten points: exit 143, one line, the output folder absent
    (no hidden partial either) and the input unchanged."""
    before = snapshot(sig_ws / "tiny")
    r = subprocess.run([sys.executable, "driver.py", point], cwd=sig_ws, capture_output=True, text=True, timeout=600)
    assert r.returncode == 143, (point, r.stderr[-2000:])
    assert r.stderr.strip().splitlines()[-1] == "interrupted (SIGTERM); no output was written"
    assert list((sig_ws / "out").iterdir()) == []
    assert snapshot(sig_ws / "tiny") == before


@pytest.mark.parametrize("sig,code", [("SIGINT", 130), ("SIGHUP", 129)])
def test_ctrl_c_and_hangup_clean_up_the_same_way(sig_ws, sig, code):
    r = subprocess.run([sys.executable, "driver.py", "stage-2"], cwd=sig_ws, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "SIG": sig})
    assert r.returncode == code, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == f"interrupted ({sig}); no output was written"
    assert list((sig_ws / "out").iterdir()) == []


def test_the_driven_compress_completes_when_not_interrupted(sig_ws):
    """The control: the same run, not killed, writes the model and its GGUF file."""
    r = subprocess.run([sys.executable, "driver.py", "none"], cwd=sig_ws, capture_output=True, text=True, timeout=600)
    try:
        assert r.returncode == 0, r.stderr[-2000:]
        assert (sig_ws / "out" / "model" / "model.gguf").is_file()
    finally:
        shutil.rmtree(sig_ws / "out" / "model", ignore_errors=True)


def test_analyze_rope_reports_the_bound_and_perplexity_by_position(ws, tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(ws)
    got, err = run_cli(["analyze", "tiny", "--rope", "--seq-len", "64", "--windows", "1", "--out", tmp_path / "r"])
    assert got == 0, err
    rep = json.loads((tmp_path / "r" / "rope.json").read_text())
    assert rep["rope_theta"] == 10000.0 and rep["head_dim"] == 16
    assert rep["supported_context"] > 0 and rep["base_needed"]["4096"] > rep["rope_theta"]
    assert len(rep["by_position"]["bucket_ppl"]) == 8 and (tmp_path / "r" / "rope_by_position.png").stat().st_size
    got, err = run_cli(["analyze", "tiny", "--rope", "--seq-len", "100000", "--out", tmp_path / "r2"])
    assert got == 2 and "longer than the model's context (512 tokens)" in err
