"""Print a benchmark's results (bench/results/NAME.jsonl) as the Markdown table the README quotes,
or compare two of its configurations window by window.

    python bench/table.py prune
    python bench/table.py gptq --paired A B    # B minus A: mean per-window NLL and KL, with standard errors
    python bench/table.py gguf --versus [A,B]  # each llama.cpp/AutoRound file (or those named) against
                                               # pocketlm's best file of no more bytes
    python bench/table.py gguf --plot          # bench/results/gguf.png: KL and perplexity against file size
    python bench/table.py gguf --timing        # llama.cpp's imatrix path and pocketlm's, wall-clock
    python bench/table.py gguf-gemma3-270m --versus   # the same on another model's results
    python bench/table.py kv [--swa]           # fewer KV heads; --swa: sliding-window layers (kv-MODEL --swa)
    python bench/table.py recover [--memory|--sweep|--curves]   # recovery: healed models; planned
                                               # memory; AdamW vs AdaShift; loss curves (PNG)
    python bench/table.py recover --gguf       # models on a GGUF grid: PyTorch against their exported file
    python bench/table.py gptq --rows A,B,...  # only these configurations, in this order
    python bench/table.py prune --rebuild      # each pruner against its LLM-Barber rebuild, paired over windows
    python bench/table.py prune --layers       # ShortGPT's layers against random and last layers
    python bench/table.py fit                  # pocketlm fit against the other tools' files within its budget
    python bench/table.py fit --speed          # pocketlm fit to a decode speed, measured again
    python bench/table.py rope                 # the RoPE-base bound: the paper's rows, then each model's
    python bench/table.py zeroshot             # HellaSwag acc / acc_norm, paired against the float model
    python bench/table.py zeroshot --recover   # healed models (dir:NAME+recover) against their compressed ones
    python bench/table.py engine_memory        # the layer-wise engine's memory
    python bench/table.py stream               # a model larger than its memory cap, streamed vs in memory
    python bench/table.py --update-docs        # regenerate the <!-- table: ARGS --> blocks of README and docs/
    python bench/table.py --check              # exit 1 if a block of README or docs/ differs from its table
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = {
    "rtn": [("config", "config"), ("bpw_quantized", "bpw (quantized linears)"), ("ppl", "perplexity"), ("kl", "KL"),
            ("top1", "top-1"), ("compress_s", "compress s"), ("eval_s", "eval s"), ("peak_rss_mib", "peak RSS MiB")],
    "prune": [("config", "config"), ("sparsity", "sparsity"), ("layers", "layers"), ("ppl", "perplexity"),
              ("kl", "KL"), ("top1", "top-1"), ("bytes_on_disk", "MiB on disk"), ("compress_s", "compress s")],
    "gptq": [("config", "config"), ("bpw_quantized", "bpw"), ("ppl", "perplexity"), ("kl", "KL"), ("top1", "top-1"),
             ("compress_s", "compress s"), ("peak_rss_mib", "peak RSS MiB")],
    "gguf": [("config", "config"), ("bytes", "MiB"), ("file_bpw", "file bpw"), ("ppl", "perplexity"), ("kl", "KL"),
             ("top1", "top-1"), ("token_embd", "token_embd"), ("compress_s", "compress s")],
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


def main(name: str, only: list[str] | None = None) -> None:
    norm = lambda x: x.replace("-", "_")  # noqa: E731
    rows = [r for r in _rows(name) if norm(r.get("bench", name)) == norm(name)]
    if only is not None:
        by = {r.get("config"): r for r in rows}
        missing = [c for c in only if c not in by]
        if missing:
            raise SystemExit(f"no configuration {', '.join(missing)} in {name}.jsonl")
        rows = [by[c] for c in only]
    if name == "engine_memory":
        return engine_memory(rows)
    if name.endswith("_llama_bench"):
        return speed(rows)
    if name == "kv":
        return kv_tables(rows)
    if name == "recover":
        return recover_table(rows)
    if name == "zeroshot":
        return zeroshot_table(rows)
    if name == "rope":
        return rope_table(rows)
    if name == "fit":
        return fit_table(rows)
    if name == "stream":
        return stream_table(rows)
    cols = COLUMNS.get(name) or COLUMNS[name.split("-", 1)[0]]
    print("| " + " | ".join(h for _, h in cols) + " |")
    print("| " + " | ".join("---" for _ in cols) + " |")
    for r in rows:
        print("| " + " | ".join(cell(k, r.get(k)) for k, _ in cols) + " |")


def engine_memory(rows: list[dict]) -> None:
    """The layer-wise engine's memory: what is resident, what the engine adds."""
    r = rows[-1]
    act = r["one_layer_activations_mib"]
    print("| measure | MiB |")
    print("| --- | --- |")
    print(f"| model weights (float32) | {r['model_mib']} |")
    print(f"| one layer's activations ({r['windows']} x {r['seq_len']} tokens x hidden x 4 bytes) | {act} |")
    print(f"| process RSS after loading the model | {r['rss_after_load_mib']} |")
    print(f"| peak RSS during the engine | {r['engine_peak_rss_mib']} |")
    over = r["engine_peak_over_loaded_mib"]
    print(f"| engine's own peak above the loaded process | {over} (= 2 x {act} activation buffers + "
          f"{over - 2 * act:.1f} working memory) |")
    print(f"\n{r['tokens_per_s']} tokens/s through the decoder layers ({r['seconds']} s, {r['threads']} threads).")


