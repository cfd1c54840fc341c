"""Base perplexity of the default model (float32; ``bfloat16`` on request: on a CPU without
bfloat16 units it runs many times slower) and RTN w8, w4-g128, w3-g128.

    .venv/bin/python bench/bench_rtn.py [--windows 16]

One JSON line per result (also in bench/results/rtn.jsonl): WikiText-2 perplexity on the first
N windows of 2048 tokens (each window's mean NLL, and KL with a reference), KL divergence and
top-1 agreement against the float32 model, wall time of the compression and of the evaluation,
and peak RSS of the process.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, eval_fields, run_configs  # noqa: E402

CONFIGS = {
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "rtn-w8": ("float32", "rtn-w8"),
    "rtn-w4-g128": ("float32", "rtn-w4-g128"),
    "rtn-w3-g128": ("float32", {"name": "rtn-w3-g128", "stages": [{"method": "rtn", "bits": 3, "group_size": 128}]}),
}


def one(name: str, windows: int) -> None:
    import pocketlm
    from pocketlm import models

    dtype, recipe = CONFIGS[name]
    t0 = time.perf_counter()
    model, tok, _ = models.load("smollm2-135m", dtype=dtype)
    load_s = time.perf_counter() - t0
    rec = {"bench": "rtn", "config": name, "model": "smollm2-135m", "load_s": round(load_s, 1)}
    ref = None
    if recipe is not None:
        t = time.perf_counter()
        res = pocketlm.compress(model, recipe, tokenizer=tok)
        rec["compress_s"] = round(time.perf_counter() - t, 2)
        rec["bpw_quantized"] = res.context.size_report()["bpw_quantized"]
        ref, _, _ = models.load("smollm2-135m")
    r = pocketlm.perplexity(model, tok, "wikitext2", 2048, windows, reference=ref)
    if ref is not None:
        rec.update(eval_fields(r))
    else:
        rec.update({"ppl": round(r.ppl, 4), "kl": None, "top1": None, "windows": r.windows, "seq_len": r.seq_len,
                    "tokens": r.tokens_scored, "dtype": r.dtype, "window_nll": [round(x, 5) for x in r.window_nll]})
    emit({**rec, "eval_s": round(r.seconds, 1)})


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--only", help="comma-separated subset of configurations (default: all but bfloat16)")
    ap.add_argument("--ray", help="run the configurations as Ray tasks: auto or a cluster address")
    a = ap.parse_args()
    if a.one:
        one(a.one, a.windows)
    else:
        names = a.only.split(",") if a.only else [c for c in CONFIGS if c != "bfloat16"]
        run_configs(__file__, "rtn", names, ["--windows", str(a.windows)], a.ray)
