"""``pocketlm fit``: the best GGUF file for a device budget, found by measuring candidates.

A budget is any of: file bytes, RAM while running at a context (file + KV cache + runtime), or a
decode speed. One probe file (every linear in Q8_0) measured in llama.cpp on this machine gives
what turns those into one byte budget for the file: the GGUF metadata beyond the tensors, the KV
cache and runtime memory at the context, and decode speed as a bandwidth constant (decoding a
token reads the whole file: tok/s ~ k / bytes). Candidates are APTQ over every GGML type to that
budget (importance-weighted RTN onto the planned types), on the model as it is and with the
layers of lowest Block Influence removed first (fewer layers leave more bits to the rest), at the
whole file limit and, when a speed or RAM budget makes the limit a prediction, at 85% of it too. A
candidate is skipped before any work when its predicted bytes, RAM or speed break the budget or
no plan fits; every other one is compressed, written as GGUF and scored in llama.cpp (KL and
perplexity against the float model on WikiText-2 windows), and for a speed or RAM budget run in
llama.cpp too; if none of them meets the budget as measured, each layer count gets one more
candidate at the size its smallest measured file says would fit. The lowest KL that meets every
measured budget wins; the chosen file's speed and RAM are measured again in a fresh process, and
if that second measurement misses a budget, the next candidate is taken. Candidates can run as
Ray tasks (``ray=``, see ``sweep.py``). Everything decided is in ``fit.json`` and
``report.html`` beside ``model.gguf``.
"""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from . import progress, sweep
from .errors import PocketError

FORMATS = ["q8_0", "q6_k", "q5_k", "q5_0", "q4_k", "iq4_nl", "iq4_xs", "q3_k", "q2_k"]
SLACK = 16 * 1024  # bytes kept free below the budget: tensor alignment padding of the file


@dataclass
class Budget:
    bytes: int | None = None
    ram: int | None = None
    min_decode: float | None = None
    ctx: int = 4096

    def check(self) -> None:
        if self.bytes is None and self.ram is None and self.min_decode is None:
            raise PocketError("give a budget: --bytes 90MB, --ram 600MB or --min-decode 150")
        if self.ctx < 16:
            raise PocketError(f"--ctx must be at least 16, got {self.ctx}")


@dataclass
class Machine:
    """What the probe file measured on this machine (bytes in bytes, speed in tokens/s)."""
    metadata_bytes: int
    decode_k: float  # tokens/s x file bytes
    kv_bytes: int
    overhead_bytes: int  # peak RSS beyond the file and the KV cache
    probe: dict = field(default_factory=dict)

    def file_limit(self, b: Budget) -> tuple[int, dict]:
        """The largest file every budget allows, and each budget's own limit."""
        limits = {}
        if b.bytes is not None:
            limits["bytes"] = b.bytes
        if b.ram is not None:
            limits["ram"] = b.ram - self.kv_bytes - self.overhead_bytes
        if b.min_decode is not None:
            limits["min_decode"] = int(self.decode_k / b.min_decode)
        return min(limits.values()), limits

    def predict(self, file_bytes: int) -> dict:
        return {"file_bytes": file_bytes, "ram_bytes": file_bytes + self.kv_bytes + self.overhead_bytes,
                "decode_tok_s": round(self.decode_k / file_bytes, 1)}


@dataclass
class Candidate:
    name: str
    stages: list[dict]
    predicted: dict = field(default_factory=dict)
    measured: dict | None = None
    skipped: str | None = None


@dataclass
class Job:
    """Everything one candidate's measurement needs, so that it runs anywhere (a Ray worker
    loads the model itself from ``model``; every path must exist where it runs)."""
    model: str
    candidate: Candidate
    source_gguf: str | None
    windows: int
    seq_len: int
    calibration: object  # a CalibrationConfig
    reference: str  # the float model's log-probabilities (built there if missing)
    folder: str  # where the candidate's GGUF is written
    threads: int  # torch threads: the same everywhere, so results do not depend on where a task ran
    bench: dict | None = None  # {"ctx", "threads"}: measure speed and RAM too (speed or RAM budgets)
    ship: bool = False  # return the file's bytes (a Ray task: the file may sit on another machine)


_LOADED: dict[str, tuple] = {}  # model spec -> (model, tokenizer), loaded once per process
_WINDOWS: dict[tuple, object] = {}  # (model spec, seq_len, windows) -> evaluation windows


