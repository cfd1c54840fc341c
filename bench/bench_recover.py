"""Recovery by distillation on the default model, SmolLM2-135M: a compressed model fine-tuned
toward the float one on the Python-docs calibration text only, then scored on WikiText-2.

    .venv/bin/python bench/bench_recover.py [--tokens 300000] [--windows 16] [--only a,b]

``sweep-OPT-LR``: ShortGPT-25% healed with 40,960 tokens (40 steps of 2 windows of 512) by AdamW
and by AdaShift (n = 10: its first step after 11 gradients) at the same learning rates (the
loss curves: ``table.py recover --curves``).

Configurations: ``shortgpt-25`` (8 of 30 layers removed by Block Influence),
``wanda-2of4+barber`` (2:4 sparsity, Wanda then the LLM-Barber rebuild), ``gptq-w3-g128``
(3-bit, tuned on its own grid: scales only, codes fixed; ``-lr1e-3``, ``-lr5e-3``, ``-lr1e-2``: scales and norms
at that learning rate, instead of 1e-3 and 2e-4), ``gptq-w3-g128-rounding`` (the same,
the codes trained too through the straight-through rounding, scales at grid_lr 1e-4; run with a
higher --lr, e.g. 1e-3, so that codes can move), ``imatrix-iq4_nl`` (IQ4_NL, tuned
on its block scales, exported and scored in llama.cpp too), ``kv1-aligned`` (3 KV heads merged into
1 after alignment); each reports the compressed model (``NAME``, measured before recovery, in
the same run) and the recovered one (``NAME+recover``), and checks that the structure survived
training and a save and reload (pruned weights zero, N:M groups, layer and head counts, codes on
the grid); the compressed and the recovered model stay in POCKETLM_BENCH_DIR/recovered/NAME
(default /tmp/pocketlm-gguf) for zero-shot runs (``bench/bench_zeroshot.py``). ``memory-2GiB``
plans a LoRA recovery of the 2:4 model to 2 GiB and runs it, and runs the same micro-batch
without recomputation, each in its own process, reading the kernel's peak RSS.

One JSON line per result (also in bench/results/recover.jsonl): perplexity, KL and top-1 against
the float model (its log-probabilities cached in POCKETLM_REF_CACHE, default /tmp) on the first
N windows of 2048 tokens, training tokens, wall time, the loss curve, the plan and peak RSS.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, eval_fields, hwm_mib, reset_peak_rss, run_configs  # noqa: E402

COMPRESS = {
    "shortgpt-25": [{"method": "remove-layers", "fraction": 0.25}],
    "wanda-2of4+barber": [{"method": "wanda", "pattern": "2:4"}, {"method": "barber"}],
    "gptq-w3-g128": [{"method": "gptq", "bits": 3, "group_size": 128, "act_order": True, "damp": 0.1, "clip": True}],
    "imatrix-iq4_nl": [{"method": "imatrix", "format": "gguf-iq4_nl", "embed": "q8_0", "sequential": False,
                        "calib_dtype": "auto"}],
    "kv1-aligned": [{"method": "kv-heads", "kv_heads": 1, "merge": "aligned"}],
}
COMPRESS["gptq-w3-g128-rounding"] = COMPRESS["gptq-w3-g128"]  # healed with the rounding trained too
for _lr in ("1e-3", "5e-3", "1e-2"):  # scales and norms at one learning rate
    COMPRESS[f"gptq-w3-g128-lr{_lr}"] = COMPRESS["gptq-w3-g128"]
SAVED = Path(os.environ.get("POCKETLM_BENCH_DIR", "/tmp/pocketlm-gguf")) / "recovered"  # the healed models
MEMORY = ["memory-2GiB-planned", "memory-2GiB-unplanned"]
SWEEP_LR = ("3e-4", "1e-3", "3e-3")
SWEEP = [f"sweep-{opt}-{lr}" for opt in ("adamw", "adashift") for lr in SWEEP_LR]
SWEEP_TOKENS = 40_960
CONFIGS = [*COMPRESS, *MEMORY, *SWEEP]


def structure(model, ctx) -> dict:
    """What recovery must not change, read from the model itself."""
    import torch

    zeros_kept = all(bool((model.get_submodule(n).weight[~k] == 0).all()) for n, k in ctx.masks.items())
    nm = None
    if ctx.masks:
        k = next(iter(ctx.masks.values()))
        nm = int(k.reshape(k.shape[0], -1, 4).sum(-1).max()) if k.shape[1] % 4 == 0 else None
    on_grid = True
    for name, rec in ctx.quant.items():
        w = model.get_submodule(name).weight.detach().float()
        if hasattr(rec, "to_quantized"):  # a pocketlm grid: the codes rebuilt from the weight
            on_grid &= bool(torch.equal(rec.to_quantized(w).dequantize(), w))
        else:  # a GGML block type: the weight is exactly what its packed bytes (the file's) dequantize to
            on_grid &= bool(torch.equal(rec.weight.dequantize(), w))
    cfg = model.config
    return {"layers": cfg.num_hidden_layers, "kv_heads": cfg.num_key_value_heads, "pruned_weights_zero": zeros_kept,
            "max_kept_per_4": nm, "codes_on_grid": on_grid,
            "sparsity": ctx.size_report()["sparsity"]}


def measure(name: str, model, tok, res, cache, windows: int, extra: dict | None = None) -> None:
    import pocketlm
    from pocketlm import models

    rep = structure(model, res.context)
    if name not in SWEEP:  # kept for zero-shot runs, compressed and healed alike
        d = SAVED / name
        res.save(d, overwrite=True)
        rep["saved"] = str(d)
    if name.endswith("+recover"):  # the structure after a save and a reload, too
        back, _, _ = models.load(str(d))
        ctx = res.context
        rep["reloaded_equal"] = all(bool((back.get_submodule(n).weight == model.get_submodule(n).weight).all())
                                    for n in [*ctx.masks, *ctx.quant][:50])
        rep["reloaded_layers"] = back.config.num_hidden_layers
        del back
    r = pocketlm.perplexity(model, tok, "wikitext2", 2048, windows, reference=cache)
    if name.startswith("imatrix"):  # the deployed file: exported, scored by llama.cpp
        from pocketlm.export import export_model
        from pocketlm.runtime.llamacpp import LlamaCppScorer

        src = models.resolve("smollm2-135m").describe()
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "m.gguf"
            export_model(model, tok, res.context.quant, "gguf", path, "F16", "Q8_0", source_gguf=src)
            g = pocketlm.perplexity(LlamaCppScorer(path, n_ctx=2048), tok, "wikitext2", 2048, windows, reference=cache)
            rep.update({"file_bytes": path.stat().st_size, "gguf_ppl": round(g.ppl, 4), "gguf_kl": round(g.kl, 5),
                        "gguf_top1": round(g.top1, 4), "gguf_window_kl": [round(x, 5) for x in g.window_kl]})
    stages = [{k: v for k, v in s.items() if k not in ("curve", "block_influence")} for s in res.stages]
    curve = next((s["curve"] for s in res.stages if "curve" in s), None)
    emit({"bench": "recover", "config": name, "model": "smollm2-135m", "stages": stages, **rep, **eval_fields(r),
          "compress_s": round(res.seconds, 1), "curve": curve, **(extra or {})})


def one(name: str, windows: int, tokens: int, optimizer: str, lr: float | None) -> None:
    import pocketlm
    from pocketlm import models
    from pocketlm.context import CalibrationConfig
    from pocketlm.data import eval_windows
    from pocketlm.measure import ReferenceCache
    from pocketlm.recover.stage import DEFAULT_LR

    model, tok, _ = models.load("smollm2-135m")
    if name in MEMORY:
        return memory_run(name, model, tok)
    if name in SWEEP:  # ShortGPT-25%, healed with each optimizer at each learning rate
        _, optimizer, lr = name.split("-", 2)
        tokens, lr = SWEEP_TOKENS, float(lr)
    folder = Path(os.environ.get("POCKETLM_REF_CACHE", tempfile.gettempdir()))
    cache = ReferenceCache.build(model, eval_windows(tok, "wikitext2", 2048, windows),
                                 folder / f"pocketlm-ref-smollm2-wikitext2-{windows}x2048.f32")
    grid_lr = {}
    if "-lr" in name and name not in SWEEP:
        lr = float(name.rsplit("-lr", 1)[1])
        grid_lr = {"grid_lr": lr}
    recover = {"method": "recover", "tokens": tokens, "optimizer": optimizer, **({"lr": lr} if lr else {}), **grid_lr,
               **({"windows_per_step": 2} if name in SWEEP else {}),
               **({"rounding": True, "grid_lr": 1e-4} if name.endswith("-rounding") else {})}
    stages = [*COMPRESS["shortgpt-25" if name in SWEEP else name], recover]
    calib = CalibrationConfig(windows=16, seq_len=2048)
    last = len(stages) - 2

    def before(part):
        if len(part.stages) == last + 1 and name not in SWEEP:
            measure(name, part.model, tok, part, cache, windows)
    res = pocketlm.compress(model, {"name": f"{name}+recover", "stages": stages}, tokenizer=tok, calibration=calib,
                            after_stage=before)
    measure(name if name in SWEEP else f"{name}+recover", res.model, tok, res, cache, windows,
            {"optimizer": optimizer, "lr": lr or DEFAULT_LR[res.recipe.stages[-1].mode],
             "grid_lr": res.recipe.stages[-1].grid_lr})


def memory_run(name: str, model, tok) -> None:
    """LoRA recovery of a 2:4 (magnitude) model: planned to 2 GiB, or the plan's micro-batch
    with nothing recomputed (the stage's recompute: false)."""
    import pocketlm

    planned = name.endswith("-planned")
    rec = {"method": "recover", "tokens": 4 * 8 * 1024, "seq_len": 1024, "windows_per_step": 8, "mode": "lora",
           "memory": "2GiB", "teacher_dtype": "bfloat16", "recompute": planned}
    reset_peak_rss()
    res = pocketlm.compress(model, {"name": name, "stages": [{"method": "magnitude", "pattern": "2:4"}, rec]},
                            tokenizer=tok)
    s = res.stages[-1]
    emit({"bench": "recover", "config": name, "model": "smollm2-135m", "budget_mib": 2048,
          "plan": s["plan"], "predicted_peak_mib": round(s["plan"]["predicted_peak_bytes"] / 2**20, 1),
          "measured_peak_mib": round(s["peak_rss_bytes"] / 2**20, 1), "process_peak_mib": round(hwm_mib(), 1),
          "recompute_applied": planned, "tokens": s["tokens"], "seconds_training": s["seconds_training"],
          "loss_first": s["loss_first"], "loss_last": s["loss_last"]})


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--only", help="comma-separated subset of configurations")
    ap.add_argument("--windows", type=int, default=16, help="WikiText-2 windows of 2048 tokens")
    ap.add_argument("--tokens", type=int, default=300_000, help="training tokens")
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--ray", help="run the configurations as Ray tasks: auto or a cluster address")
    a = ap.parse_args()
    if a.one:
        one(a.one, a.windows, a.tokens, a.optimizer, a.lr)
    else:
        names = a.only.split(",") if a.only else list(CONFIGS)
        extra = ["--windows", str(a.windows), "--tokens", str(a.tokens), "--optimizer", a.optimizer]
        run_configs(__file__, "recover", names, extra + (["--lr", str(a.lr)] if a.lr else []), a.ray)
