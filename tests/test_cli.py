"""The pocketlm command: exit codes and what is left on disk."""
import os
import signal
import subprocess
import sys
import time

import pytest


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


@pytest.mark.parametrize("args,message", [
    (["eval", "smollm2-135m", "--windows", "0"], "--windows must be >= 1, got 0"),
    (["eval", "smollm2-135m", "--seq-len", "1"], "--seq-len must be >= 2, got 1"),
    (["eval", "smollm2-135m", "--seq-len", "100000"], "longer than the model's context (8192 tokens)"),
    (["compress", "smollm2-135m", "--preset", "aptq", "--bpw", "nan", "--out", "OUT"], "--bpw must be between 1 and 16"),
    (["compress", "smollm2-135m", "--preset", "rtn-w8", "--eval-len", "1", "--out", "OUT"], "--eval-len must be >= 2"),
    (["analyze", "smollm2-135m", "--group-size", "0", "--out", "OUT"], "--group-size must be >= 1, got 0"),
    (["bench", "x.gguf", "--reps", "0"], "--reps must be >= 1, got 0"),
])
def test_bad_numbers_are_one_line_errors_before_any_work(tmp_path, args, message):
    args = [str(tmp_path / "o") if a == "OUT" else a for a in args]
    r = subprocess.run([sys.executable, "-m", "pocketlm.cli", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert message in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_output_paths_are_checked_before_any_work(tmp_path):
    """An input as --out, the current directory, a directory where a file goes, a read-only
    parent: one line each, before the model is loaded, and nothing changed on disk."""
    import hashlib

    src = tmp_path / "in.gguf"
    (tmp_path / "adir").mkdir()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    from pocketlm import models

    src.write_bytes(open(models.resolve("smollm2-135m").describe(), "rb").read())
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    cases = [
        (["export", str(src), "--out", str(src), "--overwrite"], "would replace the input"),
        (["compress", "smollm2-135m", "--preset", "rtn-w8", "--out", ".", "--overwrite"], "current directory"),
        (["export", "smollm2-135m", "--out", str(tmp_path / "adir"), "--overwrite"], "is a directory"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((["export", "smollm2-135m", "--out", str(ro / "sub" / "x.gguf")], "not a writable directory"))
    try:
        for args, message in cases:
            r = subprocess.run([sys.executable, "-m", "pocketlm.cli", *args], capture_output=True, text=True,
                               timeout=120, cwd=tmp_path)
            assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and message in r.stderr, (args, r.stderr)
    finally:
        ro.chmod(0o700)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "in.gguf", "ro"] and not list(ro.iterdir())


def test_damaged_inputs_are_one_line_errors(tmp_path, tokenizer):
    """A recipe that is not UTF-8, a truncated model.safetensors, a damaged pocketlm.json."""
    from pocketlm import models
    from tests.conftest import make_tiny

    bad_recipe = tmp_path / "r.yaml"
    bad_recipe.write_bytes(b"stages:\n  - method: rtn\xff\xfe\n")
    d = tmp_path / "m"
    models.save(make_tiny(layers=1), tokenizer, d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    j = tmp_path / "j"
    models.save(make_tiny(layers=1), tokenizer, j)
    (j / "pocketlm.json").write_text("{not json")
    cases = [(["compress", "smollm2-135m", "--recipe", str(bad_recipe), "--out", str(tmp_path / "o")], "not UTF-8"),
             (["eval", str(d), "--windows", "1", "--seq-len", "64"], "could not load the weights"),
             (["export", str(j), "--out", str(tmp_path / "x.gguf")], "pocketlm.json is damaged")]
    for args, message in cases:
        r = subprocess.run([sys.executable, "-m", "pocketlm.cli", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and message in r.stderr, (args, r.stderr)
    assert not (tmp_path / "o").exists() and not (tmp_path / "x.gguf").exists()
