"""PNG plots (matplotlib, no display needed)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def heatmap(values: np.ndarray, rows: list[str], cols: list[str], title: str, label: str,
            path: str | os.PathLike) -> None:
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.2 + 0.28 * len(rows)))
    im = ax.imshow(values, aspect="auto", cmap="magma")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("projection")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bars(values: list[float], title: str, label: str, path: str | os.PathLike, highlight: list[int] = ()) -> None:
    """One bar per layer; ``highlight`` marks some (e.g. the layers a method would remove)."""
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(values) + 1.5), 3.4))
    colors = ["#d62728" if i in set(highlight) else "#1f77b4" for i in range(len(values))]
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel(label)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lines(x: list[float], series: dict[str, list[float]], title: str, xlabel: str, ylabel: str,
          path: str | os.PathLike) -> None:
    """One line per named series over a shared x axis."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, ys in series.items():
        ax.plot(x, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
