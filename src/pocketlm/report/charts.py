"""Charts for the HTML report: matplotlib figures written as inline SVG, every point, bar and
heat-map cell carrying a ``<title>`` (the browser shows it on hover), ids prefixed per chart so
that several charts live in one page."""
from __future__ import annotations

import html
import io
import math
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

matplotlib.rcParams["svg.hashsalt"] = "pocketlm"  # the same input gives the same SVG
matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text (small, selectable)

BLUE, RED, GREY, GREEN = "#1f77b4", "#d62728", "#7f7f7f", "#2ca02c"


class Chart:
    """One figure and the hover text of its artists (by gid)."""

    def __init__(self, width: float, height: float):
        self.fig, self.ax = plt.subplots(figsize=(width, height))
        self.tips: dict[str, str] = {}

    def tip(self, artist, text: str) -> None:
        gid = f"tip{len(self.tips)}"
        artist.set_gid(gid)
        self.tips[gid] = text

    def svg(self, prefix: str) -> str:
        """The figure as an ``<svg>`` element for inline use (ids prefixed with ``prefix``)."""
        self.fig.tight_layout()
        buf = io.StringIO()
        self.fig.savefig(buf, format="svg")
        plt.close(self.fig)
        text = buf.getvalue()
        text = text[text.index("<svg"):]
        text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.S)  # creator and date: not content
        for gid, tip in self.tips.items():
            text = text.replace(f'<g id="{gid}">', f'<g id="{gid}"><title>{html.escape(tip)}</title>', 1)
        text = re.sub(r'\bid="', f'id="{prefix}-', text)
        text = re.sub(r"url\(#", f"url(#{prefix}-", text)
        return re.sub(r'href="#', f'href="#{prefix}-', text)


def bars(values: list[float], labels: list[str], title: str, ylabel: str, xlabel: str = "layer",
         highlight: set[int] = frozenset(), tips: list[str] | None = None, log: bool = False) -> Chart:
    """One bar per value; ``highlight`` colours some (e.g. the layers removed)."""
    c = Chart(max(5.0, 0.28 * len(values) + 1.8), 3.2)
    for i, v in enumerate(values):
        (bar,) = c.ax.bar([i], [v], color=RED if i in highlight else BLUE)
        c.tip(bar, tips[i] if tips else f"{labels[i]}: {v:.4g}")
    step = max(1, len(values) // 30)
    c.ax.set_xticks(range(0, len(values), step), labels[::step], fontsize=7)
    if log:
        c.ax.set_yscale("log")
    c.ax.set_xlabel(xlabel)
    c.ax.set_ylabel(ylabel)
    c.ax.set_title(title)
    return c


def heatmap(values: list[list[float | None]], rows: list[str], cols: list[str], title: str, label: str,
            tips: list[list[str]], log: bool = False) -> Chart:
    """Rows x columns of coloured cells (missing values blank), one hover text per cell."""
    c = Chart(2.0 + 0.9 * len(cols), 1.3 + 0.22 * len(rows))
    flat = [v for r in values for v in r if v is not None and (not log or v > 0)]
    if flat:
        lo, hi = min(flat), max(flat)
        norm = (matplotlib.colors.LogNorm(lo, hi) if log and lo < hi else
                matplotlib.colors.Normalize(lo, hi if hi > lo else lo + 1))
        cmap = matplotlib.colormaps["viridis"]
        for i, r in enumerate(values):
            for j, v in enumerate(r):
                if v is None or (log and v <= 0):
                    continue
                cell = c.ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, color=cmap(norm(v)), linewidth=0))
                c.tip(cell, tips[i][j])
        c.fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=c.ax, label=label)
    c.ax.set_xlim(-0.5, len(cols) - 0.5)
    c.ax.set_ylim(len(rows) - 0.5, -0.5)
    c.ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    c.ax.set_yticks(range(len(rows)), rows, fontsize=7)
    c.ax.set_title(title)
    return c


def pareto(points: list[dict], title: str, ylabel: str, key: str) -> Chart:
    """Quality (``key``, lower is better, log scale) against file size; points with ``anchor``
    true are other tools' files (grey squares), the rest pocketlm's (blue dots); the line joins
    the points no other point beats in both size and quality."""
    c = Chart(7.0, 4.2)
    pts = [p for p in points if p.get(key) is not None and p.get("bytes")]
    for p in pts:
        anchor = p.get("anchor", False)
        (dot,) = c.ax.plot([p["bytes"] / 1e6], [max(p[key], 1e-6)], "s" if anchor else "o",
                           color=GREY if anchor else BLUE, markersize=6 if anchor else 7)
        c.tip(dot, f"{p['label']}: {p['bytes'] / 1e6:.1f} MB, {key} {p[key]:.4g}")
        c.ax.annotate(p["label"], (p["bytes"] / 1e6, max(p[key], 1e-6)), fontsize=6, xytext=(4, 3),
                      textcoords="offset points", color=GREY if anchor else BLUE)
    front = front_of(pts, key)
    if len(front) > 1:
        c.ax.plot([p["bytes"] / 1e6 for p in front], [max(p[key], 1e-6) for p in front], "-", color=GREEN,
                  linewidth=1, zorder=0, label="Pareto front")
        c.ax.legend(fontsize=8)
    if pts and max(p[key] for p in pts) / max(min(p[key] for p in pts), 1e-6) > 20:
        c.ax.set_yscale("log")
    c.ax.set_xlabel("file size (MB)")
    c.ax.set_ylabel(ylabel)
    c.ax.set_title(title)
    return c


def front_of(points: list[dict], key: str) -> list[dict]:
    """The points that no other point beats in both bytes and ``key`` (ascending bytes)."""
    out, best = [], math.inf
    for p in sorted(points, key=lambda p: (p["bytes"], p[key])):
        if p[key] < best:
            out.append(p)
            best = p[key]
    return out


def curve(x: list[float], y: list[float], title: str, xlabel: str, ylabel: str) -> Chart:
    """One line with a hover text on (at most 60 of) its points."""
    c = Chart(6.0, 3.2)
    c.ax.plot(x, y, color=BLUE, linewidth=1)
    for i in range(0, len(x), max(1, len(x) // 60)):
        (dot,) = c.ax.plot([x[i]], [y[i]], "o", color=BLUE, markersize=2.5)
        c.tip(dot, f"{xlabel} {x[i]:,.0f}: {y[i]:.4g}")
    c.ax.set_xlabel(xlabel)
    c.ax.set_ylabel(ylabel)
    c.ax.set_title(title)
    return c
