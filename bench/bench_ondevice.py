"""The on-device table: GGUF files of the default model run in llama.cpp (llama-cpp-python).

    .venv/bin/python bench/bench_ondevice.py [--windows 16] [--calib-windows 16] [--threads 2] [--only a,b]
    .venv/bin/python bench/bench_ondevice.py --speed     # speed of every file again, nothing else running
    .venv/bin/python bench/bench_ondevice.py --plot      # bench/results/ondevice.png from the JSON lines

Rows: the float model as F16 GGUF; llama.cpp's own quantizer (``llama_model_quantize``, no
importance matrix) at Q8_0, Q5_0, Q4_0 and its mixed K-quant presets, fed the float model as an
F32 GGUF (the very weights pocketlm starts from); pocketlm RTN and GPTQ exported at Q8_0, Q5_0
and Q4_0 with every tensor in the type llama.cpp's file of the same name uses (token embedding
included), so the bytes are identical; APTQ restricted to GGUF block types at a bpw budget.
Each row: bits per weight of the whole file (tensor data / parameters), bytes, WikiText-2
perplexity on the first N windows of 2048 tokens computed from llama.cpp's logits, KL and top-1
against the float PyTorch model, and llama-bench-style prefill (512 tokens) and decode (128
tokens) tokens/s with the peak RSS of a fresh process that only loads and runs the file.
One JSON line each (bench/results/ondevice.jsonl). GGUF files go to POCKETLM_BENCH_DIR
(default /tmp/pocketlm-ondevice).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, calibrated_main, emit  # noqa: E402

TYPES = ("Q8_0", "Q5_0", "Q4_0")
LLAMA_PRESETS = (*TYPES, "Q5_K_M", "Q4_K_M")
APTQ_BPW = (5.0, 5.5)
APTQ_FORMATS = ["gguf-q4_0", "gguf-q5_0", "gguf-q8_0"]
CONFIGS = ["f16", *[f"llama.cpp-{t}" for t in LLAMA_PRESETS], *[f"rtn-{t}" for t in TYPES],
           *[f"gptq-{t}" for t in TYPES], *[f"aptq-{b}" for b in APTQ_BPW]]
DIR = Path(os.environ.get("POCKETLM_BENCH_DIR", "/tmp/pocketlm-ondevice"))
THREADS = int(os.environ.get("POCKETLM_BENCH_THREADS", "2"))


def gguf_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def gguf_sizes(path: Path) -> tuple[int, int]:
    """(parameters, bytes of tensor data) of a GGUF file."""
    from gguf import GGUFReader

    ts = GGUFReader(str(path)).tensors
    return sum(int(t.n_elements) for t in ts), sum(int(t.n_bytes) for t in ts)


def float_gguf(kind: str) -> Path:
    """The float model as an F32 (llama.cpp quantizer input) or F16 GGUF, written once."""
    from pocketlm import models
    from pocketlm.export import gguf as G
    from pocketlm.fsutil import atomic_file

    path = DIR / f"smollm2-135m-{kind}.gguf"
    if not path.is_file():
        model, tok, src = models.load("smollm2-135m")
        with atomic_file(path, overwrite=True) as tmp:
            G.write(model, tok, tmp, None, src.describe(), kind, kind, name="SmolLM2-135M-Instruct")
    return path


def llama_quantize(preset: str) -> Path:
    """llama.cpp's own quantizer on the F32 GGUF (written once per preset)."""
    import llama_cpp

    out = DIR / f"llama.cpp-{preset}.gguf"
    if not out.is_file():
        src = float_gguf("F32")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}")
        params.nthread = THREADS
        tmp = out.with_suffix(".partial")
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize {preset} failed ({rc})")
        tmp.replace(out)
    return out


def run_bench(path: Path) -> dict:
    """llama-bench-style speed and peak RSS in a fresh process that only runs the file."""
    code = ("import json,sys; from pocketlm.runtime.llamacpp import bench; "
            f"print(json.dumps(bench(sys.argv[1], {THREADS})))")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def score_gguf(path: Path, windows: int, model: str = "smollm2-135m"):
    """The evaluation of a GGUF file from llama.cpp's logits: the first ``windows`` WikiText-2
    windows of 2048 tokens, KL and top-1 against the float PyTorch model ``model`` (its
    log-probabilities computed once into a scratch file)."""
    import torch

    from pocketlm import models
    from pocketlm.data import eval_windows
    from pocketlm.measure import ReferenceCache, evaluate_windows
    from pocketlm.runtime.llamacpp import LlamaCppScorer

    torch.set_num_threads(THREADS)
    tok = models.load_tokenizer(models.resolve(model))
    ids = eval_windows(tok, "wikitext2", 2048, windows)
    folder = Path(os.environ.get("POCKETLM_REF_CACHE", tempfile.gettempdir()))
    tag = "smollm2" if model == "smollm2-135m" else model
    ref_path = folder / f"pocketlm-ref-{tag}-wikitext2-{windows}x2048.f32"
    if not ref_path.with_suffix(".json").is_file():
        ref_model, _, _ = models.load(model)
        ReferenceCache.build(ref_model, ids, ref_path)
        del ref_model
    ref = ReferenceCache(ref_path, ids)
    scorer = LlamaCppScorer(path, n_ctx=2048, threads=THREADS)
    return evaluate_windows(scorer, ids, reference=ref, corpus="wikitext2", chunk=512)


