"""Peak memory of the layer-wise engine on the default model with the standard calibration
(128 windows x 2048 tokens), accumulating H = 2/N X X^T for every linear as GPTQ does.

    .venv/bin/python bench/bench_engine_memory.py [--windows 128] [--seq-len 2048] [--offload] [--modify]

Reports RSS after loading, peak RSS, the model's bytes and one layer's activation bytes
(windows x seq_len x hidden x 4), so the claim "peak < model + 2 layers of activations" can be
checked against the process's own baseline.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, hwm_mib, peak_rss_mib, reset_peak_rss, rss_mib  # noqa: E402


def hessian_stats(modify: bool):
    """The statistics GPTQ gathers (H for every linear), consumed layer by layer. With
    ``modify`` the engine treats the layer as changed (recomputes it in place, one buffer), as
    for GPTQ or pruning; the weights are left as they are so the run measures only the engine."""
    from pocketlm.stats import HessianProcessor

    class Stats(HessianProcessor):
        modifies_layer = modify

        def after(self, layer, outputs):
            self.release_layer()

    return Stats(lambda name: True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--modify", action="store_true", help="recompute each layer in place (one buffer)")
    a = ap.parse_args()
    from pocketlm import models
    from pocketlm.calibrate import run_layerwise
    from pocketlm.data import calibration_windows

    model, tok, _ = models.load("smollm2-135m")
    windows = calibration_windows(tok, a.windows, a.seq_len)
    gc.collect()
    base_rss, peak_before = rss_mib(), peak_rss_mib()
    reset_peak_rss()
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    act_mib = a.windows * a.seq_len * model.config.hidden_size * 4 / 2**20
    t = time.perf_counter()
    run_layerwise(model, windows, hessian_stats(a.modify), offload=a.offload)
    secs = time.perf_counter() - t
    emit({"bench": "engine_memory", "windows": a.windows, "seq_len": a.seq_len, "offload": a.offload,
          "modify": a.modify,
          "seconds": round(secs, 1), "tokens_per_s": round(a.windows * a.seq_len / secs, 1),
          "rss_after_load_mib": round(base_rss, 1), "peak_rss_before_engine_mib": round(peak_before, 1),
          "model_mib": round(model_mib, 1), "one_layer_activations_mib": round(act_mib, 1),
          "engine_peak_rss_mib": round(hwm_mib(), 1),
          "engine_peak_over_loaded_mib": round(hwm_mib() - base_rss, 1),
          "two_layers_activations_mib": round(2 * act_mib, 1)})


if __name__ == "__main__":
    main()
