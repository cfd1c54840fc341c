"""``pocketlm fit``: the best GGUF file for a device budget, found by measuring candidates.

A budget is any of: file bytes, RAM while running at a context (file + KV cache + runtime), or a
decode speed. One probe file (every linear in Q8_0) measured in llama.cpp on this machine gives
what turns those into one byte budget for the file: the GGUF metadata beyond the tensors, the KV
cache and runtime memory at the context, and decode speed as a bandwidth constant (decoding a
token reads the whole file: tok/s ~ k / bytes). Candidates are APTQ over every GGML type to that
budget (importance-weighted RTN onto the planned types), on the model as it is and with the
layers of lowest Block Influence removed first (fewer layers leave more bits to the rest). A
candidate is skipped before any work when its predicted bytes, RAM or speed break the budget or
no plan fits; every other one is compressed, written as GGUF and scored in llama.cpp (KL and
perplexity against the float model on WikiText-2 windows). The lowest KL that meets every
measured budget wins; the chosen file's speed and RAM are measured again. Everything decided is
in ``fit.json`` and ``report.html`` beside ``model.gguf``.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import progress
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


def candidates(layers: list[int], file_limit: int, machine: Machine) -> list[Candidate]:
    out = []
    for n in layers:
        pre = [{"method": "remove-layers", "n": n}] if n else []
        stage = {"method": "aptq", "bytes": file_limit - machine.metadata_bytes - SLACK, "formats": FORMATS,
                 "embed": "q8_0", "quantizer": "rtn"}
        c = Candidate(f"aptq-gguf{f'-minus{n}layers' if n else ''}", [*pre, stage], machine.predict(file_limit))
        if stage["bytes"] <= 0:
            c.skipped = f"the file budget {file_limit:,} B leaves nothing after the metadata"
        out.append(c)
    return out


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


def run(model_spec: str, budget: Budget, out: Path, windows: int = 4, seq_len: int = 2048,
        calib_windows: int = 16, calib_len: int = 2048, layers: tuple[int, ...] = (0, 1), threads: int = 2,
        overwrite: bool = False, anchors=None, reference: Path | None = None) -> dict:
    """Search, measure and write ``out`` (model.gguf, fit.json, report.html). ``reference``: a
    file for the float model's log-probabilities on the evaluation windows, kept and reused
    (default: a temporary one)."""
    import shutil

    from . import models, report
    from .context import CalibrationConfig
    from .data import eval_windows
    from .fsutil import atomic_dir
    from .measure import ReferenceCache

    budget.check()
    t0 = time.perf_counter()
    model, tok, where = models.load(model_spec)
    src = where.describe() if where.kind == "gguf" else None
    with tempfile.TemporaryDirectory(prefix="pocketlm-fit-") as d:
        folder = Path(d)
        machine = probe(model, tok, src, budget.ctx, threads, folder)
        limit, limits = machine.file_limit(budget)
        cands = candidates(list(layers), limit, machine)
        win = eval_windows(tok, "wikitext2", seq_len, windows)
        ref = ReferenceCache.build(model, win, reference or folder / "reference.f32")
        cal = CalibrationConfig(windows=calib_windows, seq_len=calib_len)
        files = {}
        with progress.bar("fit candidates", len(cands)) as advance:
            for c in cands:
                if c.skipped is None:
                    files[c.name] = measure(c, model, tok, src, win, ref, cal, folder)
                advance()
        done = [c for c in cands if c.measured and c.measured["file_bytes"] <= limit]
        if not done:
            raise PocketError(f"no candidate fits a file of {limit:,} bytes ({'; '.join(str(c.skipped) for c in cands)}); "
                              "raise the budget")
        best = min(done, key=lambda c: c.measured["kl"])
        check = {**bench_file(files[best.name], budget.ctx, threads), "file": "model.gguf"}
        result = {"model": model_spec, "budget": asdict(budget), "machine": asdict(machine), "file_limit": limit,
                  "limits": limits, "candidates": [asdict(c) for c in cands], "chosen": best.name,
                  "why": f"lowest KL ({best.measured['kl']}) of the {len(done)} measured candidates within "
                         f"{limit:,} bytes",
                  "chosen_measured_again": {**check, "ram_bytes": int(check["peak_rss_mib"] * 2**20)},
                  "meets": _meets(budget, best, check), "seconds": round(time.perf_counter() - t0, 1),
                  "eval": {"corpus": "wikitext2", "windows": windows, "seq_len": seq_len}}
        with atomic_dir(out, overwrite=overwrite) as tmp:
            shutil.copy(files[best.name], tmp / "model.gguf")
            (tmp / "fit.json").write_text(json.dumps(result, indent=2))
            (tmp / "report.html").write_text(report.fit_page(result, anchors or report.Anchors()), encoding="utf-8")
    return result


def _meets(b: Budget, best: Candidate, check: dict) -> dict:
    out = {}
    if b.bytes is not None:
        out["bytes"] = best.measured["file_bytes"] <= b.bytes
    if b.ram is not None:
        out["ram"] = check["peak_rss_mib"] * 2**20 <= b.ram
    if b.min_decode is not None:
        out["min_decode"] = check["tg_tok_s"] >= b.min_decode
    return out
