"""Choose between quantizer settings without touching the evaluation text: KL from the float
model on held-out windows of the calibration text (Python docs windows that overlap none of the
calibration windows), in PyTorch with the compressed model's weights (what its GGUF file stores).

    .venv/bin/python bench/bench_heldout.py --only NAME,...    # one JSON line each, bench/results/heldout.jsonl

A configuration is a recipe stage (the CONFIGS table); calibration: the first N windows of the
calibration text (seed 0), as bench_gguf.py uses.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import calibrated_main, emit, eval_fields  # noqa: E402

CONFIGS = {
    "imatrix-IQ4_NL": {"method": "imatrix", "format": "gguf-iq4_nl", "embed": "q8_0"},
    "imatrix-1pass-IQ4_NL": {"method": "imatrix", "format": "gguf-iq4_nl", "embed": "q8_0", "sequential": False},
    "gptq-IQ4_NL": {"method": "gptq", "format": "gguf-iq4_nl", "embed": "q8_0"},
    "gptq-damp0.1-IQ4_NL": {"method": "gptq", "format": "gguf-iq4_nl", "embed": "q8_0", "damp": 0.1},
    "gptq-noact-IQ4_NL": {"method": "gptq", "format": "gguf-iq4_nl", "embed": "q8_0", "act_order": False},
    "imatrix-Q4_0": {"method": "imatrix", "format": "gguf-q4_0", "embed": "q8_0"},
    "gptq-damp0.1-Q4_0": {"method": "gptq", "format": "gguf-q4_0", "embed": "q8_0", "damp": 0.1},
}
HELD_OUT = 4


def held_out_windows(tok, n_calib: int, seq_len: int = 2048):
    """HELD_OUT windows of the calibration text that share no token with the calibration windows."""
    import torch

    from pocketlm.data import DEFAULT_CALIBRATION, load_text, tokenize

    ids = tokenize(tok, load_text(DEFAULT_CALIBRATION))
    g = torch.Generator().manual_seed(0)
    used = torch.randint(0, ids.numel() - seq_len + 1, (n_calib,), generator=g).tolist()  # calibration_windows'
    g = torch.Generator().manual_seed(12345)
    picked = []
    while len(picked) < HELD_OUT:
        s = int(torch.randint(0, ids.numel() - seq_len + 1, (1,), generator=g))
        if all(abs(s - u) >= seq_len for u in used + picked):
            picked.append(s)
    return torch.stack([ids[s : s + seq_len] for s in picked])


def one(name: str, windows: int, n_calib: int) -> None:
    import torch

    import pocketlm
    from pocketlm import models
    from pocketlm.data import calibration_windows
    from pocketlm.measure import evaluate_windows

    torch.set_num_threads(2)
    stage = CONFIGS[name]
    model, tok, _ = models.load("smollm2-135m")
    ref, _, _ = models.load("smollm2-135m")
    held = held_out_windows(tok, n_calib)
    t = time.perf_counter()
    pocketlm.compress(model, {"name": name, "stages": [stage]}, tokenizer=tok,
                      calibration=calibration_windows(tok, n_calib, 2048))
    secs = time.perf_counter() - t
    r = evaluate_windows(model, held, reference=ref, corpus="python-docs held out", chunk=512)
    emit({"bench": "heldout", "config": name, "stage": stage, "calib_windows": n_calib, "compress_s": round(secs, 1),
          **eval_fields(r)})


if __name__ == "__main__":
    calibrated_main(__file__, "heldout", list(CONFIGS), one, 16)
