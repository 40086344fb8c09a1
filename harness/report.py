"""Human-readable views of a results JSON: a markdown table and a heatmap PNG."""
from __future__ import annotations

import math
from pathlib import Path

from harness.io import atomic_path


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        return f"{x:.4f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
    return str(x)


def markdown_table(results: dict) -> str:
    """One row per model: CKNNA (and mutual kNN, p-values) for each k against feats_B."""
    ks = results["_meta"]["k_values"]
    models = results["models"]
    cols = []
    for k in ks:
        cols.append((f"CKNNA k={k}", f"cknna_k{k}"))
        if any(f"mutual_knn_k{k}" in m for m in models.values()):
            cols.append((f"mkNN k={k}", f"mutual_knn_k{k}"))
        if any(f"p_value_k{k}" in m for m in models.values()):
            cols.append((f"p k={k}", f"p_value_k{k}"))
    lines = ["| model | dim | " + " | ".join(c[0] for c in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for label, m in models.items():
        cells = [_fmt(m.get(key)) for _, key in cols]
        lines.append(f"| {label} | {m.get('feats_A_dim', '')} | " + " | ".join(cells) + " |")
    pairwise = results.get("pairwise")
    if pairwise:
        labels = pairwise["labels"]
        for k in ks:
            matrix = pairwise[f"cknna_k{k}"]
            lines += ["", f"CKNNA(row, column), k={k}", "",
                      "| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
            lines += [f"| {a} | " + " | ".join(_fmt(v) for v in row) + " |"
                      for a, row in zip(labels, matrix)]
    return "\n".join(lines) + "\n"


def heatmap(matrix: list[list[float]], labels: list[str], path: str | Path, title: str) -> None:
    """Model x model heatmap, written atomically; needs matplotlib (extra `plot`)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("heatmaps need matplotlib: pip install 'harness[plot]'") from None
    size = 1.2 + 0.9 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(matrix, cmap="viridis")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, _fmt(value), ha="center", va="center", color="white", fontsize=8)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
