"""Print a benchmark's results (bench/results/NAME.jsonl) as the Markdown table the README quotes.

    python bench/table.py prune
"""
from __future__ import annotations

import json
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


if __name__ == "__main__":
    main(sys.argv[1])