def measure(name: str, path: Path, windows: int, extra: dict) -> None:
    r = score_gguf(path, windows)
    sp = run_bench(path)
    params, tensor_bytes = gguf_sizes(path)
    types = gguf_types(path)
    counts = {t: list(types.values()).count(t) for t in sorted(set(types.values()))}
    emit({"bench": "ondevice", "config": name, "model": "smollm2-135m", **extra, "file": path.name,
          "bytes": path.stat().st_size, "tensor_bytes": tensor_bytes, "params": params,
          "bpw": round(tensor_bytes * 8 / params, 4), "token_embd": types.get("token_embd.weight"),
          "tensor_types": counts, "ppl": round(r.ppl, 4), "base_ppl": round(r.ref_ppl, 4), "kl": round(r.kl, 5),
          "top1": round(r.top1, 4), "windows": r.windows, "tokens": r.tokens_scored,
          "pp_tok_s": sp["pp_tok_s"], "tg_tok_s": sp["tg_tok_s"], "run_peak_rss_mib": sp["peak_rss_mib"],
          "bench_threads": THREADS})


def pocketlm_gguf(name: str, calib_windows: int) -> tuple[Path, dict]:
    """Compress with pocketlm onto GGUF grids and export with llama.cpp's per-tensor types."""
    import pocketlm
    from pocketlm import models
    from pocketlm.context import CalibrationConfig
    from pocketlm.export import gguf as G
    from pocketlm.fsutil import atomic_file

    method, arg = name.split("-", 1)
    if method == "aptq":
        stage = {"method": "aptq", "bpw": float(arg), "formats": APTQ_FORMATS, "damp": 0.1}
        embed = "Q8_0"
        like = None
    else:
        stage = {"method": method, "format": f"gguf-{arg.lower()}", **({"damp": 0.1} if method == "gptq" else {})}
        like = gguf_types(llama_quantize(arg))
        embed = like["token_embd.weight"]
    model, tok, src = models.load("smollm2-135m")
    t = time.perf_counter()
    res = pocketlm.compress(model, {"name": name, "stages": [stage]}, tokenizer=tok,
                            calibration=CalibrationConfig(windows=calib_windows, seq_len=2048))
    compress_s = time.perf_counter() - t
    out = DIR / f"pocketlm-{name}.gguf"
    with atomic_file(out, overwrite=True) as tmp:
        types = G.write(model, tok, tmp, res.context.quant, src.describe(), "F16", embed, name=f"pocketlm {name}")
    if like is not None and types != like:
        diff = {k: (v, like.get(k)) for k, v in types.items() if like.get(k) != v}
        raise RuntimeError(f"tensor types differ from llama.cpp's {arg} file: {diff}")
    extra = {"source": "pocketlm", "method": method, "type": arg if method != "aptq" else "mixed",
             "recipe": {"stages": [stage]}, "calib_windows": calib_windows if method != "rtn" else 0,
             "compress_s": round(compress_s, 1), "bpw_linears": res.context.size_report()["bpw_quantized"]}
    if method == "aptq":
        extra["plan"] = res.stages[0].get("plan_histogram")
    return out, extra


def one(name: str, windows: int, calib_windows: int) -> None:
    DIR.mkdir(parents=True, exist_ok=True)
    if name == "f16":
        measure(name, float_gguf("F16"), windows, {"source": "float", "method": "none", "type": "F16"})
    elif name.startswith("llama.cpp-"):
        preset = name.removeprefix("llama.cpp-")
        t = time.perf_counter()
        path = llama_quantize(preset)
        measure(name, path, windows, {"source": "llama.cpp", "method": "llama_model_quantize", "type": preset,
                                      "compress_s": round(time.perf_counter() - t, 1)})
    else:
        path, extra = pocketlm_gguf(name, calib_windows)
        measure(name, path, windows, extra)


def speed_pass(rounds: int = 2) -> None:
    """Measure every file's speed again with nothing else running: ``rounds`` passes over all
    files (interleaved, so drifts of the machine hit every file alike), best of each kept."""
    path = RESULTS / "ondevice.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    best: dict[str, dict] = {}
    for _ in range(rounds):
        for r in rows:
            f = DIR / r["file"]
            if not f.is_file():
                continue
            sp = run_bench(f)
            b = best.setdefault(r["config"], sp)
            for k in ("pp_tok_s", "tg_tok_s"):
                b[k] = max(b[k], sp[k])
            b["peak_rss_mib"] = max(b["peak_rss_mib"], sp["peak_rss_mib"])
    lines = []
    for r in rows:
        if r["config"] in best:
            b = best[r["config"]]
            r.update(pp_tok_s=b["pp_tok_s"], tg_tok_s=b["tg_tok_s"], run_peak_rss_mib=b["peak_rss_mib"],
                     speed="quiet pass, best of %d x 3 runs" % rounds)
            print(json.dumps(r), flush=True)
        lines.append(json.dumps(r))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in lines))
    tmp.replace(path)


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in (RESULTS / "ondevice.jsonl").read_text().splitlines() if x.strip()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    style = {"llama.cpp": ("tab:red", "s"), "pocketlm": ("tab:blue", "o"), "float": ("black", "*")}
    for src, (color, marker) in style.items():
        pts = sorted((r["bpw"], r["ppl"], r["config"]) for r in rows if r.get("source") == src)
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=color, marker=marker, label=src, zorder=3)
        for x, y, c in pts:
            ax.annotate(c.removeprefix("llama.cpp-"), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("bits per weight (whole GGUF file: tensor data / parameters)")
    ax.set_ylabel("WikiText-2 perplexity (llama.cpp logits)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("SmolLM2-135M-Instruct in llama.cpp: quality vs size")
    fig.tight_layout()
    fig.savefig(RESULTS / "ondevice.png", dpi=120)
    print(f"wrote {RESULTS / 'ondevice.png'}")


if __name__ == "__main__":
    if "--plot" in sys.argv:
        plot()
    elif "--speed" in sys.argv:
        speed_pass()
    else:
        calibrated_main(__file__, "ondevice", CONFIGS, one, 16)
