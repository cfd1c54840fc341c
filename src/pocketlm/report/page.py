"""The report page: one self-contained HTML file (inline CSS and SVG, no script, nothing fetched),
built from :mod:`.runs` records and :mod:`.charts` figures."""
from __future__ import annotations

import html
import math

from . import charts
from .runs import Anchors, Run

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; } h3 { margin-top: 1.5em; }
table { border-collapse: collapse; margin: 0.8em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
.meta, .note { color: #666; } figure { margin: 1em 0; } svg { max-width: 100%; height: auto; }
"""


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else html.escape(str(v))


def _table(head: list[str], rows: list[list]) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


class Page:
    def __init__(self):
        self.parts: list[str] = []
        self.n_charts = 0

    def add(self, text: str) -> None:
        self.parts.append(text)

    def chart(self, c: charts.Chart, caption: str) -> None:
        self.n_charts += 1
        self.add(f'<figure class="chart">{c.svg(f"c{self.n_charts}")}'
                 f"<figcaption class=note>{html.escape(caption)}</figcaption></figure>")

    def html(self, title: str) -> str:
        return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
                f"<style>{CSS}</style></head><body>\n" + "\n".join(self.parts) + "\n</body></html>\n")


def summary(page: Page, runs: list[Run]) -> None:
    rows = []
    for r in runs:
        ev, sz, g = r.eval, r.size, r.gguf()
        rows.append([r.label, r.manifest.get("recipe"), r.manifest.get("source"), g[0] if g else "(model directory)",
                     None if r.file_bytes() is None else round(r.file_bytes() / 1e6, 1), sz.get("bpw_quantized"),
                     sz.get("sparsity"), r.layers, ev.get("ref_ppl"), ev.get("ppl"), ev.get("kl"), ev.get("top1"),
                     r.manifest.get("seconds")])
    page.add("<h2>Base against compressed</h2>")
    page.add(_table(["model", "recipe", "source", "file", "MB", "bpw (quantized linears)", "sparsity", "layers",
                     "perplexity (base)", "perplexity", "KL", "top-1", "compress s"], rows))
    ev = next((r.eval for r in runs if r.eval), None)
    if ev:
        page.add(f"<p class=note>Evaluation: {_fmt(ev.get('windows'))} windows of {_fmt(ev.get('seq_len'))} tokens "
                 f"of {html.escape(str(ev.get('corpus')))} ({_fmt(ev.get('tokens_scored'))} tokens scored); "
                 "KL and top-1 against the uncompressed model, lower KL is better.</p>")


def pareto(page: Page, runs: list[Run], anchors: Anchors) -> None:
    pts = [r.point() for r in runs] + anchors.points
    if sum(p["kl"] is not None and p["bytes"] is not None for p in pts) < 1:
        return
    page.add("<h2>Quality against size</h2>")
    page.chart(charts.pareto(pts, "KL against file size", "KL (nats/token)", "kl"),
               "Blue: pocketlm's files; grey squares: other tools' files measured the same way; green: the files "
               "no other file beats in both size and KL. Hover a point for its values.")
    front = {p["label"] for p in charts.front_of([p for p in pts if p["kl"] is not None and p["bytes"]], "kl")}
    rows = [[p["label"], "other tool" if p["anchor"] else "pocketlm", round(p["bytes"] / 1e6, 2), p["kl"], p["ppl"],
             "yes" if p["label"] in front else ""] for p in sorted(pts, key=lambda p: p["bytes"] or 0)
            if p["bytes"] and p["kl"] is not None]
    page.add(_table(["file", "from", "MB", "KL", "perplexity", "on the front"], rows))


def details(page: Page, r: Run) -> None:
    page.add(f"<h2>{html.escape(r.label)}</h2>")
    m = r.manifest
    page.add(f"<p class=meta>{html.escape(str(m.get('source') or 'a model in memory'))} → "
             f"recipe {html.escape(str(m.get('recipe')))}; "
             f"pocketlm {html.escape(str(m.get('pocketlm_version')))}, torch "
             f"{html.escape(str((m.get('machine') or {}).get('torch')))}, "
             f"{_fmt((m.get('machine') or {}).get('threads'))} threads; {html.escape(str(m.get('created')))}</p>")
    stages = [[s.get("method"), s.get("seconds", s.get("seconds_training"))] for s in m.get("stages") or []]
    if stages:
        page.add(_table(["stage", "seconds"], stages))
    ev = r.eval
    if ev.get("window_nll"):
        ppl = [math.exp(v) for v in ev["window_nll"]]
        kl = ev.get("window_kl") or []
        tips = [f"window {i}: perplexity {p:.4g}" + (f", KL {kl[i]:.4g}" if i < len(kl) else "")
                for i, p in enumerate(ppl)]
        page.chart(charts.bars(ppl, [str(i) for i in range(len(ppl))], "Perplexity per evaluation window",
                               "perplexity", "window", tips=tips), "Each window's perplexity (hover: its KL).")
    alloc = r.allocation()
    if alloc:
        rows, cols, vals, tips = alloc
        page.chart(charts.heatmap(vals, rows, cols, "Bits per weight of each linear", "bpw", tips),
                   "The grid each decoder linear was stored in (hover: its type).")
    sens = r.sensitivity()
    if sens:
        rows, cols, vals, tips = sens
        chart = charts.heatmap(vals, rows, cols, "Sensitivity (APTQ's estimated loss increase)", "cost", tips, log=True)
        page.chart(chart, "APTQ's curvature-weighted error of each linear at its most common option: "
                          "brighter linears got more bits.")
    bi = r.stage("remove-layers")
    if bi and bi.get("block_influence"):
        v = bi["block_influence"]
        gone = set(bi.get("removed") or [])
        page.chart(charts.bars(v, [str(i) for i in range(len(v))], "Block Influence per layer", "BI (1 - cos)",
                               highlight=gone, tips=[f"layer {i}: BI {x:.4g}" + (" (removed)" if i in gone else "")
                                                     for i, x in enumerate(v)]),
                   "Red: the layers removed (lowest influence on the calibration text).")
    rec = r.stage("recover")
    if rec and (rec.get("curve") or {}).get("loss"):
        cv = rec["curve"]
        page.chart(charts.curve(cv["tokens"], cv["loss"], "Recovery: distillation loss", "tokens", "KL per token"),
                   f"{_fmt(rec.get('tokens'))} training tokens in {_fmt(rec.get('seconds_training'))} s; peak RSS "
                   f"{_fmt((rec.get('peak_rss_bytes') or 0) / 2**20, 5)} MiB.")


def build(runs: list[Run], anchors: Anchors) -> str:
    page = Page()
    page.add("<h1>pocketlm report</h1>")
    page.add(f"<p class=meta>{len(runs)} compressed model{'s' if len(runs) != 1 else ''}"
             + (f"; {len(anchors.points)} files of other tools" if anchors.points else "") + "</p>")
    summary(page, runs)
    pareto(page, runs, anchors)
    for r in runs:
        details(page, r)
    return page.html("pocketlm report: " + ", ".join(r.label for r in runs))


def fit_page(fit: dict, anchors: Anchors) -> str:
    """The page of a ``pocketlm fit`` run: the budget and what it became, every candidate
    (predicted, measured or skipped, and why), the chosen file measured again, and the
    candidates' KL against size beside other tools' files."""
    page = Page()
    b, mach = fit["budget"], fit["machine"]
    asked = ", ".join(f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in b.items() if v is not None and k != "ctx")
    page.add(f"<h1>pocketlm fit: {html.escape(str(fit['model']))}</h1>")
    page.add(f"<p class=meta>Budget: {asked} (context {_fmt(b['ctx'])} tokens). Chosen: <b>"
             f"{html.escape(fit['chosen'])}</b>, {html.escape(fit['why'])}; search took {_fmt(fit['seconds'])} s.</p>")
    page.add("<h2>From the budget to a file size</h2>")
    page.add(_table(["budget", "largest file it allows (bytes)"], [[k, v] for k, v in fit["limits"].items()]))
    page.add(f"<p class=note>Measured on a probe file (every linear Q8_0, {_fmt(mach['probe'].get('bytes'))} bytes) "
             f"in llama.cpp here: GGUF metadata {_fmt(mach['metadata_bytes'])} B, KV cache at the context "
             f"{_fmt(mach['kv_bytes'])} B, runtime memory beyond file and cache {_fmt(mach['overhead_bytes'])} B, "
             f"decode {_fmt(mach['probe'].get('tg_tok_s'))} tok/s (speed taken as proportional to 1 / file bytes)."
             "</p>")
    rows = []
    for c in fit["candidates"]:
        m, p = c.get("measured") or {}, c["predicted"]
        rows.append([c["name"], m.get("layers"), p.get("file_bytes"), p.get("ram_bytes"), p.get("decode_tok_s"),
                     m.get("file_bytes"), m.get("ram_bytes"), m.get("decode_tok_s"), m.get("kl"), m.get("ppl"),
                     m.get("top1"), m.get("compress_s"),
                     c.get("skipped") or ("chosen" if c["name"] == fit["chosen"] else "measured")])
    page.add("<h2>Candidates</h2>")
    page.add(_table(["candidate", "layers", "predicted file B", "predicted RAM B", "predicted decode tok/s",
                     "file B", "RAM B", "decode tok/s", "KL", "perplexity", "top-1", "compress s", "outcome"], rows))
    page.add(f"<p class=note>Measured {html.escape(fit.get('runner', 'in process'))}; RAM and decode are measured "
             "per candidate only for a RAM or speed budget. Second measurements of the best candidates: "
             + html.escape(", ".join(f"{r['name']} {r['tg_tok_s']} tok/s" for r in fit.get("rechecked", [])) or "–")
             + ".</p>")
    again = fit["chosen_measured_again"]
    page.add("<h2>The chosen file, measured again</h2>")
    page.add(_table(["file bytes", "peak RSS MiB", "KV cache MiB", "prefill tok/s", "decode tok/s", "budgets met"],
                    [[again.get("bytes"), again.get("peak_rss_mib"), again.get("kv_cache_mib"), again.get("pp_tok_s"),
                      again.get("tg_tok_s"),
                      ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in fit["meets"].items())]]))
    pts = [{"label": c["name"], "bytes": c["measured"]["file_bytes"], "kl": c["measured"]["kl"],
            "ppl": c["measured"]["ppl"], "anchor": False} for c in fit["candidates"] if c.get("measured")]
    if pts:
        page.add("<h2>Quality against size</h2>")
        page.chart(charts.pareto(pts + anchors.points, "Candidates: KL against file size", "KL (nats/token)", "kl"),
                   f"Blue: the candidates; grey squares: other tools' files; KL on {fit['eval']['windows']} windows "
                   f"of {fit['eval']['seq_len']} tokens of {fit['eval']['corpus']}.")
    return page.html(f"pocketlm fit: {fit['model']}")
