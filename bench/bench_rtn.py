"""Base perplexity of the default model (float32, bfloat16) and RTN w8, w4-g128, w3-g128.

    .venv/bin/python bench/bench_rtn.py [--windows 16]

One JSON line per result (also in bench/results/rtn.jsonl): WikiText-2 perplexity on the first
N windows of 2048 tokens, KL divergence and top-1 agreement against the float32 model, wall
time of the compression and of the evaluation, and peak RSS of the process.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, run_configs  # noqa: E402

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
    rec.update({"ppl": round(r.ppl, 4), "kl": None if r.kl is None else round(r.kl, 5),
                "top1": None if r.top1 is None else round(r.top1, 4), "windows": r.windows, "seq_len": r.seq_len,
                "tokens": r.tokens_scored, "dtype": r.dtype, "eval_s": round(r.seconds, 1)})
    emit(rec)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--ray", help="run the configurations as Ray tasks: auto or a cluster address")
    a = ap.parse_args()
    if a.one:
        one(a.one, a.windows)
    else:
        run_configs(__file__, "rtn", list(CONFIGS), ["--windows", str(a.windows)], a.ray)