def prune_rebuild(rows: list[dict]) -> None:
    """Each pruner's masks against the same masks after the LLM-Barber rebuild (its ``+barber``
    row, same process): the paired per-window difference of the token NLL."""
    by = {r["config"]: r for r in rows}
    print("| pruner | perplexity | after rebuild | KL | after rebuild | paired NLL difference +- SE | windows lower |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in by.items():
        b = by.get(name + "+barber")
        if b is None or not r.get("window_nll") or not b.get("window_nll"):
            continue
        d, se = _diff(r["window_nll"], b["window_nll"])
        lower = sum(v < u for u, v in zip(r["window_nll"], b["window_nll"]))
        print(f"| {name} | {r['ppl']:.3f} | {b['ppl']:.3f} | {r['kl']:.4g} | {b['kl']:.4g} | {d:+.4f} +- {se:.4f} | "
              f"{lower} of {len(b['window_nll'])} |")


def prune_layers(rows: list[dict]) -> None:
    """Layer removal: ShortGPT's choice (lowest Block Influence) against random layers (each seed)
    and the last layers, at each number of layers removed."""
    by = {r["config"]: r for r in rows}
    sizes = sorted({c.split("-")[1] for c in by if c.startswith("shortgpt-")}, key=int)
    print("| layers removed | ShortGPT (BI): perplexity, KL, layers | random layers: perplexity per seed (geo-mean) | "
          "last layers |")
    print("| --- | --- | --- | --- |")
    for n in sizes:
        s = by[f"shortgpt-{n}"]
        rnd = [r["ppl"] for c, r in by.items() if c.startswith(f"random-{n}-")]
        geo = math.exp(sum(math.log(v) for v in rnd) / len(rnd)) if rnd else None
        gone = s["stages"][0]["removed"]
        last = by.get(f"last-{n}")
        last = f"{last['ppl']:.3g}" if last else "–"
        print(f"| {len(gone)} of {len(gone) + s['layers']} | {s['ppl']:.4g}, KL {s['kl']:.3g}, "
              f"layers {', '.join(map(str, gone))} | {' / '.join(f'{v:.4g}' for v in rnd)}"
              f"{f' ({geo:.3g})' if geo else ''} | {last} |")


def fit_speed_table(rows: list[dict]) -> None:
    """pocketlm fit to a decode speed: each candidate's predicted and measured speed, and the
    chosen file's speed measured again in a fresh process."""
    for r in rows:
        print("| candidate | layers | MB | KL | perplexity | decode predicted tok/s | decode measured tok/s | "
              "outcome |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for c in r["candidates"]:
            mb = f"{c['file_bytes'] / 1e6:.2f}" if c.get("file_bytes") else "–"
            ok = c.get("decode_tok_s") is not None and c["decode_tok_s"] >= r["min_decode"]
            out = c.get("skipped") or ("chosen" if c["name"] == r["chosen"] else
                                       "measured" if ok else "too slow when measured")
            print(f"| {c['name']} | {c.get('layers') or '–'} | {mb} | {cell('kl', c.get('kl'))} | "
                  f"{cell('ppl', c.get('ppl'))} | {cell('x', c.get('predicted_decode'))} | "
                  f"{cell('x', c.get('decode_tok_s'))} | {out} |")
        tried = ", ".join(f"{x['name']} {x['tg_tok_s']}" for x in r["rechecked"])
        print(f"\nBudget: at least {r['min_decode']:g} tokens/s decoding (file limit predicted from the probe: "
              f"{r['decode_limit_bytes'] / 1e6:.2f} MB). Measured again in a fresh process: {tried} tokens/s; "
              f"{'met' if r['meets']['min_decode'] else 'NOT met'}. Search {r['seconds']:.0f} s.")


def fit_table(rows: list[dict]) -> None:
    """pocketlm fit: the chosen file against every other tool's file within the budget, then
    the candidates it measured or skipped, and the search's cost."""
    rows = [r for r in rows if "budget_bytes" in r]
    for r in rows:
        print("| budget MB | chosen | MB | KL | perplexity | search s | one APTQ + evaluation s | lower KL than every "
              "other tool's file within the budget |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        print(f"| {r['budget_bytes'] / 1e6:.0f} | {r['chosen']} | {r['file_bytes'] / 1e6:.2f} | {r['kl']:.4f} | "
              f"{r['ppl']:.3f} | {r['seconds']:.0f} | {r['one_aptq_s']:.0f} ({r['seconds'] / r['one_aptq_s']:.1f}x) | "
              f"{'yes' if r['beats_all_others'] else 'no'} |\n")
        print("| other tool's file within the budget | MB | KL | fit's file KL |")
        print("| --- | --- | --- | --- |")
        for o in sorted(r["others_within_budget"], key=lambda o: o["bytes"]):
            print(f"| {o['config']} | {o['bytes'] / 1e6:.2f} | {o['kl']:.4f} | {r['kl']:.4f} |")
        print("\n| candidate | layers | MB | KL | perplexity | compress s | eval s | outcome |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for c in r["candidates"]:
            mb = f"{c['file_bytes'] / 1e6:.2f}" if c.get("file_bytes") else "–"
            out = c.get("skipped") or ("chosen" if c["name"] == r["chosen"] else "measured")
            print(f"| {c['name']} | {c.get('layers') or '–'} | {mb} | {cell('kl', c.get('kl'))} | "
                  f"{cell('ppl', c.get('ppl'))} | {cell('x', c.get('compress_s'))} | {cell('x', c.get('eval_s'))} | "
                  f"{out} |")


def stream_table(rows: list[dict]) -> None:
    """Streamed compression (under a memory cap where one is given) against the same compression
    in memory: predicted and measured peaks, time, and whether the outputs are equal."""
    print("| model | run | memory cap MiB | predicted peak MiB | peak RSS MiB | cgroup peak MiB (page cache "
          "included) | seconds | output equal to the in-memory run |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        model = (f"Llama, {r['layers']} layers, {r['model_bytes'] / 2**30:.2f} GiB float32" if "layers" in r
                 else f"{r['model']} (GGUF)")
        eq = "–" if "equal_to_in_memory" not in r else \
            f"{'yes' if r['equal_to_in_memory'] else 'NO'} ({r['tensors_compared']} tensors)"
        name = r["config"].removeprefix("smollm2-").rsplit("-", 1)[0] if "layers" in r else \
            r["config"].removeprefix("smollm2-")
        if "killed_after_s" in r:
            name += f" (killed after {r['killed_after_s']:.0f} s, then --resume)"
        secs = f"{r['seconds']:.0f}" + (f" ({r['time_ratio']:.2f}x)" if "time_ratio" in r else "")
        print(f"| {model} | {name} | {r.get('cap_mib', 'none')} | {cell('x', r.get('predicted_peak_mib'))} | "
              f"{r['run_peak_rss_mib']:.0f} | {cell('x', r.get('cgroup_peak_mib'))} | {secs} | {eq} |")
    said = {("Llama" if "layers" in r else "SmolLM2"): f"{r['calib_windows']} x {r['calib_len']}" for r in rows}
    print(f"\nRecipe {rows[0]['recipe']}; calibration windows x tokens: "
          + ", ".join(f"{k} {v}" for k, v in sorted(said.items())) + ".")


def rope_table(rows: list[dict]) -> None:
    """The RoPE-base bound: the paper's reference rows recomputed, then each model's."""
    print("| head dim 128: context | smallest base that supports it | the paper's |")
    print("| --- | --- | --- |")
    for r in rows:
        if r["config"].startswith("paper-"):
            print(f"| {r['length']:,} | {r['required_base']:.2g} | {r['paper_base']:.2g} |")
    print()
    targets = next((list(r["required_base"]) for r in rows if isinstance(r.get("required_base"), dict)), [])
    print("| model | head dim | rope base | trained context | supported context | "
          + " | ".join(f"base for {int(t) // 1024}k" for t in targets) + " |")
    print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in targets) + " |")
    for r in rows:
        if not isinstance(r.get("required_base"), dict):
            continue
        base = f"{r['rope_theta']:.2g}"
        sup = f"{r['supported_context']:,}"
        if r.get("rope_theta_sliding"):
            base += f" (sliding layers {r['rope_theta_sliding']:.2g})"
            sup += f" (sliding layers {r['supported_context_sliding']:,}, window {r['sliding_window']})"
        print(f"| {r['config']} | {r['head_dim']} | {base} | {r['trained_context']:,} | {sup} | "
              + " | ".join(f"{r['required_base'][t]:.2g}" for t in targets) + " |")


def zeroshot_table(rows: list[dict]) -> None:
    """HellaSwag acc and acc_norm (+- SE); acc_norm task by task against the float PyTorch model,
    and for a GGUF file in llama.cpp against the same weights in PyTorch (``torch:FILE``)."""
    by = {r["config"]: r for r in rows}
    base = by.get("float-torch")
    print("| config | runtime | tasks | acc | acc_norm | acc_norm vs float-torch (paired, +- SE) | "
          "llama.cpp vs PyTorch, same weights (paired) | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        twin = by.get("float-torch" if r["config"] == "float-f16-gguf"
                      else "torch:" + r["config"].removeprefix("gguf:"))
        print(f"| {r['config']} | {r['runtime']} | {r['tasks']:,} | {r['acc']:.4f} +- {r['acc_stderr']:.4f} | "
              f"{r['acc_norm']:.4f} +- {r['acc_norm_stderr']:.4f} | {_paired_norm(base, r)} | "
              f"{_paired_norm(twin, r) if r['config'].startswith(('gguf:', 'float-f16')) else '–'} | "
              f"{r['seconds']:.0f} |")


def zeroshot_recover(rows: list[dict]) -> None:
    """Each saved compressed model (``dir:NAME``) beside its healed one (``dir:NAME+recover``):
    HellaSwag acc_norm, and task by task against the float model and against the model before
    recovery."""
    by = {r["config"]: r for r in rows}
    pairs = [(by[c.removesuffix("+recover")], by[c]) for c in by
             if c.startswith("dir:") and c.endswith("+recover") and c.removesuffix("+recover") in by]
    if not pairs:
        raise SystemExit("no dir:NAME and dir:NAME+recover pair in zeroshot.jsonl")
    print("| model | tasks | acc | acc_norm | acc_norm vs float-torch (paired, +- SE) | "
          "acc_norm vs before recovery (paired) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for before, after in pairs:
        for r in (before, after):
            print(f"| {r['config'][4:]} | {r['tasks']:,} | {r['acc']:.4f} +- {r['acc_stderr']:.4f} | "
                  f"{r['acc_norm']:.4f} +- {r['acc_norm_stderr']:.4f} | {_paired_norm(by.get('float-torch'), r)} | "
                  f"{_paired_norm(before, r) if r is after else '–'} |")


def _paired_norm(a: dict | None, b: dict) -> str:
    if a is None or a is b or len(a["correct_norm"]) != len(b["correct_norm"]):
        return "–"
    m, se = _diff([float(x) for x in a["correct_norm"]], [float(x) for x in b["correct_norm"]])
    return f"{m:+.4f} +- {se:.4f}"


def kv_tables(rows: list[dict]) -> None:
    """Fewer KV heads (against the float model and, paired over windows, mean against aligned
    merging); then sliding-window layers on long windows (perplexity by position)."""
    by = {r["config"]: r for r in rows}
    print("| config | KV heads | KV bytes/token (f16) | key error | value error | perplexity | KL | top-1 | "
          "KL vs kv1-mean (paired, +- SE) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    base = by.get("kv1-mean")
    for r in rows:
        if not r["config"].startswith("kv1"):
            continue
        m = r["merge"]
        d = (f"{_diff(base['window_kl'], r['window_kl'])[0]:+.4f} +- {_diff(base['window_kl'], r['window_kl'])[1]:.4f}"
             if base and r is not base and r.get("runtime") is None else "–")
        print(f"| {r['config']} | {r['kv_heads'][0]} -> {r['kv_heads'][1]} | {r['kv_bytes_per_token_f16'][0]:,} -> "
              f"{r['kv_bytes_per_token_f16'][1]:,} | {r['key_error'][m]:.3f} (mean {r['key_error']['mean']:.3f}) | "
              f"{r['value_error'][m]:.3f} (mean {r['value_error']['mean']:.3f}) | {r['ppl']:.3f} | {r['kl']:.4f} | "
              f"{r['top1']:.4f} | {d} |")


def _recover_stage(r: dict) -> dict:
    return next((s for s in r.get("stages", []) if s.get("method") == "recover"), {})


def recover_table(rows: list[dict]) -> None:
    """Each compressed model before and after recovery, with its structure checks."""
    rows = [r for r in rows if not r["config"].startswith(("memory-", "sweep-"))]
    if not rows:
        raise SystemExit("no recovery results yet: run bench/bench_recover.py")
    print("| config | layers | KV heads | sparsity | trained tokens | train s | perplexity | KL | top-1 | "
          "structure after save |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        st = _recover_stage(r)
        ok = "–"
        if st:
            ok = "intact" if (r["pruned_weights_zero"] and r["codes_on_grid"] and r.get("reloaded_equal")
                              and r.get("reloaded_layers") == r["layers"]) else "CHANGED"
            if r.get("max_kept_per_4") is not None:
                ok += f", max {r['max_kept_per_4']} of 4 kept"
        sp = "–" if r.get("sparsity") is None else f"{r['sparsity']:.3f}"
        tokens = f"{st['tokens']:,}" if st else "–"
        print(f"| {r['config']} | {r['layers']} | {r.get('kv_heads', '–')} | {sp} | {tokens} | "
              f"{st.get('seconds_training', '–')} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.4f} | {ok} |")
    print(f"\nFloat model: perplexity {rows[0]['base_ppl']:.3f} on the same {rows[0]['windows']} windows.")


def recover_gguf(rows: list[dict]) -> None:
    """Models tuned on a GGUF grid, before and after recovery: KL in PyTorch against KL of the
    exported file in llama.cpp, and the healed file's KL paired window by window against the
    file before recovery."""
    rows = [r for r in rows if "gguf_kl" in r]
    if not rows:
        raise SystemExit("no GGUF recovery results yet: run bench/bench_recover.py --only imatrix-iq4_nl")
    by = {r["config"]: r for r in rows}
    print("| config | file MiB | trained tokens | perplexity (PyTorch) | KL (PyTorch) | perplexity (llama.cpp) | "
          "KL (llama.cpp) | KL vs before recovery (llama.cpp, paired, +- SE) | windows lower |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        st = _recover_stage(r)
        before = by.get(r["config"].removesuffix("+recover")) if st else None
        vs, lower = "–", "–"
        if before is not None:
            m, se = _diff(before["gguf_window_kl"], r["gguf_window_kl"])
            vs = f"{m:+.4f} +- {se:.4f}"
            lower = f"{sum(b < a for a, b in zip(before['gguf_window_kl'], r['gguf_window_kl']))} of {r['windows']}"
        tokens = f"{st['tokens']:,}" if st else "–"
        print(f"| {r['config']} | {r['file_bytes'] / 2**20:.1f} | {tokens} | {r['ppl']:.3f} | {r['kl']:.4f} | "
              f"{r['gguf_ppl']:.3f} | {r['gguf_kl']:.4f} | {vs} | {lower} |")


def recover_memory(rows: list[dict]) -> None:
    rows = [r for r in rows if r["config"].startswith("memory-")]
    if not rows:
        raise SystemExit("no memory results yet: run bench/bench_recover.py --only memory-2GiB-planned,...")
    print("| run | budget MiB | micro-batch x tokens | recomputed | predicted peak MiB | measured peak MiB | "
          "measured / predicted | largest micro-batch without / with recomputation |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        p = r["plan"]
        rec = ", ".join(f"{v} {k}" for k, v in p["recompute"].items()) if r["recompute_applied"] else "nothing"
        pred = r["predicted_peak_mib"] if r["recompute_applied"] else "–"
        ratio = f"{r['measured_peak_mib'] / r['predicted_peak_mib']:.3f}" if r["recompute_applied"] else "–"
        print(f"| {r['config']} | {r['budget_mib']} | {p['micro_batch']} x {p['seq_len']} | {rec} | {pred} | "
              f"{r['measured_peak_mib']:.0f} | {ratio} | {p['max_micro_batch_without_recompute']} / "
              f"{p['max_micro_batch_with_recompute']} |")


def recover_sweep(rows: list[dict]) -> None:
    rows = sorted((r for r in rows if r["config"].startswith("sweep-")), key=lambda r: (r["optimizer"], r["lr"]))
    if not rows:
        raise SystemExit("no sweep results yet: run bench/bench_recover.py --only sweep-adamw-3e-4,...")
    print("| optimizer | learning rate | trained tokens | final loss (mean of last 5 steps) | perplexity | KL "
          "| top-1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        loss = r["curve"]["loss"][-5:]
        print(f"| {r['optimizer']} | {r['lr']:g} | {r['curve']['tokens'][-1]:,} | {sum(loss) / len(loss):.4f} | "
              f"{r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.4f} |")


def recover_curves(name: str = "recover") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in _rows(name) if r["config"].startswith("sweep-")]
    if not rows:
        raise SystemExit("no sweep results yet")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for r in sorted(rows, key=lambda r: (r["optimizer"], r["lr"])):
        c = colors.setdefault(r["lr"], f"C{len(colors)}")
        ax.plot(r["curve"]["tokens"], r["curve"]["loss"], color=c, ls="-" if r["optimizer"] == "adamw" else "--",
                label=f"{r['optimizer']} lr {r['lr']:g}")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("distillation loss (KL to the float model, nats/token)")
    ax.set_title("SmolLM2-135M, 25% of layers removed: AdamW (solid) vs AdaShift (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "recover_curves.png", dpi=120)
    print(f"wrote {RESULTS / 'recover_curves.png'}")


def swa_table(name: str = "kv") -> None:
    """Sliding-window layers on long windows: perplexity by position."""
    swa = [r for r in _rows(name) if r["config"].startswith("swa-")]
    if not swa:
        raise SystemExit("no sliding-window results yet: run bench/bench_kv.py --only swa-none,swa-span,...")
    starts = swa[0]["bucket_start"]
    print("| config | layers made sliding | KV MiB at 8,192 (f16) | perplexity | KL | " +
          " | ".join(f"ppl from {s:,}" for s in starts[::2]) + " |")
    print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in starts[::2]) + " |")
    for r in swa:
        kvb = r["kv_bytes_at_8192"]
        print(f"| {r['config']} | {len(r['sliding_layers'])} | {kvb[0] / 2**20:.0f} -> {kvb[1] / 2**20:.0f} | "
              f"{r['ppl']:.3f} | {r['kl']:.4f} | " + " | ".join(f"{v:.2f}" for v in r["bucket_ppl"][::2]) + " |")
    rand = [r for r in swa if r["config"].startswith("swa-random")]
    if len(rand) > 1:
        ppl, kl = [r["ppl"] for r in rand], [r["kl"] for r in rand]
        print(f"\nRandom layers, {len(rand)} seeds: perplexity {min(ppl):.2f} to {max(ppl):.2f} (mean "
              f"{sum(ppl) / len(ppl):.2f}), KL {min(kl):.4f} to {max(kl):.4f} (mean {sum(kl) / len(kl):.4f}).")


def speed(rows: list[dict]) -> None:
    """Interleaved llama-bench-style speed; each pocketlm file against llama.cpp's file of the
    preset it copies the types of (``<method>-like-<PRESET>`` against ``llama.cpp-<PRESET>``): the
    ratio of the medians, and each round's ratio (a round runs every file one after the other, so
    its ratio is free of the machine's drift between rounds) as the geometric mean over rounds
    with its standard error."""
    by = {r["config"]: r for r in rows}

    def per_round(r, ref, key):
        a, b = r.get(f"{key}_rounds"), ref.get(f"{key}_rounds")
        if not a or not b or len(a) != len(b) or len(a) < 2:
            return "–"
        d = [math.log(x / y) for x, y in zip(a, b)]
        m = sum(d) / len(d)
        se = math.sqrt(sum((v - m) ** 2 for v in d) / (len(d) - 1) / len(d))
        return f"{math.exp(m) - 1:+.1%} +- {se:.1%}"

    print("| file | rounds | prefill tok/s (pp512) | decode tok/s (tg128) | against llama.cpp's file of the preset: "
          "prefill | decode | per round (mean +- SE): prefill | decode |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ref = by.get("llama.cpp-" + r["config"].split("-like-")[1]) if "-like-" in r["config"] else None
        rel = (f"{r['pp_tok_s'] / ref['pp_tok_s'] - 1:+.1%} | {r['tg_tok_s'] / ref['tg_tok_s'] - 1:+.1%} | "
               f"{per_round(r, ref, 'pp')} | {per_round(r, ref, 'tg')}" if ref else "– | – | – | –")
        print(f"| {r['config']} | {r['rounds']} | {r['pp_tok_s']:.1f} | {r['tg_tok_s']:.1f} | {rel} |")


def timing(name: str = "gguf") -> None:
    """Wall-clock seconds of llama.cpp's importance-matrix path and pocketlm's, run one after the
    other on the same calibration tokens (``bench_gguf.py --only timing-PRESET``)."""
    rows = [r for r in _rows(name) if r.get("bench") == f"{name}-time"]
    print("| llama.cpp types | llama-imatrix s | llama-quantize s | llama.cpp total s | pocketlm imatrix, one pass s "
          "| ratio | pocketlm imatrix, sequential s | ratio | pocketlm GPTQ s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['config'].removeprefix('timing-')} | {r['llama_imatrix_s']} | {r['llama_quantize_s']} | "
              f"{r['llama_total_s']} | {r.get('pocketlm_imatrix1_s', '-')} | {r.get('imatrix1_ratio', '-')} | "
              f"{r['pocketlm_imatrix_s']} | {r['imatrix_ratio']} | {r['pocketlm_gptq_s']} | {r['gptq_ratio']} |")


def _diff(x: list[float], y: list[float]) -> tuple[float, float]:
    """Mean of y - x over windows and its standard error."""
    d = [v - u for u, v in zip(x, y)]
    n = len(d)
    mean = sum(d) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1) / n)


def _rows(name: str) -> list[dict]:
    path = RESULTS / f"{name}.jsonl"
    if not path.is_file():
        raise SystemExit(f"no results for {name}: run its benchmark (bench/bench_*.py) first")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


ANCHORS = ("llama.cpp", "auto-round")


def versus(name: str = "gguf", only: list[str] | None = None) -> None:
    """For every file of another tool (llama.cpp, AutoRound): the pocketlm file with the lowest KL
    among those of no more bytes, and the paired difference over the evaluation windows (pocketlm
    minus llama.cpp)."""
    rows = [r for r in _rows(name) if "kl" in r]
    mine = [r for r in rows if r.get("source") == "pocketlm"]
    print("| other tool's file | MiB | perplexity | KL | pocketlm file | MiB | perplexity | KL | KL difference "
          "(paired, +- SE) | NLL difference |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    anchors = [r for r in rows if r.get("source") in ANCHORS and (not only or r["config"] in only)]
    for r in sorted(anchors, key=lambda r: -r["bytes"]):
        fit = [m for m in mine if m["bytes"] <= r["bytes"]]
        if not fit:
            print(f"| {r['config']} | {r['bytes'] / 2**20:.2f} | {r['ppl']:.3f} | {r['kl']:.4f} | – | | | | | |")
            continue
        b = min(fit, key=lambda m: m["kl"])
        dk, sk = _diff(r["window_kl"], b["window_kl"])
        dn, sn = _diff(r["window_nll"], b["window_nll"])
        print(f"| {r['config']} | {r['bytes'] / 2**20:.2f} | {r['ppl']:.3f} | {r['kl']:.4f} | {b['config']} | "
              f"{b['bytes'] / 2**20:.2f} | {b['ppl']:.3f} | {b['kl']:.4f} | {dk:+.5f} +- {sk:.5f} | "
              f"{dn:+.4f} +- {sn:.4f} |")


MODEL_NAMES = {"smollm2-135m": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma-3-270M"}


def plot(name: str = "gguf") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in _rows(name) if "kl" in r]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    groups = {"llama.cpp + imatrix": lambda r: r.get("source") == "llama.cpp" and r.get("calib_windows"),
              "llama.cpp, no imatrix": lambda r: r.get("source") == "llama.cpp" and not r.get("calib_windows"),
              "AutoRound": lambda r: r.get("source") == "auto-round",
              "pocketlm": lambda r: r.get("source") == "pocketlm"}
    style = {"llama.cpp + imatrix": ("tab:red", "s"), "llama.cpp, no imatrix": ("tab:orange", "x"),
             "AutoRound": ("tab:green", "^"), "pocketlm": ("tab:blue", "o")}
    for ax, key, label in ((axes[0], "kl", "KL from the float model (nats/token)"),
                           (axes[1], "ppl", "WikiText-2 perplexity")):
        for g, pick in groups.items():
            pts = sorted((r["bytes"] / 2**20, r[key], r["config"]) for r in rows if pick(r))
            if not pts:
                continue
            color, marker = style[g]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=color, marker=marker, label=g, zorder=3)
            for x, y, c in pts:
                ax.annotate(c.removeprefix("llama.cpp-"), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("GGUF file size (MiB)")
        ax.set_ylabel(label)
        if key == "kl":
            ax.set_yscale("log")
        else:
            ax.axhline(rows[0]["base_ppl"], color="black", ls="--", lw=0.8, label="float model")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    model = rows[0].get("model", "smollm2-135m")
    fig.suptitle(f"{MODEL_NAMES.get(model, model)} in llama.cpp: quality against file size")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)
    print(f"wrote {RESULTS / f'{name}.png'}")


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


def run(args: list[str]) -> None:
    """One table (or plot) from its command-line arguments."""
    if len(args) == 4 and args[1] == "--paired":
        paired(args[0], args[2], args[3])
    elif len(args) in (2, 3) and args[0].startswith("gguf") and args[1] == "--versus":
        versus(args[0], args[2].split(",") if len(args) == 3 else None)
    elif len(args) == 2 and args[0].startswith("gguf") and args[1] == "--timing":
        timing(args[0])
    elif len(args) == 2 and args[0].startswith("gguf") and args[1] == "--plot":
        plot(args[0])
    elif len(args) == 2 and args[0].startswith("kv") and args[1] == "--swa":
        swa_table(args[0])
    elif args == ["recover", "--memory"]:
        recover_memory(_rows("recover"))
    elif args == ["recover", "--gguf"]:
        recover_gguf(_rows("recover"))
    elif args == ["recover", "--sweep"]:
        recover_sweep(_rows("recover"))
    elif args == ["recover", "--curves"]:
        recover_curves()
    elif args == ["zeroshot", "--recover"]:
        zeroshot_recover(_rows("zeroshot"))
    elif len(args) == 3 and args[1] == "--rows":
        main(args[0], args[2].split(","))
    elif args == ["fit", "--speed"]:
        fit_speed_table([r for r in _rows("fit") if "min_decode" in r])
    elif args == ["prune", "--layers"]:
        prune_layers(_rows("prune"))
    elif args == ["prune", "--rebuild"]:
        prune_rebuild(_rows("prune"))
    elif len(args) == 1:
        main(args[0])
    else:
        raise SystemExit(__doc__)


BLOCK = re.compile(r"(<!-- table: (?P<args>[^>]*?) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def update_docs(check: bool = False) -> list[str]:
    """Regenerate every table block of README.md and docs/*.md from bench/results/: a block is
    ``<!-- table: ARGS -->`` ... ``<!-- /table -->``, its body the output of ``table.py ARGS``.
    With ``check``, write nothing and return the documents whose blocks differ."""
    import contextlib
    import io

    root = RESULTS.parent.parent
    stale = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = doc.read_text()

        def fill(m: re.Match) -> str:
            buf = io.StringIO()
            try:
                with contextlib.redirect_stdout(buf):
                    run(m.group("args").split())
            except SystemExit as e:  # no results yet: leave the block as it is
                print(f"{doc.name}: table {m.group('args')!r} left as it was ({e})")
                return m.group(0)
            return m.group(1) + buf.getvalue() + m.group(4)

        new = BLOCK.sub(fill, text)
        if new != text:
            stale.append(str(doc.relative_to(root)))
            if not check:
                doc.write_text(new)
                print(f"updated {doc.relative_to(root)}")
    return stale


if __name__ == "__main__":
    if sys.argv[1:] == ["--update-docs"]:
        update_docs()
    elif sys.argv[1:] == ["--check"]:
        out = update_docs(check=True)
        if out:
            raise SystemExit("out of date (run bench/table.py --update-docs): " + ", ".join(out))
    else:
        run(sys.argv[1:])
