"""memory.py: the room a memory cgroup leaves, read from its files (v1 and v2 layouts)."""
from pocketlm import memory


def _tree(tmp_path, line: str, files: dict) -> tuple:
    proc = tmp_path / "cgroup"
    proc.write_text(line + "\n")
    for rel, text in files.items():
        f = tmp_path / "sys" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return proc, tmp_path / "sys"


def test_v1_limit_less_usage_with_page_cache_counted_free(tmp_path):
    proc, root = _tree(tmp_path, "4:memory:/job", {
        "memory/job/memory.limit_in_bytes": "1000000\n", "memory/job/memory.usage_in_bytes": "700000\n",
        "memory/job/memory.stat": "cache 200000\nrss 500000\n"})
    assert memory._cgroup_room(proc, root) == 1000000 - 700000 + 200000


def test_v2_limit_and_no_limit(tmp_path):
    proc, root = _tree(tmp_path, "0::/job", {"job/memory.max": "5000\n", "job/memory.current": "1000\n",
                                             "job/memory.stat": "anon 900\nfile 100\n"})
    assert memory._cgroup_room(proc, root) == 5000 - 1000 + 100
    (root / "job" / "memory.max").write_text("max\n")
    assert memory._cgroup_room(proc, root) is None  # no limit: MemAvailable alone decides


def test_available_is_the_smaller_of_the_kernel_and_the_cgroup(monkeypatch):
    monkeypatch.setattr(memory, "_cgroup_room", lambda: 2**20)
    assert memory.available() == 2**20
    monkeypatch.setattr(memory, "_cgroup_room", lambda: None)
    assert memory.available() > 2**20  # this machine's MemAvailable
