"""The KV cache of the default model, SmolLM2-135M, made smaller two ways.

Fewer KV heads: the 3 KV heads per layer merged into 1 (the float16 KV cache from 23,040 to
7,680 bytes per token), by mean pooling or after aligning the heads; and the aligned model
quantized to IQ4_NL and run in llama.cpp (``kv1-*``).

Sliding-window layers (``swa-*``): half the KV memory at 8,192 tokens with windows of 512
tokens (16 of the 30 layers), the layers chosen by attention span on calibration text, or the
last ones, or at random (``swa-random``: seed 0; ``swa-random-s1``..``-s4``: seeds 1 to 4), or
by the measured cost of converting each layer alone (``swa-cost``, on one calibration window);
scored on windows of 8,192 tokens (``--windows`` / 8 of them: the same text as the 2,048-token
windows) with perplexity by position, against the float model on the same windows
(``swa-none``). Calibration for the span: 4 windows of 2,048 tokens. ``swa-span+recover``,
``swa-cost+recover``: the chosen model healed by distillation toward the float model (the
``recover`` stage; 120k tokens of the calibration text in windows of 2,048, so that the
512-token windows bite).

POCKETLM_BENCH_MODEL=gemma3-270m runs the sliding-window configurations on Gemma-3-270M (results
in bench/results/kv-gemma3-270m.jsonl): it has 3 global layers among 18 (the others slide over
512 tokens already), so one more is converted (``n: 1``), and ``swa-layer-K`` converts layer K,
so that every choice can be checked against each layer's own cost on the evaluation text.

    .venv/bin/python bench/bench_kv.py [--calib-windows 16] [--windows 16] [--only a,b]

One JSON line per result (also in bench/results/kv.jsonl): WikiText-2 perplexity on the first
N windows of 2048 tokens, KL divergence and top-1 agreement against the float model (its
log-probabilities cached in POCKETLM_REF_CACHE, default /tmp), the stage's key and value output
errors (relative, on the calibration text) for mean pooling and for the aligned merge, KV bytes
per token and wall time. Calibration: the Python-docs text.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import calibrated_main, emit, eval_fields  # noqa: E402

CONFIGS = ["kv1-mean", "kv1-aligned", "kv1-aligned+iq4_nl-gguf", "swa-none", "swa-span", "swa-cost", "swa-last",
           "swa-random", *[f"swa-random-s{i}" for i in range(1, 5)], "swa-span+recover", "swa-cost+recover"]
HEAL = {"method": "recover", "tokens": 120_000, "seq_len": 2048, "windows_per_step": 2, "memory": "8GiB"}
LONG = 8192
MODEL = os.environ.get("POCKETLM_BENCH_MODEL", "smollm2-135m")
BENCH = "kv" if MODEL == "smollm2-135m" else f"kv-{MODEL}"
SIZE = {"gemma3-270m": {"n": 1}}.get(MODEL, {"kv_fraction": 0.5})  # how many layers to make sliding
if MODEL == "gemma3-270m":
    CONFIGS = ["swa-none", "swa-cost", "swa-span", *[f"swa-layer-{k}" for k in (5, 11, 17)]]


def swa(name: str, windows: int, calib_windows: int) -> None:
    import pocketlm
    from pocketlm import kv, models
    from pocketlm.context import CalibrationConfig
    from pocketlm.data import eval_windows
    from pocketlm.measure import ReferenceCache, evaluate_windows

    model, tok, _ = models.load(MODEL)
    win = eval_windows(tok, "wikitext2", LONG, windows)
    folder = Path(os.environ.get("POCKETLM_REF_CACHE", tempfile.gettempdir()))
    tag = "smollm2" if MODEL == "smollm2-135m" else MODEL
    cache = ReferenceCache.build(model, win, folder / f"pocketlm-ref-{tag}-wikitext2-{windows}x{LONG}.f32")
    before = kv.cache_bytes(model.config, LONG)
    rep, seconds = {"layers": [], f"kv_bytes_at_{LONG}": [before, before]}, 0.0
    if name != "swa-none":
        choose, _, seed = name.removeprefix("swa-").removesuffix("+recover").partition("-s")
        which = ({"layers": [int(choose.removeprefix("layer-"))]} if choose.startswith("layer-")
                 else {**SIZE, "choose": choose, "seed": int(seed or 0)})
        stage = {"method": "sliding-window", "window": 512, "context": LONG, **which}
        heal = [HEAL] if name.endswith("+recover") else []
        res = pocketlm.compress(model, {"name": name, "stages": [stage, *heal]}, tokenizer=tok,
                                calibration=CalibrationConfig(windows=calib_windows, seq_len=2048))
        model, rep, seconds = res.model, res.stages[0], res.seconds
        if heal:
            h = res.stages[1]
            rep = {**rep, "recover": {k: h[k] for k in ("tokens", "seconds_training", "loss_first", "loss_last")
                                      if k in h}}
    r = evaluate_windows(model, win, reference=cache, corpus="wikitext2")
    emit({"bench": BENCH, "config": name, "model": MODEL, "window": 512, "context": LONG,
          "sliding_layers": rep["layers"], "kv_bytes_at_8192": rep[f"kv_bytes_at_{LONG}"],
          "local_mass": rep.get("local_mass"), "cost": rep.get("cost"), "recover": rep.get("recover"),
          **eval_fields(r),
          "bucket_start": r.bucket_start, "bucket_ppl": r.bucket_ppl, "compress_s": round(seconds, 1)})


def one(name: str, windows: int, calib_windows: int) -> None:
    if name.startswith("swa-"):
        return swa(name, max(1, windows // 8), 4)
    import pocketlm
    from pocketlm import kv, models
    from pocketlm.context import CalibrationConfig
    from pocketlm.data import eval_windows
    from pocketlm.measure import ReferenceCache, perplexity

    model, tok, src = models.load("smollm2-135m")
    folder = Path(os.environ.get("POCKETLM_REF_CACHE", tempfile.gettempdir()))
    cache = ReferenceCache.build(model, eval_windows(tok, "wikitext2", 2048, windows),
                                 folder / f"pocketlm-ref-smollm2-wikitext2-{windows}x2048.f32")
    base_kv = kv.report(model.config)["kv_bytes_per_token_f16"]
    merge = name.split("-")[1].split("+")[0]
    stages = [{"method": "kv-heads", "kv_heads": 1, "merge": merge}]
    if name.endswith("gguf"):
        stages.append({"method": "imatrix", "format": "gguf-iq4_nl", "embed": "q8_0"})
    calib = CalibrationConfig(windows=calib_windows, seq_len=2048)
    res = pocketlm.compress(model, {"name": name, "stages": stages}, tokenizer=tok, calibration=calib)
    extra = {}
    if name.endswith("gguf"):
        from pocketlm.export import export_model
        from pocketlm.runtime.llamacpp import LlamaCppScorer

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "m.gguf"
            export_model(model, tok, res.context.quant, "gguf", path, "F16", "Q8_0", source_gguf=src.describe())
            extra = {"file_bytes": path.stat().st_size, "runtime": "llama.cpp"}
            r = perplexity(LlamaCppScorer(path, n_ctx=2048), tok, "wikitext2", 2048, windows, reference=cache)
    else:
        r = perplexity(model, tok, "wikitext2", 2048, windows, reference=cache)
    kvs = res.stages[0]
    emit({"bench": "kv", "config": name, "model": "smollm2-135m", "kv_heads": kvs["kv_heads"],
          "kv_bytes_per_token_f16": [base_kv, kvs["kv_bytes_per_token"]], "merge": merge,
          "key_error": kvs["key_error"], "value_error": kvs["value_error"], **extra, **eval_fields(r),
          "compress_s": round(res.seconds, 1)})


if __name__ == "__main__":
    calibrated_main(__file__, BENCH, list(CONFIGS), one, 16)
