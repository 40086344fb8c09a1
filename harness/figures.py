"""What every report view shares: number formatting and the finishing of figures."""
from __future__ import annotations

import math
from pathlib import Path

from harness.io import atomic_path


def fmt(x) -> str:
    """A table cell: 4 decimals, small values in e-notation (never rounded to 0), NaN."""
    if x is None:
        return ""
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        return f"{x:.4f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
    return str(x)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib (a core dependency): pip install matplotlib") from None
    return plt


def save_figure(fig, path: Path) -> None:
    """PNG, written atomically; the figure is closed."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    pyplot().close(fig)


def legend_outside(ax) -> None:
    """Legend right of the axes, so it never hides a line."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)


def finish_axes(ax, title: str, xlabel: str | None, ylabel: str) -> None:
    """Every line figure: a title, both axes named, the legend outside."""
    ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    legend_outside(ax)
