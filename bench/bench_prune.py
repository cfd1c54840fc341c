"""Pruning on the default model: magnitude, Wanda and SparseGPT (50% unstructured and 2:4), each
followed by the LLM-Barber mask rebuild; ShortGPT layer removal (10% and 25% of the layers)
against removing as many random layers (3 seeds) or the last layers.

    .venv/bin/python bench/bench_prune.py [--calib-windows 16] [--windows 16] [--only a,b]

One JSON line per result (also in bench/results/prune.jsonl): WikiText-2 perplexity on the
first N windows of 2048 tokens, KL divergence and top-1 agreement against the float model, the
sparsity, bytes on disk of the saved result (sparse storage: bitmask + kept values), and wall
time. A pruner's configuration reports the pruned model and then, after the rebuild runs on it,
the rebuilt one (the "+barber" stage at its defaults: gradient from the first 14 calibration
windows; each block's swap tried at alpha x 4, 2, 1, 1/2, 1/4, the one with the lowest output MSE
on the last 2 windows kept only if it lowers that MSE and lowers the model's KL from the dense
model there by more than 2 standard errors). The float model's log-probabilities are computed once and kept in
a scratch file (POCKETLM_REF_CACHE, default /tmp) that every configuration compares against.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import calibrated_main, emit, eval_fields  # noqa: E402

PRUNERS = {f"{m}-{t}": (m, t) for t in ("50", "2of4") for m in ("magnitude", "wanda", "sparsegpt")}
LAYERS = {f"{how}-{p}{'' if how != 'random' else f'-s{s}'}": (how, p, s)
          for p in (10, 25) for how in ("shortgpt", "last", "random") for s in ((0, 1, 2) if how == "random" else (0,))}
CONFIGS = [*PRUNERS, *LAYERS]


def _target(t: str) -> dict:
    return {"sparsity": 0.5} if t == "50" else {"pattern": "2:4"}


def _measure(name, model, tok, res, cache, windows) -> None:
    import pocketlm

    with tempfile.TemporaryDirectory() as d:
        res.save(Path(d) / "out")
        on_disk = sum(f.stat().st_size for f in (Path(d) / "out").glob("*.safetensors"))
    r = pocketlm.perplexity(model, tok, "wikitext2", 2048, windows, reference=cache)
    size = res.context.size_report()
    emit({"bench": "prune", "config": name, "model": "smollm2-135m", "stages": res.stages,
          "sparsity": size["sparsity"], "layers": model.config.num_hidden_layers,
          "params": sum(p.numel() for p in model.parameters()), "bytes_on_disk": on_disk,
          **eval_fields(r), "compress_s": round(res.seconds, 1)})


def one(name: str, windows: int, calib_windows: int) -> None:
    import pocketlm
    from pocketlm import models
    from pocketlm.context import CalibrationConfig
    from pocketlm.data import eval_windows
    from pocketlm.measure import ReferenceCache

    model, tok, _ = models.load("smollm2-135m")
    folder = Path(os.environ.get("POCKETLM_REF_CACHE", tempfile.gettempdir()))
    cache = ReferenceCache.build(model, eval_windows(tok, "wikitext2", 2048, windows),
                                 folder / f"pocketlm-ref-smollm2-wikitext2-{windows}x2048.f32")
    calib = CalibrationConfig(windows=calib_windows, seq_len=2048)
    if name in PRUNERS:  # the pruned model is measured, then the rebuild runs on it and is measured
        method, t = PRUNERS[name]
        stages = [{"method": method, **_target(t)}, {"method": "barber"}]
        res = pocketlm.compress(model, {"name": name, "stages": stages}, tokenizer=tok, calibration=calib,
                                after_stage=lambda part: _measure(name, model, tok, part, cache, windows))
        _measure(f"{name}+barber", model, tok, res, cache, windows)
    else:
        how, pct, seed = LAYERS[name]
        stage = {"method": "remove-layers", "fraction": pct / 100,
                 "choose": {"shortgpt": "bi", "last": "last", "random": "random"}[how], "seed": seed}
        res = pocketlm.compress(model, {"name": name, "stages": [stage]}, tokenizer=tok, calibration=calib)
        _measure(name, model, tok, res, cache, windows)


if __name__ == "__main__":
    calibrated_main(__file__, "prune", list(CONFIGS), one, 16)
