"""Atomic outputs never replace another run's output that appeared meanwhile."""
import pytest

from pocketlm.errors import PocketError
from pocketlm.fsutil import atomic_dir, atomic_file


def test_a_file_that_appeared_during_the_work_is_not_replaced(tmp_path):
    out = tmp_path / "m.gguf"
    with pytest.raises(PocketError, match="appeared while this run worked"):
        with atomic_file(out) as tmp:
            tmp.write_text("mine")
            out.write_text("the other run's")
    assert out.read_text() == "the other run's" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_a_folder_that_appeared_during_the_work_is_not_replaced(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(PocketError, match="appeared while this run worked"):
        with atomic_dir(out) as tmp:
            (tmp / "a").write_text("mine")
            out.mkdir()
            (out / "b").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["b"] and [p.name for p in tmp_path.iterdir()] == ["o"]


def test_overwrite_replaces(tmp_path):
    out = tmp_path / "m.gguf"
    out.write_text("old")
    with atomic_file(out, overwrite=True) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_a_failed_write_removes_the_folders_it_made(tmp_path):
    """Parents created for an output are removed again when the write fails; existing ones stay."""
    for atomic in (atomic_file, atomic_dir):
        with pytest.raises(RuntimeError):
            with atomic(tmp_path / "new" / "sub" / "out"):
                raise RuntimeError("the work failed")
        assert list(tmp_path.iterdir()) == []


def test_an_output_is_claimed_once_per_process_and_refused_to_another(tmp_path):
    import subprocess
    import sys

    from pocketlm.fsutil import check_output

    out = tmp_path / "o"
    check_output(out)
    check_output(out)  # the same process may check its own output again
    r = subprocess.run([sys.executable, "-c", f"from pocketlm.fsutil import check_output; check_output({str(out)!r})"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "another pocketlm run is writing" in r.stderr
