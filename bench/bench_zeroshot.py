"""HellaSwag zero-shot accuracy (acc, acc_norm and their standard errors, lm-eval's rule) of the
default model, SmolLM2-135M, in PyTorch and in llama.cpp, and of compressed and recovered models.

    .venv/bin/python bench/bench_zeroshot.py [--limit 2000] [--only a,b]

Configurations: ``float-torch`` (the float model in PyTorch), ``float-f16-gguf`` (the same
weights as an F16 GGUF in llama.cpp), ``gguf:FILE`` (a GGUF file in the bench folder, e.g.
``gguf:llama.cpp-Q4_0.gguf``), ``torch:FILE`` (that file's weights, dequantized, in PyTorch: one
quantized model in the two runtimes) and ``dir:NAME`` (a saved pocketlm result, e.g. the healed
models ``bench/bench_recover.py`` keeps in POCKETLM_BENCH_DIR/recovered/, in PyTorch). PyTorch
computes in bfloat16 where this CPU multiplies it fast, else in float32 (the row's runtime says
which). Each line keeps the per-task acc_norm outcomes, so two rows compare task by task
(``bench/table.py zeroshot``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, run_configs  # noqa: E402

DIR = Path(os.environ.get("POCKETLM_BENCH_DIR", "/tmp/pocketlm-gguf"))
CONFIGS = ["float-torch", "float-f16-gguf"]


def one(name: str, limit: int) -> None:
    import torch

    from pocketlm import hardware, models, zeroshot

    tasks = zeroshot.load_tasks("hellaswag", limit)
    dtype = hardware.compute_dtype("auto") or torch.float32  # bfloat16 only where this CPU is fast at it
    if name.startswith(("dir:", "torch:")):
        where = DIR / "recovered" / name[4:] if name.startswith("dir:") else DIR / name.removeprefix("torch:")
        model, tok, _ = models.load(str(where))
        scorer = zeroshot.TorchChoices(model.to(dtype))
        runtime = f"pytorch {str(dtype)[6:]}" + (f" {where.name}" if name.startswith("torch:") else "")
    elif name == "float-torch":
        model, tok, _ = models.load("smollm2-135m")
        scorer = zeroshot.TorchChoices(model.to(dtype))
        runtime = f"pytorch {str(dtype)[6:]}"
    else:
        from pocketlm.export import export_model

        src = models.resolve("smollm2-135m")
        tok = models.load_tokenizer(src)  # the model itself only when the F16 file must be written
        path = DIR / ("pocketlm-f16.gguf" if name == "float-f16-gguf" else name.removeprefix("gguf:"))
        if name == "float-f16-gguf" and not path.is_file():
            model, tok, _ = models.load("smollm2-135m")
            export_model(model, tok, {}, "gguf", path, "F16", "F16", source_gguf=src.describe())
        scorer = zeroshot.LlamaCppChoices(path, threads=torch.get_num_threads(), n_ctx=512)
        runtime = f"llama.cpp {path.name}"
    r = zeroshot.evaluate(scorer, tok, tasks)
    emit({"bench": "zeroshot", "config": name, "model": "smollm2-135m", "task": r.task, "tasks": r.tasks,
          "runtime": runtime, "acc": round(r.acc, 4), "acc_stderr": round(r.acc_stderr, 4),
          "acc_norm": round(r.acc_norm, 4), "acc_norm_stderr": round(r.acc_norm_stderr, 4),
          "seconds": round(r.seconds, 1), "rule": r.rule, "correct_norm": r.correct_norm})


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--one")
    ap.add_argument("--only", help="comma-separated configurations")
    ap.add_argument("--limit", type=int, default=2000, help="the first N HellaSwag validation tasks")
    ap.add_argument("--ray", help="run the configurations as Ray tasks: auto or a cluster address")
    a = ap.parse_args()
    if a.one:
        one(a.one, a.limit)
    else:
        run_configs(__file__, "zeroshot", a.only.split(",") if a.only else CONFIGS, ["--limit", str(a.limit)], a.ray)
