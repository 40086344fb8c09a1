"""Human-readable views of a results JSON: markdown tables, figures, and the report files.

`report.md` links its figures; `report.html` (see `harness.report_html`) is the same
report with the figures embedded, one file to send to a colleague."""
from __future__ import annotations

import math
from pathlib import Path

from harness import state_input
from harness.figures import finish_axes, fmt, legend_outside, pyplot, save_figure


def nan_note(results: dict) -> str:
    """Why a number may be NaN, for the `_warning` keys beside the nulls in the JSON."""
    return "; ".join(results["_meta"].get("warnings", [])) or "not a finite number"


def p_text(p, draws: int | None) -> str:
    """A p-value; the smallest a permutation test can give, 1/(draws+1), is a bound: no
    shuffle reached the observed value, and more draws would give a smaller p."""
    if p is None or draws is None:
        return fmt(p)
    if math.isclose(p, 1 / (draws + 1), rel_tol=1e-9):
        return f"p < 1/{draws + 1}"
    return fmt(p)


def interval_text(sub: dict | None) -> str:
    if not sub:
        return ""
    return f"[{fmt(sub['low'])}, {fmt(sub['high'])}]"


def _value(m: dict, key: str) -> str:
    """A model entry's number; a key present as None is a NaN written as JSON null."""
    return "NaN" if key in m and m[key] is None else fmt(m.get(key))


def _columns(results: dict) -> list[tuple[str, callable]]:
    """(header, entry -> cell text) for every number present in some model's entry."""
    ks = results["_meta"]["k_values"]
    models = list(results["models"].values())
    has = lambda key: any(key in m for m in models)  # noqa: E731
    detail = lambda m, k, part: m.get("details", {}).get(f"k{k}", {}).get(part)  # noqa: E731
    cols = []
    for k in ks:
        cols.append((f"CKNNA k={k}", lambda m, k=k: _value(m, f"cknna_k{k}")))
        if has(f"mutual_knn_k{k}"):
            cols.append((f"mkNN k={k}", lambda m, k=k: _value(m, f"mutual_knn_k{k}")))
        if has(f"p_value_k{k}"):
            cols.append((f"p k={k}", lambda m, k=k: p_text(
                m.get(f"p_value_k{k}"), (detail(m, k, "permutation") or {}).get("n_permutations"))))
        if any(detail(m, k, "subsample") for m in models):
            level = next(detail(m, k, "subsample")["level"] for m in models
                         if detail(m, k, "subsample"))
            cols.append((f"{level:.0%} subsample interval k={k}",
                         lambda m, k=k: interval_text(detail(m, k, "subsample"))))
    for key, header in (("cka_unbiased", "CKA (unbiased)"), ("cka_biased", "CKA (biased)")):
        if has(key):
            cols.append((header, lambda m, key=key: _value(m, key)))
    return cols


