"""sweep.py: a sweep's tasks in this process or on a Ray cluster, results in the items' order."""
import json
import sys

import pytest

from pocketlm import sweep
from pocketlm.errors import PocketError


def _slow_square(x: int) -> int:
    import time

    time.sleep(0.3 * (3 - x))  # the first items finish last on a cluster
    return x * x


def _refuse(x: int) -> int:
    raise PocketError(f"item {x} refused")


def test_in_process_runs_in_order_and_reports_each():
    seen = []
    assert sweep.run(_slow_square, [0, 1, 2], on_done=lambda i, r: seen.append((i, r))) == [0, 1, 4]
    assert seen == [(0, 0), (1, 1), (2, 4)]


def test_command_returns_exit_code_and_output():
    r = sweep.command(([sys.executable, "-c", "import os, sys; print(os.environ['X']); sys.exit(3)"], {"X": "seen"}))
    assert r["returncode"] == 3 and r["stdout"].strip() == "seen"


def test_an_unreachable_cluster_is_one_line_naming_the_fix(monkeypatch):
    pytest.importorskip("ray")
    with pytest.raises(PocketError, match="ray start --head"):
        sweep.connect("127.0.0.1:1")


def test_a_second_address_in_a_connected_process_is_refused_not_silently_replaced(monkeypatch):
    import types

    fake = types.SimpleNamespace(is_initialized=lambda: True)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(sweep, "_reachable", lambda address: None)
    monkeypatch.setattr(sweep, "_JOINED", ["10.0.0.1:6379"])
    assert sweep.connect("10.0.0.1:6379") is fake
    assert sweep.connect("auto") is fake
    with pytest.raises(PocketError, match="connected to the Ray cluster at 10.0.0.1:6379, not 10.0.0.2:6379"):
        sweep.connect("10.0.0.2:6379")


def test_after_auto_an_explicit_address_must_name_the_cluster_auto_joined(monkeypatch):
    import types

    state = {"up": False}
    fake = types.SimpleNamespace(is_initialized=lambda: state["up"],
                                 init=lambda **kw: state.update(up=True),
                                 get_runtime_context=lambda: types.SimpleNamespace(gcs_address="10.0.0.1:6379"))
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(sweep, "_reachable", lambda address: None)
    monkeypatch.setattr(sweep, "_JOINED", [])
    assert sweep.connect("auto") is fake
    assert sweep.connect("10.0.0.1:6379") is fake
    with pytest.raises(PocketError, match="connected to the Ray cluster at 10.0.0.1:6379, not 10.0.0.2:6379"):
        sweep.connect("10.0.0.2:6379")


def _bench_common():
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import common

    return common


def _toy_script(tmp_path, values: str = "len(cfg) ** 2"):
    script = tmp_path / "bench_toy.py"
    script.write_text("import json, sys\ncfg = sys.argv[sys.argv.index('--one') + 1]\n"
                      f"print(json.dumps({{'bench': 'toy', 'config': cfg, 'value': {values}}}))\n")
    return str(script)


def test_a_rerun_replaces_its_lines_in_place_and_keeps_the_others(tmp_path, monkeypatch):
    common = _bench_common()
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    common.run_configs(_toy_script(tmp_path), "toy", ["a", "bb", "ccc"])
    common.run_configs(_toy_script(tmp_path, "-len(cfg)"), "toy", ["ccc", "dddd", "a"])
    rows = [json.loads(ln) for ln in (tmp_path / "toy.jsonl").read_text().splitlines()]
    # the rerun's configurations take the places they held, in the order this run gave them
    assert [(r["config"], r["value"]) for r in rows] == [("ccc", -3), ("bb", 4), ("dddd", -4), ("a", -1)]


@pytest.mark.slow
def test_ray_tasks_give_the_in_process_results_in_order(ray_cluster):
    seen = []
    assert sweep.run(_slow_square, [0, 1, 2, 3], ray_cluster, on_done=lambda i, r: seen.append(i)) == [0, 1, 4, 9]
    assert sorted(seen) == [0, 1, 2, 3]
    pids = sweep.run(sweep.command, [([sys.executable, "-c", "import os; print(os.getppid())"], {})] * 4, ray_cluster)
    assert all(p["returncode"] == 0 for p in pids)
    with pytest.raises(PocketError, match="item 2 refused"):  # a task's own error, raised as itself
        sweep.run(_refuse, [2], ray_cluster)


@pytest.mark.slow
def test_a_benchmarks_configurations_on_a_ray_cluster_write_the_lines_written_in_process(ray_cluster, tmp_path,
                                                                                          monkeypatch):
    common = _bench_common()
    script = _toy_script(tmp_path)
    written = {}
    for where in (None, ray_cluster):
        monkeypatch.setattr(common, "RESULTS", tmp_path / str(bool(where)))
        common.run_configs(script, "toy", ["a", "bb", "ccc", "dddd"], ray=where)
        written[where] = (tmp_path / str(bool(where)) / "toy.jsonl").read_text()
    assert written[None] == written[ray_cluster] and written[None].count("\n") == 4
    assert '"config": "dddd", "value": 16' in written[None]
