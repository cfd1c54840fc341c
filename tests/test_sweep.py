"""sweep.py: a sweep's tasks in this process or on a Ray cluster, results in the items' order."""
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
    import ray

    if ray.is_initialized():
        pytest.skip("this process is already connected to a cluster")
    with pytest.raises(PocketError, match="ray start --head"):
        sweep.connect("127.0.0.1:1")


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
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import common

    script = tmp_path / "bench_toy.py"
    script.write_text("import json, sys\ncfg = sys.argv[sys.argv.index('--one') + 1]\n"
                      "print(json.dumps({'bench': 'toy', 'config': cfg, 'value': len(cfg) ** 2}))\n")
    written = {}
    for where in (None, ray_cluster):
        monkeypatch.setattr(common, "RESULTS", tmp_path / str(bool(where)))
        common.run_configs(str(script), "toy", ["a", "bb", "ccc", "dddd"], ray=where)
        written[where] = (tmp_path / str(bool(where)) / "toy.jsonl").read_text()
    assert written[None] == written[ray_cluster] and written[None].count("\n") == 4
    assert '"config": "dddd", "value": 16' in written[None]