def markdown_table(results: dict) -> str:
    """One row per model: CKNNA for each k against feats_B, with mutual kNN, p-values,
    subsample intervals and CKA where computed; then the pairwise matrices."""
    ks = results["_meta"]["k_values"]
    models = results["models"]
    cols = _columns(results)
    lines = ["| model | dim | " + " | ".join(c[0] for c in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for label, m in models.items():
        cells = [cell(m) for _, cell in cols]
        mark = state_input.marker(m.get("state_in_input"))
        lines.append(f"| {label}{mark} | {m.get('feats_A_dim', '')} | " + " | ".join(cells) + " |")
    notes = table_notes(results) + state_input.notes({"models": models})
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    pairwise = results.get("pairwise")
    if pairwise:
        labels = pairwise["labels"]
        for k in ks:
            matrix = pairwise[f"cknna_k{k}"]
            lines += ["", f"CKNNA(row, column), k={k}", "",
                      "| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
            lines += [f"| {a} | " + " | ".join(fmt(v) for v in row) + " |"
                      for a, row in zip(labels, matrix)]
    return "\n".join(lines) + "\n"


def table_notes(results: dict) -> list[str]:
    """How to read the p-value and interval columns, when they are there."""
    meta, notes = results["_meta"], []
    if meta.get("permutations"):
        draws = meta["permutations"]
        notes.append(f"p = (1 + #shuffles with CKNNA >= observed) / (1 + {draws}); "
                     f"'p < 1/{draws + 1}' means no shuffle of the states reached the observed "
                     "value (more permutations would resolve smaller p)")
    sub = meta.get("subsample")
    if sub:
        notes.append(f"subsample interval: percentile interval of CKNNA over {sub['draws']} "
                     f"random subsets of {sub['fraction']:g}·N samples (CKNNA at that size)")
    return notes


def _sortable(x) -> float:
    """Undefined scores (None or NaN) rank last."""
    return -math.inf if x is None or math.isnan(x) else x


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
        ranked = sorted(models, key=lambda m: _sortable(models[m].get(f"cknna_k{k}")),
                        reverse=True)
        first = rows[0] if rows else {}
        lines += ["", f"Ranking by CKNNA, k={k} (paired {first.get('level', 0.95):.0%} intervals "
                      f"from {first.get('n_draws')} shared subsets of {first.get('fraction')} of "
                      f"the {'groups' if first.get('whole_groups') else 'samples'})", "",
                  "| rank | model | CKNNA | subset interval |", "|---:|---|---:|---|"]
        for rank, m in enumerate(ranked, 1):
            sub = models[m].get("details", {}).get(f"k{k}", {}).get("subsample") or {}
            lines.append(f"| {rank} | {m} | {fmt(models[m].get(f'cknna_k{k}'))} | "
                         f"[{fmt(sub.get('low'))}, {fmt(sub.get('high'))}] |")
        lines += ["", "| a | b | CKNNA(a) - CKNNA(b) | interval | excludes 0 |",
                  "|---|---|---:|---|---|"]
        for r in rows:
            lo, hi = r["interval"]
            lines.append(f"| {r['a']} | {r['b']} | {fmt(r['difference'])} | "
                         f"[{fmt(lo)}, {fmt(hi)}] | {'yes' if r['excludes_zero'] else 'no'} |")
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
            cells += [fmt(with_), fmt(without)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ figures


def text_colour(rgba) -> str:
    """Black or white, whichever contrasts more with a cell of colour `rgba`."""
    def linear(c):
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (linear(c) for c in rgba[:3])
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "black" if (luminance + 0.05) / 0.05 > 1.05 / (luminance + 0.05) else "white"


def heatmap_figure(matrix: list[list[float]], labels: list[str], title: str):
    plt = pyplot()
    size = 1.2 + 0.9 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    values = [[float("nan") if v is None else v for v in row] for row in matrix]
    image = ax.imshow(values, cmap="viridis")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            colour = "black" if math.isnan(value) else text_colour(image.cmap(image.norm(value)))
            ax.text(j, i, fmt(value), ha="center", va="center", color=colour, fontsize=8)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def heatmap(matrix: list[list[float]], labels: list[str], path: str | Path, title: str) -> None:
    """Model x model heatmap, written atomically; needs matplotlib (a core dependency)."""
    save_figure(heatmap_figure(matrix, labels, title), Path(path))


def heatmap_k(ks: list[int]) -> int:
    """The k shown in heatmaps: 10, the seed's default, when it was computed."""
    return 10 if 10 in ks else ks[0]


def cknna_vs_k_figure(results: dict):
    """CKNNA against k, one line per model. Each model's permutation null (mean ± std)
    is a dotted error bar in its colour, set beside the others at each k: the nulls of
    different models are nearly equal, so lines through them would lie on each other."""
    plt = pyplot()
    ks = results["_meta"]["k_values"]
    models = results["models"]
    fig, ax = plt.subplots(figsize=(8, 4))
    x = list(range(len(ks)))
    width = 0.5 / max(len(models), 1)
    for i, (label, m) in enumerate(models.items()):
        line, = ax.plot(x, [m[f"cknna_k{k}"] for k in ks], marker="o", label=label)
        nulls = [m["details"][f"k{k}"].get("permutation") for k in ks]
        if all(nulls):
            shift = (i - (len(models) - 1) / 2) * width
            bars = ax.errorbar([p + shift for p in x], [n["null_mean"] for n in nulls],
                               yerr=[n["null_std"] for n in nulls], fmt="x", capsize=2,
                               color=line.get_color(), label=f"{label}: null mean ± std")
            bars[-1][0].set_linestyle(":")
    ax.set_xticks(x, [str(k) for k in ks])
    finish_axes(ax, "CKNNA vs k (x: permutation null mean ± std, beside each k per model)", "k (neighbours)", "CKNNA(model, states)")
    return fig


def cknna_vs_k(results: dict, path: str | Path) -> None:
    save_figure(cknna_vs_k_figure(results), Path(path))


def layer_curves_figure(results: dict):
    """Per-layer CKNNA against the states for every model whose layers were swept."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    ks = results["_meta"]["k_values"]
    if len(results["layers"]) > 1:  # several families: one line each, at the heatmap's k
        ks = [heatmap_k(ks)]
    for label, by_layer in results["layers"].items():
        names = sorted(by_layer, key=lambda n: int(n) if n.lstrip("-").isdigit() else 10**6)
        for k in ks:
            ax.plot(range(len(names)), [by_layer[n][f"k{k}"] for n in names], marker="o",
                    label=f"{label} k={k}")
        ax.set_xticks(range(len(names)), names)
    finish_axes(ax, "CKNNA of each layer against the states", "hidden_states index", "CKNNA(layer, states)")
    return fig


def layer_curves(results: dict, path: str | Path) -> None:
    save_figure(layer_curves_figure(results), Path(path))


VIEW_LABELS = {"full": "full (feats_A)", "image": "image tokens", "text": "task tokens",
               "action": "action expert"}


def views_markdown(results: dict) -> str:
    """The modality split (full / image / text) and action representations: each view
    against the states, and every pair of views of one model."""
    views = results.get("views")
    if not views:
        return ""
    ks = results["_meta"]["k_values"]
    head = " | ".join(f"k={k}" for k in ks)
    lines = ["CKNNA of each view against the states:", "",
             f"| model | view | {head} |", "|---|---|" + "---:|" * len(ks)]
    for model, v in views.items():
        for view, by_k in v["against_states"].items():
            mark = state_input.marker((v.get("state_in_input") or {}).get(view))
            lines.append(f"| {model} | {VIEW_LABELS.get(view, view)}{mark} | "
                         + " | ".join(fmt(by_k[f"k{k}"]) for k in ks) + " |")
    lines += ["", "CKNNA between two views of the same model (same samples):", "",
              f"| model | views | {head} |", "|---|---|" + "---:|" * len(ks)]
    for model, v in views.items():
        for pair, by_k in v["pairs"].items():
            a, b = pair.split("~")
            lines.append(f"| {model} | {VIEW_LABELS.get(a, a)} vs {VIEW_LABELS.get(b, b)} | "
                         + " | ".join(fmt(by_k[f"k{k}"]) for k in ks) + " |")
    n_all = results["_meta"]["N"]
    notes = [f"{model}: the task-token view is compared on the {v['samples']['text']} of "
             f"{n_all} samples that have a task (an empty task has no text view)"
             for model, v in views.items() if (v.get("samples") or {}).get("text", n_all) < n_all]
    notes += [f"{model}: {v['text_fallback_samples']} of {n_all} samples have no task tokens "
              "(empty task or not found); an empty task is left out of the text view, a task "
              "not found in the prompt falls back to the mean over the prompt's non-image "
              "tokens (listed in the extraction metadata; `drop_empty_tasks = true` leaves "
              "empty tasks out everywhere)"
              for model, v in views.items() if v.get("text_fallback_samples")]
    notes += state_input.notes({"views": views})
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def views_figure(results: dict):
    """Bars: CKNNA against the states of each view, per model, at the heatmap's k."""
    plt = pyplot()
    k = heatmap_k(results["_meta"]["k_values"])
    views = results["views"]
    names = [v for v in ("full", "image", "text", "action")
             if any(v in m["against_states"] for m in views.values())]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(names), 1)
    for j, view in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(views))]
        ys = [m["against_states"].get(view, {}).get(f"k{k}") for m in views.values()]
        ax.bar(xs, [float("nan") if y is None else y for y in ys], width,
               label=VIEW_LABELS[view])
    ax.set_xticks(range(len(views)), list(views), rotation=20, ha="right")
    finish_axes(ax, f"CKNNA against the states by representation, k={k}", None, "CKNNA(view, states)")
    return fig


# ------------------------------------------------------------------ report files

FIGURE_CAPTIONS = {
    "cknna_vs_k": "CKNNA against k for each model, with each model's permutation null mean",
    "heatmap": "CKNNA(row, column) between models",
    "layers": "CKNNA of each layer against the states",
    "views": "CKNNA against the states of the full, image, text and action representations",
    "cknna_vs_horizon": "CKNNA against the states t..t+a (flattened) for each horizon a",
    "success_vs_cknna": "Task success against CKNNA, one point per model, with Spearman's rho",
}


def report_files(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """The files `write_report` writes for these results, by name, in report order."""
    out = Path(out_dir)
    files = {"json": out / "results.json", "markdown": out / "report.md",
             "html": out / "report.html", "cknna_vs_k": out / "cknna_vs_k.png"}
    if results.get("pairwise"):
        files["heatmap"] = out / "heatmap.png"
    if results.get("layers"):
        files["layers"] = out / "layers.png"
    if results.get("views"):
        files["views"] = out / "views.png"
    if (results["_meta"].get("horizons") or {}).get("horizons"):
        files["cknna_vs_horizon"] = out / "cknna_vs_horizon.png"
    if results.get("success"):
        files["success_vs_cknna"] = out / "success_vs_cknna.png"
    return files


def study_markdown(results: dict, figures: dict[str, str] | None = None) -> str:
    """The study report: notice, per-model status, the tables, the figures (`{name:
    relative path}`), and where the numbers came from."""
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
    if views_markdown(results):
        lines += ["## Modality split and action representations", "",
                  "From the same forward as feats_A: the mean over the image tokens only and "
                  "over the task's tokens only; the action representation is Pi0's action "
                  "expert (final norm, last denoising step, action tokens).", "",
                  views_markdown(results)]
    lines += extra_sections(results)
    ks = meta["k_values"]
    for label, by_layer in results.get("layers", {}).items():
        lines += [f"## Per-layer CKNNA: {label}", "",
                  "| hidden_states index | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---|" + "---:|" * len(ks)]
        lines += [f"| {n} | " + " | ".join(fmt(v[f"k{k}"]) for k in ks) + " |"
                  for n, v in by_layer.items()]
        lines.append("")
    if figures:
        lines += ["## Figures", ""]
        for name, rel in figures.items():
            lines += [f"![{FIGURE_CAPTIONS[name]}]({rel})", ""]
    if meta.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in meta["warnings"]] + [""]
    return "\n".join(lines)


def extra_sections(results: dict) -> list[str]:
    """Horizons and task success, when the study has them."""
    from harness.report_horizons import horizon_markdown
    from harness.report_success import success_markdown

    lines = []
    if horizon_markdown(results):
        lines += ["## CKNNA against future states (horizons)", horizon_markdown(results)]
    if success_markdown(results):
        lines += ["## CKNNA and task success across models", success_markdown(results)]
    return lines


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """results.json, the figures, report.md (linking them) and report.html (embedding
    them), each written atomically; returns `report_files`."""
    from harness.io import write_json, write_text
    from harness.report_html import markdown_to_html

    files = report_files(results, out_dir)
    write_json(files["json"], results, nan_note=nan_note(results))
    cknna_vs_k(results, files["cknna_vs_k"])
    if "heatmap" in files:
        k = heatmap_k(results["_meta"]["k_values"])
        heatmap(results["pairwise"][f"cknna_k{k}"], results["pairwise"]["labels"],
                files["heatmap"], f"CKNNA(row, column), k={k}")
    if "layers" in files:
        layer_curves(results, files["layers"])
    if "views" in files:
        save_figure(views_figure(results), files["views"])
    if "cknna_vs_horizon" in files:
        from harness.report_horizons import cknna_vs_horizon
        cknna_vs_horizon(results, files["cknna_vs_horizon"])
    if "success_vs_cknna" in files:
        from harness.report_success import study_panels, success_vs_cknna
        success_vs_cknna(study_panels(results), files["success_vs_cknna"])
    figures = {name: path.name for name, path in files.items() if name in FIGURE_CAPTIONS}
    markdown = study_markdown(results, figures)
    write_text(files["markdown"], markdown)
    write_text(files["html"], markdown_to_html(markdown, Path(out_dir), "CKNNA study report"))
    return files
