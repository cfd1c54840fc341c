"""APTQ's compression time against the floor: one float forward pass of the same windows.

    .venv/bin/python bench/bench_aptq_time.py [--windows 128] [--seq-len 2048] [--bpw 3.5]

Draws the calibration windows once, times a plain forward pass of every window through the
float model (logits included), then times ``compress`` with the ``aptq`` preset at the given
budget on the very same windows, in the same process. One JSON line (bench/results/aptq_time.jsonl),
which replaces an earlier run of the same budget and windows.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, _replace_line, emit  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--bpw", type=float, default=3.5)
    a = ap.parse_args()
    import pocketlm
    from pocketlm import models
    from pocketlm.data import calibration_windows
    from pocketlm.recipe import preset, with_budget

    model, tok, _ = models.load("smollm2-135m")
    windows = calibration_windows(tok, a.windows, a.seq_len)
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(a.windows):
            model(windows[i : i + 1], use_cache=False)
    forward_s = time.perf_counter() - t
    recipe = with_budget(preset("aptq"), bpw=a.bpw)
    t = time.perf_counter()
    res = pocketlm.compress(model, recipe, tokenizer=tok, calibration=windows)
    compress_s = time.perf_counter() - t
    st = res.stages[0]
    rec = emit({"bench": "aptq_time", "config": f"aptq-{a.bpw}-{a.windows}x{a.seq_len}",
                "model": "smollm2-135m", "bpw_budget": a.bpw,
                "bpw_quantized": res.context.size_report()["bpw_quantized"], "windows": a.windows,
                "seq_len": a.seq_len, "dtype": "float32", "float_forward_s": round(forward_s, 1),
                "compress_s": round(compress_s, 1), "ratio": round(compress_s / forward_s, 3),
                "plan": st.get("plan_histogram")})
    RESULTS.mkdir(exist_ok=True)
    _replace_line(RESULTS / "aptq_time.jsonl", json.loads(rec)["config"], rec)


if __name__ == "__main__":
    main()
