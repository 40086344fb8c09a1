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
        cells = ["NaN" if key in m and m[key] is None else _fmt(m.get(key)) for _, key in cols]
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


def comparison_markdown(results: dict) -> str:
    """Models ranked by CKNNA at each k, and every pair's paired difference with its
    interval: a ranking the data support is one whose intervals exclude 0."""
    comparisons = results.get("comparisons")
    if not comparisons:
        return ""
    lines = []
    for key, rows in comparisons.items():
        k = key.removeprefix("k")
        models = results["models"]
        ranked = sorted(models, key=lambda m: -math.inf if models[m].get(f"cknna_k{k}") is None
                        else models[m][f"cknna_k{k}"], reverse=True)
        first = rows[0] if rows else {}
        lines += ["", f"Ranking by CKNNA, k={k} (paired {first.get('level', 0.95):.0%} intervals "
                      f"from {first.get('n_draws')} shared subsets of {first.get('fraction')} of "
                      f"the {'groups' if first.get('whole_groups') else 'samples'})", "",
                  "| rank | model | CKNNA | subset interval |", "|---:|---|---:|---|"]
        for rank, m in enumerate(ranked, 1):
            sub = models[m].get("details", {}).get(f"k{k}", {}).get("subsample") or {}
            lines.append(f"| {rank} | {m} | {_fmt(models[m].get(f'cknna_k{k}'))} | "
                         f"[{_fmt(sub.get('low'))}, {_fmt(sub.get('high'))}] |")
        lines += ["", "| a | b | CKNNA(a) - CKNNA(b) | interval | excludes 0 |",
                  "|---|---|---:|---|---|"]
        for r in rows:
            lo, hi = r["interval"]
            lines.append(f"| {r['a']} | {r['b']} | {_fmt(r['difference'])} | "
                         f"[{_fmt(lo)}, {_fmt(hi)}] | {'yes' if r['excludes_zero'] else 'no'} |")
    return "\n".join(lines) + "\n"


def same_group_markdown(results: dict) -> str:
    """CKNNA with and without same-group (e.g. same-episode) neighbours, side by side."""
    models = results["models"]
    if not any("other_same_group_setting" in m for m in models.values()):
        return ""
    ks = results["_meta"]["k_values"]
    excluded_main = (results["_meta"].get("groups") or {}).get("exclude_same_group", False)
    lines = ["| model | " + " | ".join(f"k={k} with | k={k} without" for k in ks) + " |",
             "|---|" + "---:|---:|" * len(ks)]
    for label, m in models.items():
        other = m.get("other_same_group_setting")
        if other is None:
            continue
        cells = []
        for k in ks:
            with_, without = (other[f"cknna_k{k}"], m[f"cknna_k{k}"]) if excluded_main else (
                m[f"cknna_k{k}"], other[f"cknna_k{k}"])
            cells += [_fmt(with_), _fmt(without)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def heatmap(matrix: list[list[float]], labels: list[str], path: str | Path, title: str) -> None:
    """Model x model heatmap, written atomically; needs matplotlib (extra `plot`)."""
    plt = _plt()
    matrix = [[float("nan") if v is None else v for v in row] for row in matrix]  # JSON nulls
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
    _save(fig, Path(path))
    plt.close(fig)


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'harness[plot]'") from None
    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def _finish(plt, fig, ax, xlabel: str, ylabel: str, path) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)


def heatmap_k(ks: list[int]) -> int:
    """The k shown in heatmaps: 10, the seed's default, when it was computed."""
    return 10 if 10 in ks else ks[0]


