"""The RoPE-base bound (Xu, Men et al., NeurIPS 2024) for the paper's reference rows and for real
model configurations: the context each base supports and the base each context needs.

    .venv/bin/python bench/bench_rope.py

``paper-d128-L``: the smallest base (two significant digits) that supports L tokens at head
dim 128, beside the paper's table (4k: 2.7e4, 32k: 6.4e5, 128k: 7.8e6, 1M: 5.1e8). Model rows:
SmolLM2-135M and Gemma-3-270M (its GGUF config; global and sliding-window bases), and a
Llama-3-8B-style configuration (head dim 128, base 5e5, trained on 8192 tokens; no rope scaling).
Pure arithmetic: no model weights are loaded.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, _replace_line, emit  # noqa: E402

PAPER = {4096: 2.7e4, 32768: 6.4e5, 131072: 7.8e6, 1048576: 5.1e8}  # head dim 128
TARGETS = [4096, 8192, 32768, 131072]
LLAMA3 = {"head_dim": 128, "rope_theta": 5e5, "trained_context": 8192}


def main() -> None:
    from pocketlm import models, rope

    lines = []
    for length, paper in PAPER.items():
        lines.append(emit({"bench": "rope", "config": f"paper-d128-{length}", "head_dim": 128, "length": length,
                           "required_base": rope.required_base(length, 128), "paper_base": paper}))
    configs = {}
    for name in ("smollm2-135m", "gemma3-270m"):
        try:
            configs[name] = rope.report(models.load_config(name))
        except Exception as e:  # noqa: BLE001 - a model whose package is not installed: say so
            print(f"{name}: skipped ({e})", file=sys.stderr)
    configs["llama3-8b-style"] = {**LLAMA3, "supported_context": rope.supported_length(LLAMA3["rope_theta"], 128)}
    for name, rep in configs.items():
        need = {str(t): rope.required_base(t, rep["head_dim"]) for t in TARGETS}
        lines.append(emit({"bench": "rope", "config": name, **rep, "required_base": need}))
    for line in lines:
        _replace_line(RESULTS / "rope.jsonl", json.loads(line)["config"], line)


if __name__ == "__main__":
    main()
