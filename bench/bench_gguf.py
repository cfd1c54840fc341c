"""GGUF files against llama.cpp's own quantizer with an importance matrix, at equal bytes.

    .venv/bin/python bench/bench_gguf.py [--only a,b] [--windows 16] [--calib-windows 16]
    .venv/bin/python bench/bench_gguf.py --llama-bench A,B,... [--rounds 3] [--reps 5]   # speed: llama-bench
    .venv/bin/python bench/table.py gguf                   # the table; --paired A B for differences

Anchors, made by llama.cpp's own tools built from the pinned llama-cpp-python source
(``bench/build_llamacpp.sh``): ``llama-imatrix`` on the calibration windows pocketlm uses (the
same token windows, decoded to text, 2048-token chunks), then ``llama-quantize --imatrix`` of
the float model (F32 GGUF) to each preset; ``llama.cpp-noimat-*`` rows without the matrix.
pocketlm rows: ``<method>-like-<PRESET>`` puts pocketlm's own codes in exactly the per-tensor
types of llama.cpp's file of that preset (so the bytes are identical): ``imatrix`` is
importance-weighted RTN (each layer's statistics from the quantized layers before it),
``imatrix1`` the same in one pass under bfloat16 autocast, every statistic from the float
model (as llama-imatrix; the imatrix-iq4_nl preset),
``gptq`` GPTQ on the type's blocks with the importance-weighted scales.
``aptq-<MB>`` plans the types per tensor to a whole-file budget.
``source``: the model's own GGUF file as shipped (for a model that comes quantized, e.g. Gemma-3-270M
in Q4_K_M: the floor that re-quantizing to its own tensor types can reach, since the float weights
every row is measured against are that file's).
``autoround-<PRESET>``: AutoRound's GGUF export (PyPI ``auto-round``) of the same float model on the
same calibration token windows, with its recommended GGUF setting ``iters=0``.
Every row: WikiText-2 (first N windows of 2048 tokens) perplexity from llama.cpp's logits, KL
and top-1 against the float PyTorch model, per-window NLL and KL, file bytes and bpw.
GGUF files go to POCKETLM_BENCH_DIR (default /tmp/pocketlm-gguf).
POCKETLM_BENCH_MODEL picks the model (default smollm2-135m; e.g. gemma3-270m, whose results go to
bench/results/gguf-gemma3-270m.jsonl and its files to a subfolder of the bench directory).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ondevice import gguf_sizes, gguf_types, score_gguf  # noqa: E402
from common import RESULTS, _replace_line, calibrated_main, emit, eval_fields  # noqa: E402

AUTOROUND = ["Q4_0", "Q4_K_M", "Q2_K_S"]  # AutoRound's GGUF presets (it writes no IQ4_NL)
PRESETS = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "IQ4_NL", "Q4_0", "IQ4_XS", "Q3_K_M", "Q2_K"]
CONFIGS = [*[f"llama.cpp-{p}" for p in PRESETS], *[f"gptq-like-{p}" for p in PRESETS],
           *[f"imatrix-like-{p}" for p in PRESETS], *[f"imatrix1-like-{p}" for p in PRESETS],
           *[f"aptq-like-{p}" for p in PRESETS],
           *[f"aptq-rtn-like-{p}" for p in PRESETS],
           *[f"llama.cpp-noimat-{p}" for p in ("Q4_0", "IQ4_NL")],
           *[f"autoround-{p}" for p in AUTOROUND], "source"]
MODEL = os.environ.get("POCKETLM_BENCH_MODEL", "smollm2-135m")
DEFAULT = MODEL == "smollm2-135m"
BENCH = "gguf" if DEFAULT else f"gguf-{MODEL}"
DIR = Path(os.environ.get("POCKETLM_BENCH_DIR", "/tmp/pocketlm-gguf")) / ("" if DEFAULT else MODEL)
THREADS = int(os.environ.get("POCKETLM_BENCH_THREADS", "2"))
HERE = Path(__file__).resolve().parent


def tools() -> Path:
    out = subprocess.run(["bash", str(HERE / "build_llamacpp.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def float_gguf() -> Path:
    from pocketlm import models
    from pocketlm.export import gguf as G
    from pocketlm.fsutil import atomic_file

    path = DIR / f"{MODEL}-F32.gguf"
    if not path.is_file():
        model, tok, src = models.load(MODEL)
        with atomic_file(path, overwrite=True) as tmp:
            G.write(model, tok, tmp, None, src.describe(), "F32", "F32", name=f"{MODEL} float")
    return path


def calib_windows(n: int):
    from pocketlm import models
    from pocketlm.data import calibration_windows

    tok = models.load_tokenizer(models.resolve(MODEL))
    return tok, calibration_windows(tok, n, 2048)


def calib_text(n: int) -> Path:
    """The calibration windows decoded to text for llama-imatrix (which puts BOS first in each
    chunk itself, so a BOS pocketlm put first is left out)."""
    from pocketlm.data import bos_id

    tok, w = calib_windows(n)
    if bos_id(tok) is not None:
        w = w[:, 1:]
    text = DIR / f"calib{n}.txt"
    text.write_text("".join(tok.decode(row) for row in w.tolist()))
    return text


def run_imatrix(text: Path, out: Path, n: int) -> float:
    """llama-imatrix over ``n`` chunks of 2048 tokens of ``text`` into ``out``; returns seconds."""
    t = time.perf_counter()
    subprocess.run([str(tools() / "llama-imatrix"), "-m", str(float_gguf()), "-f", str(text), "-o", str(out),
                    "-c", "2048", "-b", "2048", "--chunks", str(n), "-t", str(THREADS), "--no-ppl"],
                   check=True, capture_output=True)
    return time.perf_counter() - t


def imatrix(n: int) -> tuple[Path, float]:
    """llama-imatrix over the calibration windows (decoded to text); returns (file, seconds)."""
    out = DIR / f"imatrix-calib{n}.gguf"
    meta = out.with_suffix(".json")
    if out.is_file() and meta.is_file():
        return out, json.loads(meta.read_text())["seconds"]
    secs = run_imatrix(calib_text(n), out, n)
    meta.write_text(json.dumps({"seconds": secs}))
    return out, secs


def llama_quantize(preset: str, imat: Path | None) -> tuple[Path, float]:
    out = DIR / f"llama.cpp-{'' if imat else 'noimat-'}{preset}.gguf"
    t = time.perf_counter()
    if not out.is_file():
        args = [str(tools() / "llama-quantize")] + (["--imatrix", str(imat)] if imat else [])
        tmp = out.with_suffix(".partial")
        subprocess.run([*args, str(float_gguf()), str(tmp), preset, str(THREADS)], check=True, capture_output=True)
        tmp.replace(out)
    return out, time.perf_counter() - t


def measure(name: str, path: Path, windows: int, extra: dict) -> None:
    r = score_gguf(path, windows, MODEL)
    params, tensor_bytes = gguf_sizes(path)
    types = gguf_types(path)
    counts = {t: list(types.values()).count(t) for t in sorted(set(types.values()))}
    emit({"bench": BENCH, "config": name, "model": MODEL, **extra, "file": path.name,
          "bytes": path.stat().st_size, "tensor_bytes": tensor_bytes, "params": params,
          "file_bpw": round(path.stat().st_size * 8 / params, 4), "bpw": round(tensor_bytes * 8 / params, 4),
          "token_embd": types.get("token_embd.weight"), "tensor_types": counts, **eval_fields(r),
          "eval_threads": THREADS})


def pocketlm_like(method: str, preset: str, n_calib: int) -> tuple[Path, dict]:
    """pocketlm's codes in the per-tensor types of llama.cpp's (imatrix) file of ``preset``."""
    import pocketlm
    from pocketlm import models
    from pocketlm.export import gguf as G
    from pocketlm.fsutil import atomic_file

    imat, _ = imatrix(n_calib)
    like, _ = llama_quantize(preset, imat)
    model, tok, src = models.load(MODEL)
    mix = G.tensor_types_of(like, model)
    embed = mix.pop("model.embed_tokens")
    main = max(set(mix.values()), key=list(mix.values()).count)
    stage = {"method": method, "format": f"gguf-{main.lower()}", "types": {k: v for k, v in mix.items() if v != main},
             "embed": embed}
    if method == "imatrix1":  # one bfloat16 calibration pass: every layer's statistics from the float model
        stage.update(method="imatrix", sequential=False, calib_dtype="bfloat16")
    _, w = calib_windows(n_calib)
    t = time.perf_counter()
    res = pocketlm.compress(model, {"name": f"{method}-like-{preset}", "stages": [stage]}, tokenizer=tok,
                            calibration=w)
    compress_s = time.perf_counter() - t
    out = DIR / f"pocketlm-{method}-like-{preset}.gguf"
    with atomic_file(out, overwrite=True) as tmp:
        types = G.write(model, tok, tmp, res.context.quant, src.describe(), "F16", embed,
                        name=f"pocketlm {method} like {preset}")
    theirs = gguf_types(like)
    diff = {k: (v, theirs.get(k)) for k, v in types.items() if theirs.get(k) != v}
    if diff:
        raise RuntimeError(f"tensor types differ from llama.cpp's {preset} file: {diff}")
    return out, {"source": "pocketlm", "method": method, "type": preset, "calib_windows": n_calib,
                 "compress_s": round(compress_s, 1), "recipe_types": {"format": main, "embed": embed}}


APTQ_FORMATS = ["Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "IQ4_NL", "IQ4_XS", "Q3_K", "Q2_K"]


def metadata_bytes() -> int:
    """Bytes of a pocketlm GGUF file of this model beyond its tensor data (header, tokenizer,
    tensor index, alignment): measured on a file written by pocketlm."""
    probe = DIR / "probe-Q8_0.gguf"
    if not probe.is_file():
        from pocketlm import models
        from pocketlm.export import gguf as G
        from pocketlm.fsutil import atomic_file

        model, tok, src = models.load(MODEL)
        with atomic_file(probe, overwrite=True) as tmp:
            G.write(model, tok, tmp, None, src.describe(), "Q8_0", "Q8_0", name="pocketlm aptq-like probe")
    return probe.stat().st_size - gguf_sizes(probe)[1]


def pocketlm_aptq(preset: str, n_calib: int, quantizer: str = "gptq") -> tuple[Path, dict]:
    """APTQ over every GGML type, the whole file within the bytes of llama.cpp's ``preset`` file
    (token embedding in the type llama.cpp's file gives it); ``quantizer``: GPTQ or
    importance-weighted RTN onto the planned types."""
    import pocketlm
    from pocketlm import models
    from pocketlm.export import gguf as G
    from pocketlm.fsutil import atomic_file

    imat, _ = imatrix(n_calib)
    like, _ = llama_quantize(preset, imat)
    budget = like.stat().st_size - metadata_bytes()
    model, tok, src = models.load(MODEL)
    embed = G.tensor_types_of(like, model)["model.embed_tokens"]
    stage = {"method": "aptq", "bytes": budget, "formats": APTQ_FORMATS, "embed": embed, "quantizer": quantizer}
    _, w = calib_windows(n_calib)
    t = time.perf_counter()
    name = f"aptq-{'rtn-' if quantizer == 'rtn' else ''}like-{preset}"
    res = pocketlm.compress(model, {"name": name, "stages": [stage]}, tokenizer=tok, calibration=w)
    compress_s = time.perf_counter() - t
    out = DIR / f"pocketlm-{name}.gguf"
    with atomic_file(out, overwrite=True) as tmp:
        G.write(model, tok, tmp, res.context.quant, src.describe(), "F16", embed, name=f"pocketlm {name}")
    return out, {"source": "pocketlm", "method": "aptq", "type": "mixed", "calib_windows": n_calib,
                 "compress_s": round(compress_s, 1), "budget_bytes": budget, "recipe": {"stages": [stage]},
                 "plan": res.stages[0].get("plan_histogram")}


def autoround(preset: str, n_calib: int) -> tuple[Path, dict]:
    """AutoRound's GGUF file of ``preset`` from the float model, calibrated on the same windows."""
    import torch
    from auto_round import AutoRound

    from pocketlm import models

    out = DIR / f"autoround-{preset}.gguf"
    meta = out.with_suffix(".json")
    if not (out.is_file() and meta.is_file()):
        hf = DIR / f"{MODEL}-hf"  # AutoRound reads a transformers directory
        if not (hf / "config.json").is_file():
            from pocketlm.fsutil import atomic_dir

            m, t, _ = models.load(MODEL)
            with atomic_dir(hf, overwrite=True) as tmp:
                models.save(m, t, tmp)
        _, w = calib_windows(n_calib)
        work = DIR / f"autoround-{preset}.d"
        torch.set_num_threads(THREADS)
        t = time.perf_counter()
        ar = AutoRound(str(hf), scheme=f"gguf:{preset.lower()}", iters=0, nsamples=n_calib,
                       seqlen=w.shape[1], dataset=[row[None] for row in w], device_map="cpu")
        ar.quantize_and_save(str(work), format=f"gguf:{preset.lower()}")
        secs = time.perf_counter() - t
        made = sorted(work.rglob("*.gguf"))
        if len(made) != 1:
            raise RuntimeError(f"AutoRound wrote {made}, expected one GGUF file")
        made[0].replace(out)
        meta.write_text(json.dumps({"seconds": secs}))
    return out, {"source": "auto-round", "method": "auto-round iters=0", "type": preset, "calib_windows": n_calib,
                 "compress_s": round(json.loads(meta.read_text())["seconds"], 1)}


def timing(preset: str, n_calib: int) -> None:
    """Wall-clock time, one after the other in this process on the same calibration tokens, of
    llama.cpp's importance-matrix path (llama-imatrix, then llama-quantize) and of pocketlm's
    (model load, importance-weighted RTN or GPTQ into the same tensor types, GGUF written)."""
    import tempfile

    imat_keep, _ = imatrix(n_calib)  # the types of the file pocketlm's rows copy
    like, _ = llama_quantize(preset, imat_keep)
    text = calib_text(n_calib)
    with tempfile.TemporaryDirectory(dir=DIR) as d:
        imat_s = run_imatrix(text, Path(d) / "imatrix.gguf", n_calib)
        t = time.perf_counter()
        subprocess.run([str(tools() / "llama-quantize"), "--imatrix", f"{d}/imatrix.gguf", str(float_gguf()),
                        f"{d}/q.gguf", preset, str(THREADS)], check=True, capture_output=True)
        quant_s = time.perf_counter() - t
    mine = {}
    for method in ("imatrix", "imatrix1", "gptq"):
        t = time.perf_counter()
        pocketlm_like(method, preset, n_calib)
        mine[method] = time.perf_counter() - t
    llama = imat_s + quant_s
    emit({"bench": f"{BENCH}-time", "config": f"timing-{preset}", "model": MODEL, "calib_windows": n_calib,
          "llama_imatrix_s": round(imat_s, 1), "llama_quantize_s": round(quant_s, 1), "llama_total_s": round(llama, 1),
          "pocketlm_imatrix_s": round(mine["imatrix"], 1), "pocketlm_imatrix1_s": round(mine["imatrix1"], 1),
          "pocketlm_gptq_s": round(mine["gptq"], 1), "imatrix_ratio": round(mine["imatrix"] / llama, 2),
          "imatrix1_ratio": round(mine["imatrix1"] / llama, 2), "gptq_ratio": round(mine["gptq"] / llama, 2),
          "torch_threads": THREADS})


def one(name: str, windows: int, n_calib: int) -> None:
    DIR.mkdir(parents=True, exist_ok=True)
    if name.startswith("llama.cpp-"):
        preset = name.removeprefix("llama.cpp-")
        plain = preset.startswith("noimat-")
        preset = preset.removeprefix("noimat-")
        imat, imat_s = (None, 0.0) if plain else imatrix(n_calib)
        path, q_s = llama_quantize(preset, imat)
        measure(name, path, windows, {"source": "llama.cpp", "method": "llama-quantize" + ("" if plain else
                " --imatrix"), "type": preset, "calib_windows": 0 if plain else n_calib,
                "imatrix_s": round(imat_s, 1), "quantize_s": round(q_s, 1)})
    elif name == "source":
        from pocketlm import models

        src = models.resolve(MODEL)
        if src.kind != "gguf":
            raise SystemExit(f"{MODEL} does not come as a GGUF file; the source row needs one")
        path = Path(src.describe())
        measure(name, path, windows, {"source": "model", "method": "the model's own file", "type": "as shipped"})
    elif name.startswith("timing-"):
        timing(name.removeprefix("timing-"), n_calib)
    elif name.startswith("autoround-"):
        path, extra = autoround(name.removeprefix("autoround-"), n_calib)
        measure(name, path, windows, extra)
    elif name.startswith("aptq-"):
        quantizer = "rtn" if name.startswith("aptq-rtn-") else "gptq"
        path, extra = pocketlm_aptq(name.split("-like-")[1], n_calib, quantizer)
        measure(name, path, windows, extra)
    else:
        method, _, preset = name.split("-", 2)
        path, extra = pocketlm_like(method, preset, n_calib)
        measure(name, path, windows, extra)


def llama_bench(names: list[str], rounds: int = 3, reps: int = 5) -> None:
    """The same with llama.cpp's own ``llama-bench`` (no Python in the loop): each round runs
    every file (pp512 and tg128, ``reps`` repetitions each, its mean and standard deviation);
    rounds interleave the files, in reverse order every other round (so that neither file always
    runs first); the per-round means are kept, and the median reported."""
    import statistics

    rows = {json.loads(x)["config"]: json.loads(x) for x in (RESULTS / f"{BENCH}.jsonl").read_text().splitlines()
            if x.strip()}
    got: dict[str, dict[str, list[float]]] = {n: {"pp": [], "tg": []} for n in names}
    for i in range(rounds):
        for n in names if i % 2 == 0 else names[::-1]:
            out = subprocess.run([str(tools() / "llama-bench"), "-m", str(DIR / rows[n]["file"]), "-p", "512",
                                  "-n", "128", "-r", str(reps), "-t", str(THREADS), "-o", "json"],
                                 check=True, capture_output=True, text=True).stdout
            for test in json.loads(out):
                kind = "pp" if test["n_prompt"] > 0 else "tg"
                got[n][kind].append(test["avg_ts"])
    for n in names:
        line = emit({"bench": "gguf-llama-bench", "config": n, "file": rows[n]["file"], "rounds": rounds,
                     "reps": reps, "pp_tok_s": round(statistics.median(got[n]["pp"]), 2),
                     "tg_tok_s": round(statistics.median(got[n]["tg"]), 2), "pp_rounds": got[n]["pp"],
                     "tg_rounds": got[n]["tg"], "bench_threads": THREADS})
        _replace_line(RESULTS / f"{BENCH}_llama_bench.jsonl", n, line)


if __name__ == "__main__":
    if "--llama-bench" in sys.argv:  # the speed mode has its own options
        ap = argparse.ArgumentParser(description="GGUF files' speed in llama-bench, rounds in alternating order")
        ap.add_argument("--llama-bench", required=True, help="comma-separated configurations (their files)")
        ap.add_argument("--rounds", type=int, default=3, help="rounds over all files")
        ap.add_argument("--reps", type=int, default=5, help="llama-bench repetitions per file and round")
        a = ap.parse_args()
        llama_bench(a.llama_bench.split(","), a.rounds, a.reps)
    else:
        calibrated_main(__file__, BENCH, CONFIGS, one, 16)
