"""Print a benchmark's results (bench/results/NAME.jsonl) as the Markdown table the README quotes,
or compare two of its configurations window by window.

    python bench/table.py prune
    python bench/table.py gptq --paired A B    # B minus A: mean per-window NLL and KL, with standard errors
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = {
    "prune": [("config", "config"), ("sparsity", "sparsity"), ("layers", "layers"), ("ppl", "perplexity"),
              ("kl", "KL"), ("top1", "top-1"), ("bytes_on_disk", "MiB on disk"), ("compress_s", "compress s")],
    "gptq": [("config", "config"), ("bpw_quantized", "bpw"), ("ppl", "perplexity"), ("kl", "KL"), ("top1", "top-1"),
             ("compress_s", "compress s"), ("peak_rss_mib", "peak RSS MiB")],
    "ondevice": [("config", "config"), ("bpw", "bpw"), ("bytes", "MiB"), ("ppl", "perplexity"), ("kl", "KL"),
                 ("top1", "top-1"), ("pp_tok_s", "prefill tok/s"), ("tg_tok_s", "decode tok/s"),
                 ("run_peak_rss_mib", "run peak RSS MiB"), ("token_embd", "token_embd")],
}


def cell(key: str, v) -> str:
    if v is None:
        return "–"
    if key in ("bytes_on_disk", "bytes"):
        return f"{v / 2**20:.1f}"
    if isinstance(v, float):
        return f"{v:.4g}" if key != "ppl" else f"{v:.3f}"
    return str(v)


def main(name: str) -> None:
    cols = COLUMNS[name]
    rows = [json.loads(line) for line in (RESULTS / f"{name}.jsonl").read_text().splitlines() if line.strip()]
    print("| " + " | ".join(h for _, h in cols) + " |")
    print("| " + " | ".join("---" for _ in cols) + " |")
    for r in rows:
        print("| " + " | ".join(cell(k, r.get(k)) for k, _ in cols) + " |")


def paired(name: str, a: str, b: str) -> None:
    """Difference B - A over the same evaluation windows: the mean of the per-window differences
    and its standard error (sd / sqrt(n)), for the token NLL (log of the perplexity ratio) and
    the KL. Windows, not tokens, are the samples: tokens within a window are correlated."""
    lines = (RESULTS / f"{name}.jsonl").read_text().splitlines()
    rows = {r["config"]: r for r in (json.loads(line) for line in lines if line.strip())}
    for c in (a, b):
        if c not in rows:
            raise SystemExit(f"no configuration {c!r} in {name}.jsonl; run it with bench_{name}.py --only {c}")
    for key in ("window_nll", "window_kl"):
        x, y = rows[a].get(key), rows[b].get(key)
        if not x or not y or len(x) != len(y):
            raise SystemExit(f"{key}: both configurations need per-window values over the same windows (rerun them)")
        d = [v - u for u, v in zip(x, y)]
        n = len(d)
        mean = sum(d) / n
        se = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1) / n)
        print(json.dumps({"paired": key, "a": a, "b": b, "windows": n, "mean_diff": round(mean, 5),
                          "se": round(se, 5), "t": round(mean / se, 2) if se else None,
                          "b_below_a_in_windows": sum(v < 0 for v in d)}))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[2] == "--paired":
        paired(sys.argv[1], sys.argv[3], sys.argv[4])
    else:
        main(sys.argv[1])
