"""Shared by the benchmarks: run one configuration in a fresh process (so its peak RSS is its
own), print its JSON line and append it to bench/results/NAME.jsonl."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark (VmHWM) so a phase's own peak can be read."""
    from pocketlm import memory

    memory.reset_peak()


def hwm_mib() -> float:
    """Peak RSS since the last reset_peak_rss (or since the start)."""
    from pocketlm import memory

    return memory.peak() / 2**20 or peak_rss_mib()


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_configs(script: str, bench: str, configs: list[str], extra: list[str] | None = None,
                ray: str | None = None) -> None:
    """Run ``script --one CONFIG`` for each config in its own process (or, with ``ray``, as a Ray
    task each: ``pocketlm.sweep``; the script must sit at the same path on every node); collect
    each JSON line into bench/results/BENCH.jsonl."""
    from pocketlm import sweep

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{bench}.jsonl"
    env = {"POCKETLM_QUIET": "1", "TQDM_DISABLE": "1"}
    items = [([sys.executable, str(Path(script).resolve()), "--one", cfg, *(extra or [])], env) for cfg in configs]

    names: dict[int, list[str]] = {}

    def collect(i: int, r: dict) -> None:
        lines = [ln for ln in r["stdout"].splitlines() if ln.startswith("{")]
        if r["returncode"] != 0 or not lines:
            print(json.dumps({"bench": bench, "config": configs[i],
                              "error": (r["stderr"].strip().splitlines() or ["?"])[-1]}), flush=True)
            return
        names[i] = []
        for line in lines:  # a configuration may report several results (each with its own name)
            print(line, flush=True)
            names[i].append(json.loads(line).get("config", configs[i]))
            _replace_line(out, names[i][-1], line)
    sweep.run(sweep.command, items, ray or os.environ.get("POCKETLM_RAY"), on_done=collect)
    _order(out, [n for i in sorted(names) for n in names[i]])


def _replace_line(out: Path, cfg: str, line: str) -> None:
    """Keep one line per configuration: a rerun replaces that configuration's old result where
    it stands; a new configuration is appended."""
    lines = [ln for ln in (out.read_text().splitlines() if out.exists() else []) if ln.strip()]
    at = [k for k, ln in enumerate(lines) if json.loads(ln).get("config") == cfg]
    lines = [ln for k, ln in enumerate(lines) if k not in at[1:]]
    if at:
        lines[at[0]] = line
    else:
        lines.append(line)
    _write_lines(out, lines)


def _order(out: Path, names: list[str]) -> None:
    """Put a sweep's lines in the order of its configurations (Ray tasks finish in any order),
    in the places those lines hold, leaving every other line where it is."""
    if not out.exists():
        return
    lines = out.read_text().splitlines()
    want = list(dict.fromkeys(names))
    slots = [k for k, ln in enumerate(lines) if ln.strip() and json.loads(ln).get("config") in want]
    by_name = {json.loads(lines[k])["config"]: lines[k] for k in slots}
    for k, name in zip(slots, [n for n in want if n in by_name]):
        lines[k] = by_name[name]
    _write_lines(out, lines)


def _write_lines(out: Path, lines: list[str]) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines if ln.strip()))
    tmp.replace(out)


def eval_fields(r) -> dict:
    """The JSON fields of an evaluation against the float model (pocketlm's EvalResult), with
    each window's NLL and KL for ``bench/table.py --paired``."""
    return {"ppl": round(r.ppl, 4), "base_ppl": round(r.ref_ppl, 4), "kl": round(r.kl, 5), "top1": round(r.top1, 4),
            "windows": r.windows, "seq_len": r.seq_len, "tokens": r.tokens_scored, "dtype": r.dtype,
            "window_nll": [round(x, 5) for x in r.window_nll], "window_kl": [round(x, 5) for x in r.window_kl]}


def provenance() -> dict:
    """The commit (``-dirty`` with uncommitted changes to anything but the results themselves)
    and the versions a result came from, as they were when this process started (a long run's
    code is what it imported then)."""
    return _PROVENANCE


def _provenance() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    here = Path(__file__).resolve().parent
    git = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD") or None
    if commit and git("status", "--porcelain", "--untracked-files=no", "--", "..", ":!../bench/results"):
        commit += "-dirty"
    versions = {}
    for pkg in ("pocketlm", "torch", "transformers", "gguf", "llama-cpp-python"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return {"commit": commit, "versions": versions, "machine": _machine()}


def _machine() -> dict:
    """What a result's speed depends on: CPU model, cores, RAM, OS."""
    import platform

    cpu = next((ln.split(":", 1)[1].strip() for ln in _lines("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor() or platform.machine())
    ram = next((int(ln.split()[1]) * 1024 for ln in _lines("/proc/meminfo") if ln.startswith("MemTotal:")), None)
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(ram / 2**30, 1) if ram else None,
            "os": platform.platform()}


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


_PROVENANCE = _provenance()


def emit(record: dict) -> str:
    """Print one result as a JSON line (with peak RSS, threads, commit, versions, machine and date) and
    return the line."""
    record["peak_rss_mib"] = round(peak_rss_mib(), 1)
    record["threads"] = __import__("torch").get_num_threads()
    record.update(provenance())
    record["date"] = time.strftime("%Y-%m-%d")
    line = json.dumps(record)
    print(line, flush=True)
    return line


def calibrated_main(script: str, bench: str, configs: list[str], one, calib_windows: int) -> None:
    """The command line of a benchmark of calibrated methods: ``--one NAME`` runs one
    configuration in this process; otherwise every (or ``--only`` the listed) configuration
    runs in its own process."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--only", help="comma-separated subset of configurations")
    ap.add_argument("--windows", type=int, default=16, help="WikiText-2 windows of 2048 tokens")
    ap.add_argument("--calib-windows", type=int, default=calib_windows, help="calibration windows of 2048 tokens")
    ap.add_argument("--ray", help="run the configurations as Ray tasks: auto or a cluster address")
    a = ap.parse_args()
    if a.one:
        one(a.one, a.windows, a.calib_windows)
    else:
        names = a.only.split(",") if a.only else list(configs)
        run_configs(script, bench, names, ["--windows", str(a.windows), "--calib-windows", str(a.calib_windows)],
                    a.ray)