def cknna_vs_k(results: dict, path: str | Path) -> None:
    """CKNNA against k, one line per model (with the permutation null mean when present)."""
    plt = _plt()
    ks = results["_meta"]["k_values"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, m in results["models"].items():
        line, = ax.plot(ks, [m[f"cknna_k{k}"] for k in ks], marker="o", label=label)
        null = [m["details"][f"k{k}"].get("permutation", {}).get("null_mean") for k in ks]
        if all(v is not None for v in null):
            ax.plot(ks, null, linestyle=":", color=line.get_color())
    ax.set_title("CKNNA vs k (dotted: permutation null mean)")
    _finish(plt, fig, ax, "k", "CKNNA(model, states)", path)


def layer_curves(results: dict, path: str | Path) -> None:
    """Per-layer CKNNA against the states for every model whose layers were swept."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, by_layer in results["layers"].items():
        names = sorted(by_layer, key=lambda n: int(n) if n.lstrip("-").isdigit() else 10**6)
        for k in results["_meta"]["k_values"]:
            ax.plot(range(len(names)), [by_layer[n][f"k{k}"] for n in names], marker="o",
                    label=f"{label} k={k}")
        ax.set_xticks(range(len(names)), names)
    _finish(plt, fig, ax, "hidden_states index", "CKNNA(layer, states)", path)


def study_markdown(results: dict) -> str:
    """The study report: notice, per-model status, the tables, and where numbers came from."""
    meta, study = results["_meta"], results["_meta"].get("study", {})
    lines = ["# CKNNA study report", ""]
    if study.get("notice"):
        lines += [f"**{study['notice']}**", ""]
    lines += [f"- data: `{study.get('data_dir')}` ({meta['N']} samples, "
              f"fingerprint `{study.get('dataset_fingerprint')}`)",
              f"- config: {study.get('config')}",
              f"- states: row L2-normalised, z-scored: {meta['preprocessing']['feats_B_zscored']}",
              f"- permutations: {meta['permutations']} (seed {meta['seed']}); "
              f"kNN tie rule: {meta['knn']['tie_rule']}",
              f"- code: git {meta.get('git')}, versions {meta.get('versions')}", "",
              "## Models", "", "| model | status | detail |", "|---|---|---|"]
    for name, st in study.get("models", {}).items():
        detail = st.get("error", "").replace("\n", " ")[-300:] if st["status"] == "failed" else (
            st.get("feats_A_path", ""))
        lines.append(f"| {name} | {st['status']} | {detail} |")
    lines += ["", "## CKNNA against the states", "", markdown_table(results)]
    if same_group_markdown(results):
        lines += ["## With and without same-episode neighbours", "",
                  "Frames of one episode share scene and task, so both spaces can pair them up; "
                  "'without' never lets two samples of one group be neighbours.", "",
                  same_group_markdown(results)]
    if comparison_markdown(results):
        lines += ["## Model comparisons", comparison_markdown(results)]
    ks = meta["k_values"]
    for label, by_layer in results.get("layers", {}).items():
        lines += [f"## Per-layer CKNNA: {label}", "",
                  "| hidden_states index | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---|" + "---:|" * len(ks)]
        lines += [f"| {n} | " + " | ".join(_fmt(v[f"k{k}"]) for k in ks) + " |"
                  for n, v in by_layer.items()]
        lines.append("")
    return "\n".join(lines)


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """results.json, report.md and the figures, each written atomically."""
    from harness.io import write_json, write_text

    out = Path(out_dir)
    files = {"json": out / "results.json", "markdown": out / "report.md",
             "cknna_vs_k": out / "cknna_vs_k.png"}
    write_json(files["json"], results)
    write_text(files["markdown"], study_markdown(results))
    cknna_vs_k(results, files["cknna_vs_k"])
    if results.get("pairwise"):
        k = heatmap_k(results["_meta"]["k_values"])
        files["heatmap"] = out / "heatmap.png"
        heatmap(results["pairwise"][f"cknna_k{k}"], results["pairwise"]["labels"],
                files["heatmap"], f"CKNNA(row, column), k={k}")
    if results.get("layers"):
        files["layers"] = out / "layers.png"
        layer_curves(results, files["layers"])
    return files
