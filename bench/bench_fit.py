"""``pocketlm fit`` on the default model, SmolLM2-135M, to a file budget, against every
llama.cpp and AutoRound file of no more bytes in bench/results/gguf.jsonl (same 16 WikiText-2
windows, same llama.cpp scoring).

    .venv/bin/python bench/bench_fit.py [--bytes 95MB] [--windows 16]
    .venv/bin/python bench/bench_fit.py --min-decode 120 [--layers 0]

One JSON line (bench/results/fit.jsonl): the chosen file and its KL, every candidate (measured or
skipped), the search's wall time against one APTQ compression plus its evaluation, and the other
tools' files it is compared with. With ``--min-decode``: the decode speed each candidate was
predicted, measured at in the search, and the chosen file's speed measured again in a fresh
process (``table.py fit --speed``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, _replace_line, emit  # noqa: E402

DIR = Path(os.environ.get("POCKETLM_BENCH_DIR", "/tmp/pocketlm-gguf"))


def main(nbytes: str, windows: int) -> None:
    from pocketlm import fit
    from pocketlm.recipe import parse_bytes

    limit = parse_bytes(nbytes)
    cache = Path(os.environ.get("POCKETLM_REF_CACHE", tempfile.gettempdir())) / \
        f"pocketlm-ref-smollm2-wikitext2-{windows}x2048.f32"
    res = fit.run("smollm2-135m", fit.Budget(bytes=limit), DIR / f"fit-{nbytes}", windows=windows,
                  overwrite=True, reference=cache)
    best = next(c for c in res["candidates"] if c["name"] == res["chosen"])
    one = next((c["measured"] for c in res["candidates"] if c["name"] == "aptq-gguf" and c["measured"]), None)
    others = [json.loads(x) for x in (RESULTS / "gguf.jsonl").read_text().splitlines() if x.strip()]
    others = [{"config": r["config"], "bytes": r["bytes"], "kl": r["kl"]} for r in others
              if r.get("source") in ("llama.cpp", "auto-round") and r.get("bytes", 1e18) <= limit]
    line = emit({"bench": "fit", "config": f"fit-bytes-{nbytes}", "model": "smollm2-135m", "budget_bytes": limit,
                 "windows": windows, "chosen": res["chosen"], "file_bytes": best["measured"]["file_bytes"],
                 "kl": best["measured"]["kl"], "ppl": best["measured"]["ppl"], "top1": best["measured"]["top1"],
                 "window_kl": best["measured"]["window_kl"], "meets": res["meets"], "seconds": res["seconds"],
                 "one_aptq_s": round(one["compress_s"] + one["eval_s"], 1) if one else None,
                 "candidates": [{k: c[k] for k in ("name", "skipped")} | {k: (c["measured"] or {}).get(k) for k in
                                ("file_bytes", "kl", "ppl", "layers", "compress_s", "eval_s")}
                                for c in res["candidates"]],
                 "others_within_budget": others, "beats_all_others": all(best["measured"]["kl"] < o["kl"]
                                                                          for o in others)})
    _replace_line(RESULTS / "fit.jsonl", json.loads(line)["config"], line)


def speed(min_decode: float, windows: int, layers: tuple[int, ...]) -> None:
    """``fit --min-decode``: does the file it returns meet the speed when measured again?"""
    from pocketlm import fit

    cache = Path(os.environ.get("POCKETLM_REF_CACHE", tempfile.gettempdir())) / \
        f"pocketlm-ref-smollm2-wikitext2-{windows}x2048.f32"
    res = fit.run("smollm2-135m", fit.Budget(min_decode=min_decode), DIR / f"fit-decode-{min_decode:g}",
                  windows=windows, layers=layers, overwrite=True, reference=cache)
    best = next(c for c in res["candidates"] if c["name"] == res["chosen"])
    again = res["chosen_measured_again"]
    line = emit({"bench": "fit", "config": f"fit-min-decode-{min_decode:g}", "model": "smollm2-135m",
                 "min_decode": min_decode, "windows": windows, "chosen": res["chosen"],
                 "file_bytes": best["measured"]["file_bytes"], "kl": best["measured"]["kl"],
                 "ppl": best["measured"]["ppl"], "window_kl": best["measured"]["window_kl"],
                 "decode_limit_bytes": res["limits"]["min_decode"], "probe": res["machine"]["probe"],
                 "decode_measured_again": again["tg_tok_s"], "rechecked": res["rechecked"], "meets": res["meets"],
                 "seconds": res["seconds"], "sizes": res["sizes"],
                 "candidates": [{"name": c["name"], "skipped": c["skipped"],
                                 "predicted_decode": c["predicted"].get("decode_tok_s")}
                                | {k: (c["measured"] or {}).get(k) for k in ("file_bytes", "kl", "ppl", "layers",
                                                                             "decode_tok_s")}
                                for c in res["candidates"]]})
    _replace_line(RESULTS / "fit.jsonl", json.loads(line)["config"], line)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--bytes", default="95MB")
    ap.add_argument("--min-decode", type=float, help="a speed budget (tokens/s) instead of --bytes")
    ap.add_argument("--layers", default="0,1", help="lowest-Block-Influence layer counts to try removing")
    ap.add_argument("--windows", type=int, default=16)
    a = ap.parse_args()
    if a.min_decode:
        speed(a.min_decode, a.windows, tuple(int(x) for x in a.layers.split(",")))
    else:
        main(a.bytes, a.windows)
