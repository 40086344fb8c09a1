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


Z95 = 1.96
BAND_NOTE = "band: chance (shuffled states, mean ± 1.96 sd)"


def chance_band(ax, xs, records, colour, label=None) -> None:
    """Shade the chance level of values at `xs` (their null records): mean ± 1.96 sd of
    CKNNA under shuffled states. Skipped where any record is missing."""
    if not records or not all(records):
        return
    mean = [r.get("chance", r.get("null_mean")) for r in records]
    sd = [r.get("null_std") or 0.0 for r in records]
    if any(v is None for v in mean):
        return
    ax.fill_between(xs, [m - Z95 * d for m, d in zip(mean, sd)],
                    [m + Z95 * d for m, d in zip(mean, sd)], color=colour, alpha=0.15,
                    linewidth=0, label=label)
    ax.plot(xs, mean, color=colour, linestyle=":", linewidth=1)


def value_errors(records):
    """Error bars for the values whose null records these are: each null's 1.96 sd (how far
    CKNNA moves between data sets of this size without a real difference); None without."""
    if not records or not all(records):
        return None
    return [Z95 * (r.get("null_std") or 0.0) for r in records]
