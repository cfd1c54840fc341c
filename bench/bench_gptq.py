"""GPTQ and APTQ against RTN on the default model.

    .venv/bin/python bench/bench_gptq.py [--calib-windows 32] [--windows 16] [--only a,b]

One JSON line per configuration (also in bench/results/gptq.jsonl): effective bpw of the
quantized linears, WikiText-2 perplexity on the first N windows of 2048 tokens, KL divergence
and top-1 agreement against the float model, compression wall time and peak RSS.
Calibration: random windows of 2048 tokens from the bundled Python-docs text (seed 0).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import calibrated_main, emit, eval_fields  # noqa: E402

DAMP = 0.1


def gptq(bits, group, **extra):
    return {"stages": [{"method": "gptq", "bits": bits, "group_size": group, "act_order": True, "damp": DAMP,
                        **extra}]}


def aptq(bpw, sensitivity="attention", groups=(128, 32), **extra):
    return {"stages": [{"method": "aptq", "bpw": bpw, "sensitivity": sensitivity, "damp": DAMP,
                        "group_sizes": list(groups), **extra}]}


CONFIGS = {
    "rtn-w4-g128": {"stages": [{"method": "rtn", "bits": 4, "group_size": 128}]},
    "rtn-w3-g128": {"stages": [{"method": "rtn", "bits": 3, "group_size": 128}]},
    "gptq-w4-g128": gptq(4, 128),
    "gptq-w3-g128": gptq(3, 128),
    "gptq-w3-g128-clip": gptq(3, 128, clip=True),
    "gptq-w3-row-clip": gptq(3, -1, clip=True),
    "gptq-w3-g32": gptq(3, 32),
    "gptq-w4-g32": gptq(4, 32),
    "aptq-3.0": aptq(3.0),
    "aptq-3.5": aptq(3.5),
    "aptq-3.5-trace": aptq(3.5, "trace"),
    "aptq-4.0": aptq(4.0),
    "aptq-4.5": aptq(4.5),
    "aptq-3.0-clip": aptq(3.0, clip=True),
    "aptq-3.0-clip-allgroups": aptq(3.0, groups=(-1, 128, 64, 32), clip=True),
    "aptq-3.0-clip-allgroups-kl": aptq(3.0, groups=(-1, 128, 64, 32), clip=True, target="kl"),
    "aptq-3.0-clip-allgroups-g16": aptq(3.0, groups=(-1, 128, 64, 32), clip=True, grad_windows=16),
    "aptq-3.0-clip-allgroups-kl-g16": aptq(3.0, groups=(-1, 128, 64, 32), clip=True, target="kl", grad_windows=16),
    # the bpw of GPTQ w3-g128 on this model (3.160807): mixed against uniform at equal size
    "aptq-3.16-clip-allgroups-g16": aptq(3.16, groups=(-1, 128, 64, 32), clip=True, grad_windows=16),
    "aptq-3.5-clip": aptq(3.5, clip=True),
    "aptq-4.0-clip": aptq(4.0, clip=True),
    "aptq-4.5-clip": aptq(4.5, clip=True),
}


def one(name: str, windows: int, calib_windows: int) -> None:
    import pocketlm
    from pocketlm import models
    from pocketlm.context import CalibrationConfig

    model, tok, _ = models.load("smollm2-135m")
    t = time.perf_counter()
    res = pocketlm.compress(model, CONFIGS[name], tokenizer=tok,
                            calibration=CalibrationConfig(windows=calib_windows, seq_len=2048))
    compress_s = time.perf_counter() - t
    ref, _, _ = models.load("smollm2-135m")
    r = pocketlm.perplexity(model, tok, "wikitext2", 2048, windows, reference=ref)
    st = res.stages[0]
    emit({"bench": "gptq", "config": name, "model": "smollm2-135m", "recipe": CONFIGS[name],
          "calib_windows": calib_windows if res.recipe.needs_calibration else 0, "calib_len": 2048,
          "bpw_quantized": res.context.size_report()["bpw_quantized"], **eval_fields(r),
          "compress_s": round(compress_s, 1), "plan": st.get("plan_histogram")})


if __name__ == "__main__":
    calibrated_main(__file__, "gptq", list(CONFIGS), one, 32)
