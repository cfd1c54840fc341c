"""The pocketlm command: exit codes and what is left on disk."""
import signal
import subprocess
import sys
import time


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