def bench_file(path: Path, ctx: int, threads: int) -> dict:
    """Speed, peak RSS and KV cache of a GGUF file in llama.cpp, in a fresh process (so the
    memory is the runtime's own, not this process's)."""
    r = subprocess.run([sys.executable, "-m", "pocketlm.cli", "bench", str(path), "--threads", str(threads),
                        "--prompt", "64", "--gen", "64", "--reps", "2", "--ctx", str(ctx)],
                       capture_output=True, text=True, env={**os.environ, "POCKETLM_QUIET": "1"})
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        raise PocketError(f"llama.cpp could not run {path.name}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(lines[-1])


def tensor_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def probe(model, tok, source_gguf: str | None, ctx: int, threads: int, folder: Path) -> Machine:
    """Write the model with every linear in Q8_0 and measure it (see the module doc)."""
    from .export import gguf as G

    path = folder / "probe-q8_0.gguf"
    G.write(model, tok, path, None, source_gguf, "Q8_0", "Q8_0", name="pocketlm fit probe")
    size = path.stat().st_size
    b = bench_file(path, ctx, threads)
    kv = int(b["kv_cache_mib"] * 2**20)
    over = max(0, int(b["peak_rss_mib"] * 2**20) - size - kv)
    return Machine(size - tensor_bytes(path), b["tg_tok_s"] * size, kv, over, {"bytes": size, **b})


def candidates(layers: list[int], file_limit: int, machine: Machine,
               sizes: tuple[float, ...] = (1.0,)) -> list[Candidate]:
    """APTQ to each fraction ``sizes`` of the file limit, after removing each count of ``layers``."""
    out = []
    for n in layers:
        for f in sizes:
            pre = [{"method": "remove-layers", "n": n}] if n else []
            target = int(file_limit * f)
            stage = {"method": "aptq", "bytes": target - machine.metadata_bytes - SLACK, "formats": FORMATS,
                     "embed": "q8_0", "quantizer": "rtn"}
            name = f"aptq-gguf{f'-minus{n}layers' if n else ''}{f'-{round(f * 100)}pct' if f != 1.0 else ''}"
            c = Candidate(name, [*pre, stage], machine.predict(target))
            if stage["bytes"] <= 0:
                c.skipped = f"the file budget {target:,} B leaves nothing after the metadata"
            out.append(c)
    return out


def measure_task(job: Job) -> dict:
    """Compress a copy of the model with the candidate's recipe, write it as GGUF, score it in
    llama.cpp (and bench it, for speed or RAM budgets). A sweep task: see ``sweep.run``."""
    import torch

    from . import models
    from .data import eval_windows
    from .measure import ReferenceCache

    if job.model not in _LOADED:
        m, tok, _ = models.load(job.model)
        _LOADED[job.model] = (m, tok)
    model, tok = _LOADED[job.model]
    threads = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    try:
        c, folder = job.candidate, Path(job.folder)
        folder.mkdir(parents=True, exist_ok=True)
        Path(job.reference).parent.mkdir(parents=True, exist_ok=True)
        key = (job.model, job.seq_len, job.windows)
        if key not in _WINDOWS:  # tokenized once per process, not once per candidate
            _WINDOWS[key] = eval_windows(tok, "wikitext2", job.seq_len, job.windows)
        win = _WINDOWS[key]
        ref = ReferenceCache.build(model, win, job.reference)
        path = measure(c, model, tok, job.source_gguf, win, ref, job.calibration, folder)
        if path is not None and job.bench:
            b = bench_file(path, job.bench["ctx"], job.bench["threads"])
            c.measured.update({"decode_tok_s": b["tg_tok_s"], "ram_bytes": int(b["peak_rss_mib"] * 2**20)})
    finally:
        torch.set_num_threads(threads)
    data = path.read_bytes() if path is not None and job.ship else None
    return {"measured": c.measured, "skipped": c.skipped, "file": str(path) if path else None, "data": data}


def measure(c: Candidate, model, tok, src, windows, ref, calibration, folder: Path) -> Path | None:
    """Compress a copy of the model with the candidate's recipe, write it as GGUF, score it."""
    from .export import gguf as G
    from .measure import evaluate_windows
    from .pipeline import compress
    from .runtime.llamacpp import LlamaCppScorer

    t0 = time.perf_counter()
    try:
        res = compress(copy.deepcopy(model), {"name": c.name, "stages": c.stages}, tokenizer=tok,
                                calibration=calibration)
    except PocketError as e:  # e.g. no plan fits the budget
        c.skipped = str(e)
        return None
    path = folder / f"{c.name}.gguf"
    G.write(res.model, tok, path, res.context.quant, src, "F16", "Q8_0", name=f"pocketlm fit {c.name}")
    seconds = time.perf_counter() - t0
    r = evaluate_windows(LlamaCppScorer(path, n_ctx=windows.shape[1]), windows, reference=ref, corpus="wikitext2")
    eval_s = time.perf_counter() - t0 - seconds
    aptq = next(s for s in res.stages if s["method"] == "aptq")
    c.measured = {"file_bytes": path.stat().st_size, "kl": round(r.kl, 5), "ppl": round(r.ppl, 4),
                  "top1": round(r.top1, 4), "window_kl": [round(x, 5) for x in r.window_kl],
                  "layers": res.model.config.num_hidden_layers, "plan": aptq.get("plan_histogram"),
                  "compress_s": round(seconds, 1), "eval_s": round(eval_s, 1)}
    return path


def search(jobs: list[Job], ray: str | None, folder: Path) -> dict[str, Path]:
    """Measure every job's candidate (in this process or as Ray tasks); the files by name."""
    files = {}
    todo = [j for j in jobs if j.candidate.skipped is None]
    with progress.bar("fit candidates", len(todo)) as advance:
        def done(i, r):
            c = todo[i].candidate
            c.measured, c.skipped = r["measured"], r["skipped"]
            if r["data"] is not None:  # shipped back from a worker
                (folder / f"{c.name}.gguf").write_bytes(r["data"])
                files[c.name] = folder / f"{c.name}.gguf"
            elif r["file"]:
                files[c.name] = Path(r["file"])
            advance(note=c.name)
        # a Ray task reserves as many CPUs as its torch threads: oversubscribed cores slow torch many times over
        sweep.run(measure_task, todo, ray, on_done=done, cpus=max((j.threads for j in todo), default=1))
    return files


@dataclass
class Search:
    """How ``run`` searches: evaluation windows, calibration, candidates, where tasks run."""
    windows: int = 4
    seq_len: int = 2048
    calib_windows: int = 16
    calib_len: int = 2048
    layers: tuple[int, ...] = (0, 1)
    threads: int = 2
    sizes: tuple[float, ...] | None = None
    ray: str | None = None
    reference: Path | None = None


def run(model_spec: str, budget: Budget, out: Path, windows: int = 4, seq_len: int = 2048,
        calib_windows: int = 16, calib_len: int = 2048, layers: tuple[int, ...] = (0, 1), threads: int = 2,
        overwrite: bool = False, anchors=None, reference: Path | None = None,
        sizes: tuple[float, ...] | None = None, ray: str | None = None) -> dict:
    """Search, measure and write ``out`` (model.gguf, fit.json, report.html). ``reference``: a
    file for the float model's log-probabilities on the evaluation windows, kept and reused
    (default: a temporary one). ``sizes``: the fractions of the file limit each layer count is
    tried at (default 1.0, and 0.85 too when a speed or RAM budget is predicted rather than
    exact). ``ray``: measure the candidates as Ray tasks (``sweep.run``)."""
    from . import models

    budget.check()
    s = Search(windows, seq_len, calib_windows, calib_len, tuple(layers), threads, sizes, ray, reference)
    t0 = time.perf_counter()
    model, tok, where = models.load(model_spec)
    _LOADED[model_spec] = (model, tok)  # the in-process tasks use it; dropped at the end
    try:
        with tempfile.TemporaryDirectory(prefix="pocketlm-fit-") as d:
            result, best = _search(model_spec, budget, s, model, tok, where, Path(d))
            result["seconds"] = round(time.perf_counter() - t0, 1)
            _write(out, overwrite, best, result, anchors)
    finally:
        _LOADED.pop(model_spec, None)
    return result


def _search(model_spec: str, budget: Budget, s: Search, model, tok, where, folder: Path) -> tuple[dict, Path]:
    """Probe, build and measure the candidates, choose: the result and the chosen file."""
    import torch

    from .context import CalibrationConfig
    from .data import eval_windows
    from .measure import ReferenceCache

    src = where.describe() if where.kind == "gguf" else None
    timed = budget.ram is not None or budget.min_decode is not None
    sizes = s.sizes or ((1.0, 0.85) if timed else (1.0,))
    machine = probe(model, tok, src, budget.ctx, s.threads, folder)
    limit, limits = machine.file_limit(budget)
    cands = candidates(list(s.layers), limit, machine, sizes)
    ref = Path(s.reference or folder / "reference.f32")
    ReferenceCache.build(model, eval_windows(tok, "wikitext2", s.seq_len, s.windows), ref)
    cal = CalibrationConfig(windows=s.calib_windows, seq_len=s.calib_len)
    jobs = [Job(model_spec, c, src, s.windows, s.seq_len, cal, str(ref), str(folder), torch.get_num_threads(),
                {"ctx": budget.ctx, "threads": s.threads} if timed else None, ship=bool(s.ray)) for c in cands]
    files = search(jobs, s.ray, folder)
    if timed and not any(_fits(budget, c) for c in cands):  # the prediction was off: correct it once
        more = corrected(budget, cands, machine)
        files.update(search([replace(jobs[0], candidate=c) for c in more], s.ray, folder))
        cands += more
    result = _choose(budget, cands, files, limit, s.threads)
    result.update({"model": model_spec, "budget": asdict(budget), "machine": asdict(machine), "file_limit": limit,
                   "limits": limits, "candidates": [asdict(c) for c in cands], "sizes": list(sizes),
                   "runner": f"ray {s.ray}" if s.ray else "in process",
                   "eval": {"corpus": "wikitext2", "windows": s.windows, "seq_len": s.seq_len}})
    return result, files[result["chosen"]]


MARGIN = 0.95  # a corrected candidate's size below what its measured neighbour says would just fit


def corrected(budget: Budget, cands: list[Candidate], machine: Machine) -> list[Candidate]:
    """When no candidate's own measurement met a speed or RAM budget: for each layer count, one
    more candidate at the size its smallest measured file says fits (decode speed x bytes taken
    as constant, RAM beyond the file as measured), less a margin."""
    out = []
    for c in cands:
        m = c.measured
        if not m or any(o.measured and o.measured["layers"] == m["layers"]
                        and o.measured["file_bytes"] < m["file_bytes"] for o in cands):
            continue  # only the smallest measured file of each layer count
        limits = []
        if budget.min_decode is not None:
            limits.append(m["decode_tok_s"] * m["file_bytes"] / budget.min_decode)
        if budget.ram is not None:
            limits.append(budget.ram - (m["ram_bytes"] - m["file_bytes"]))
        if budget.bytes is not None:
            limits.append(budget.bytes)
        target = int(min(limits) * MARGIN)
        more = candidates([c.stages[0]["n"] if c.stages[0]["method"] == "remove-layers" else 0], target, machine)[0]
        more.name = re.sub(r"-\d+pct$", "", c.name) + "-corrected"
        out.append(more)
    return out


def _fits(budget: Budget, c: Candidate) -> bool:
    """Whether a candidate's own measurement meets every budget (bytes exactly; speed and RAM as
    llama.cpp ran it, when such a budget is set)."""
    return bool(c.measured) and all(_meets(budget, c.measured, c.measured).values())


def _choose(budget: Budget, cands: list[Candidate], files: dict, limit: int, threads: int) -> dict:
    """The lowest KL among the candidates whose measurements meet every budget, measured again
    in a fresh process; if that measurement misses a budget (speed varies), the next one."""
    done = [c for c in cands if _fits(budget, c)]
    if not done:
        raise PocketError(f"no candidate fits a file of {limit:,} bytes ({'; '.join(str(c.skipped) for c in cands)}); "
                          "raise the budget")
    rechecked = []
    for best in sorted(done, key=lambda c: c.measured["kl"]):
        check = {**bench_file(files[best.name], budget.ctx, threads), "file": "model.gguf"}
        meets = _meets(budget, best.measured, check)
        rechecked.append({"name": best.name, "tg_tok_s": check["tg_tok_s"], "meets": meets})
        if all(meets.values()):
            break
    return {"chosen": best.name, "why": f"lowest KL ({best.measured['kl']}) of the {len(done)} measured candidates "
                                         f"within {limit:,} bytes" + ("" if len(rechecked) == 1 else
                                         f" whose second measurement met every budget ({len(rechecked)} tried)"),
            "chosen_measured_again": {**check, "ram_bytes": int(check["peak_rss_mib"] * 2**20)},
            "rechecked": rechecked, "meets": meets}


def _write(out: Path, overwrite: bool, gguf: Path, result: dict, anchors) -> None:
    import shutil

    from . import report
    from .fsutil import atomic_dir

    with atomic_dir(out, overwrite=overwrite) as tmp:
        shutil.copy(gguf, tmp / "model.gguf")
        (tmp / "fit.json").write_text(json.dumps(result, indent=2))
        (tmp / "report.html").write_text(report.fit_page(result, anchors or report.Anchors()), encoding="utf-8")


def _meets(b: Budget, measured: dict, check: dict) -> dict:
    """Each budget met or not, by ``measured`` (file bytes) and ``check`` (speed and RAM, from
    ``bench_file`` or a candidate's own measurement; absent when no such budget is set)."""
    out = {}
    if b.bytes is not None:
        out["bytes"] = measured["file_bytes"] <= b.bytes
    if b.ram is not None:
        out["ram"] = check.get("ram_bytes", check.get("peak_rss_mib", 0) * 2**20) <= b.ram
    if b.min_decode is not None:
        out["min_decode"] = check.get("decode_tok_s", check.get("tg_tok_s", 0)) >= b.min_decode
    return out
