"""Human-readable views of a results JSON: markdown tables, figures, and the report files.

`report.md` links its figures; `report.html` (see `harness.study.report.html`) is the same
report with the figures embedded, one file to send to a colleague."""
from __future__ import annotations

import math
from pathlib import Path

from harness.extractors.engine import state_input
from harness.cknna.chance import MARK, entry_record, model_record
from harness.study.report.cells import chance_cell, p_text, signed, verdict
from harness.study.report.figures import (BAND_NOTE, Z95, chance_band, finish_axes, fmt, legend_outside,
                             pyplot, save_figure, value_errors)


def nan_note(results: dict) -> str:
    """Why a number may be NaN, for the `_warning` keys beside the nulls in the JSON."""
    return "; ".join(results["_meta"].get("warnings", [])) or "not a finite number"


def interval_text(sub: dict | None) -> str:
    if not sub:
        return ""
    return f"[{fmt(sub['low'])}, {fmt(sub['high'])}]"


def _value(m: dict, key: str) -> str:
    """A model entry's number; a key present as None is a NaN written as JSON null."""
    return "NaN" if key in m and m[key] is None else fmt(m.get(key))


def _sub(m: dict, k) -> dict | None:
    return m.get("details", {}).get(f"k{k}", {}).get("subsample")


def _columns(results: dict) -> list[tuple[str, callable]]:
    """(header, (entry, k) -> cell text) for every number present in some model's entry."""
    ks = results["_meta"]["k_values"]
    models = list(results["models"].values())
    has = lambda key: any(f"{key}_k{k}" in m for m in models for k in ks)  # noqa: E731
    cols = [("CKNNA", lambda m, k: _value(m, f"cknna_k{k}"))]
    if any(model_record(m, k) for m in models for k in ks):
        perm = lambda m, k: model_record(m, k) or {}  # noqa: E731
        cols += [("chance (null mean)",
                  lambda m, k: fmt(perm(m, k).get("chance", perm(m, k).get("null_mean")))),
                 ("excess", lambda m, k: signed(perm(m, k).get("excess"))),
                 ("p", lambda m, k: p_text(m.get(f"p_value_k{k}"), perm(m, k).get("n_permutations"))),
                 ("p adj. (BH)", lambda m, k: fmt(perm(m, k).get("p_adjusted"))),
                 ("vs chance", lambda m, k: verdict(model_record(m, k)))]
    if has("mutual_knn"):
        cols.append(("mkNN", lambda m, k: _value(m, f"mutual_knn_k{k}")))
    levels = [_sub(m, k)["level"] for m in models for k in ks if _sub(m, k)]
    if levels:
        cols.append((f"{levels[0]:.0%} interval of CKNNA", lambda m, k: interval_text(_sub(m, k))))
    for key, header in (("cka_unbiased", "CKA (unbiased)"), ("cka_biased", "CKA (biased)")):
        if any(key in m for m in models):
            cols.append((header, lambda m, k, key=key: _value(m, key)))
    return cols


def markdown_table(results: dict) -> str:
    """One row per model and k: CKNNA against feats_B with its chance level, excess,
    p-values (raw and adjusted) and verdict, mutual kNN, the interval and CKA where
    computed; then the pairwise matrices."""
    ks = results["_meta"]["k_values"]
    models = results["models"]
    cols = _columns(results)
    lines = ["| model | dim | k | " + " | ".join(c[0] for c in cols) + " |",
             "|---|---:|---:|" + "".join("---|" if c[0] == "vs chance" else "---:|" for c in cols)]
    for label, m in models.items():
        mark = state_input.marker(m.get("state_in_input"))
        for k in ks:
            cells = [cell(m, k) for _, cell in cols]
            lines.append(f"| {label}{mark} | {m.get('feats_A_dim', '')} | {k} | "
                         + " | ".join(cells) + " |")
    notes = table_notes(results) + state_input.notes({"models": models})
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    pairwise = results.get("pairwise")
    if pairwise:
        labels = pairwise["labels"]
        for k in ks:
            matrix = pairwise[f"cknna_k{k}"]
            lines += ["", f"CKNNA(row, column), k={k} (model against model: no chance level)", "",
                      "| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
            lines += [f"| {a} | " + " | ".join(fmt(v) for v in row) + " |"
                      for a, row in zip(labels, matrix)]
    return "\n".join(lines) + "\n"


def table_notes(results: dict) -> list[str]:
    """How to read the chance, p-value and interval columns, and how samples were treated."""
    meta, notes = results["_meta"], []
    if meta.get("permutations"):
        draws = meta["permutations"]
        grouped = "whole groups of" if meta.get("groups") else "the"
        notes.append(f"chance = mean CKNNA over {draws} shuffles of {grouped} samples (what "
                     "unrelated features score here; it is not 0); excess = CKNNA - chance")
        notes.append(f"p = (1 + #shuffles with CKNNA >= observed) / (1 + {draws}); "
                     f"'p < 1/{draws + 1}' means no shuffle of the states reached the observed "
                     "value (more permutations would resolve smaller p)")
        mt = meta.get("multiple_testing") or {}
        if mt:
            notes.append(f"p adj.: {mt['method']} correction over all {mt['family_size']} "
                         f"p-values of these results; '{MARK}' marks a value whose adjusted p "
                         f"is >= {mt['alpha']} or that is not above its chance level")
    else:
        notes.append("chance level not computed (no permutations): CKNNA of unrelated data "
                     "is not 0, so a bare value cannot be read alone; add --permutations 100")
    if meta.get("samples") and not meta.get("groups"):
        notes.append(meta["samples"] + (f"; {meta['groups_available']}"
                                        if meta.get("groups_available") else ""))
    sub = meta.get("subsample")
    if sub:
        notes.append(f"interval: for the full-sample CKNNA shown, from {sub['draws']} random "
                     f"subsets of {sub['fraction']:g}·N and {sub['draws']} of "
                     f"{sub['fraction'] / 2:g}·N (subsampling with an estimated rate; "
                     "see the README)")
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
                      f"from {first.get('n_draws')} shared subsets of {first.get('fraction')} and "
                      f"as many of half that of the "
                      f"{'groups' if first.get('whole_groups') else 'samples'})", "",
                  "| rank | model | CKNNA | interval |", "|---:|---|---:|---|"]
        for rank, m in enumerate(ranked, 1):
            sub = _sub(models[m], k) or {}
            lines.append(f"| {rank} | {m} | "
                         f"{chance_cell(models[m].get(f'cknna_k{k}'), model_record(models[m], k))} | "
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
            main = chance_cell(m[f"cknna_k{k}"], model_record(m, k))
            second = chance_cell(other[f"cknna_k{k}"], entry_record(other, k))
            cells += [second, main] if excluded_main else [main, second]
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
    """CKNNA against k, one line per model, with its full-sample interval as error bars
    when computed, and its chance level (null mean ± 1.96 sd) as a band in its colour."""
    plt = pyplot()
    ks = results["_meta"]["k_values"]
    models = results["models"]
    fig, ax = plt.subplots(figsize=(8, 4))
    x = list(range(len(ks)))
    for label, m in models.items():
        ys = [m[f"cknna_k{k}"] for k in ks]
        subs = [_sub(m, k) for k in ks]
        errors = None
        if all(subs):
            errors = [[y - s["low"] for y, s in zip(ys, subs)],
                      [s["high"] - y for y, s in zip(ys, subs)]]
        line = ax.errorbar(x, ys, yerr=errors, marker="o", capsize=3, label=label)
        chance_band(ax, x, [model_record(m, k) for k in ks], line[0].get_color())
    ax.set_xticks(x, [str(k) for k in ks])
    what = "error bars: 95% interval; " if any(_sub(m, ks[0]) for m in models.values()) else ""
    finish_axes(ax, f"CKNNA vs k ({what}{BAND_NOTE})", "k (neighbours)", "CKNNA(model, states)")
    return fig


def cknna_vs_k(results: dict, path: str | Path) -> None:
    save_figure(cknna_vs_k_figure(results), Path(path))


def layer_curves_figure(results: dict):
    """Per-layer CKNNA against the states for every model whose layers were swept, with
    each layer's chance band and error bars of its null's spread."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    ks = results["_meta"]["k_values"]
    if len(results["layers"]) > 1:  # several families: one line each, at the heatmap's k
        ks = [heatmap_k(ks)]
    for label, by_layer in results["layers"].items():
        names = sorted(by_layer, key=lambda n: int(n) if n.lstrip("-").isdigit() else 10**6)
        xs = list(range(len(names)))
        for k in ks:
            ys = [by_layer[n][f"k{k}"] for n in names]
            recs = [entry_record(by_layer[n], k) for n in names]
            line = ax.errorbar(xs, ys, yerr=value_errors(recs), marker="o", capsize=3,
                               label=f"{label} k={k}")
            chance_band(ax, xs, recs, line[0].get_color())
        ax.set_xticks(xs, names)
    finish_axes(ax, f"CKNNA of each layer against the states\n(error bars: ±1.96 null sd; "
                f"{BAND_NOTE})", "hidden_states index", "CKNNA(layer, states)")
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
                         + " | ".join(chance_cell(by_k[f"k{k}"], entry_record(by_k, k))
                                      for k in ks) + " |")
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
        recs = [entry_record(m["against_states"].get(view, {}), k)
                for m in views.values()]
        ys = [float("nan") if y is None else y for y in ys]
        errors = [Z95 * r["null_std"] if r else 0.0 for r in recs]
        ax.bar(xs, ys, width, yerr=errors, capsize=2, label=VIEW_LABELS[view])
        for x, r in zip(xs, recs):  # each bar's chance band, as a grey span across it
            if r:
                lo, hi = r["chance"] - Z95 * r["null_std"], r["chance"] + Z95 * r["null_std"]
                ax.fill_between([x - width / 2, x + width / 2], [lo, lo], [hi, hi],
                                color="black", alpha=0.25, linewidth=0)
    ax.set_xticks(range(len(views)), list(views), rotation=20, ha="right")
    finish_axes(ax, f"CKNNA against the states by representation, k={k}\n(error bars: ±1.96 "
                "null sd; grey: chance, mean ± 1.96 sd)", None, "CKNNA(view, states)")
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
    lines += ["", "## CKNNA against the states", "", READING["states"], "",
              markdown_table(results)]
    same_group, comparisons, views = (section(results) for section in (
        same_group_markdown, comparison_markdown, views_markdown))
    if same_group:
        lines += ["## With and without same-episode neighbours", "",
                  "Frames of one episode share scene and task, so both spaces can pair them up; "
                  "'without' never lets two samples of one group be neighbours.", "",
                  READING["same_group"], "", same_group]
    if comparisons:
        lines += ["## Model comparisons", "", READING["comparisons"], comparisons]
    if views:
        lines += ["## Modality split and action representations", "",
                  "From the same forward as feats_A: the mean over the image tokens only and "
                  "over the task's tokens only; the action representation is Pi0's action "
                  "expert (final norm, last denoising step, action tokens).", "",
                  READING["views"], "", views]
    lines += extra_sections(results)
    ks = meta["k_values"]
    for label, by_layer in results.get("layers", {}).items():
        lines += [f"## Per-layer CKNNA: {label}", "", READING["layers"], "",
                  "| hidden_states index | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---|" + "---:|" * len(ks)]
        lines += [f"| {n} | " + " | ".join(chance_cell(v[f"k{k}"], entry_record(v, k))
                                           for k in ks) + " |"
                  for n, v in by_layer.items()]
        lines.append("")
    if figures:
        lines += ["## Figures", ""]
        for name, rel in figures.items():
            lines += [f"![{FIGURE_CAPTIONS[name]}]({rel})", ""]
    if meta.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in meta["warnings"]] + [""]
    return "\n".join(lines)


# One plain-language paragraph per section: what its numbers do and do not show.
READING = {
    "states": "How far each model's nearest-neighbour structure matches the states'. Read "
              "a value against its chance level, the score of the same features against "
              "shuffled states (it is far from 0 when samples come in episodes); only the "
              "excess over chance says something, and only a value marked 'above chance' "
              "is distinguishable from it after the correction for the many p-values "
              "here. Differences between models smaller than the interval or the null's "
              "spread are not a ranking.",
    "same_group": "A large drop from 'with' to 'without' means most of the agreement comes "
                  "from frames of one episode finding each other in both spaces (same scene, "
                  "same task), not from the model tracking the robot's state across "
                  "episodes; 'without' is the stricter test. Each value has its own chance "
                  "level under the same setting.",
    "comparisons": "Paired differences on the same subsets: an interval that excludes 0 is a "
                   "difference the data support; overlapping values with intervals that "
                   "include 0 are ties, whatever their order.",
    "views": "Each view against the states with its chance level; view-to-view values "
             "compare two representations of the same samples (no chance level). A view at "
             "chance carries no detectable state information at this N.",
    "horizons": "Whether features match the states a few steps ahead as well as now. Later "
                "horizons repeat the last state for samples near an episode's end (counts "
                "below), which makes those samples look alike; small changes across a are "
                "within the null's spread unless marked above chance.",
    "layers": "Each layer against the states, with its chance level. Differences between "
              "layers of a few thousandths are about one null standard deviation: a trend "
              "across layers is real only where the values clear their chance level by more "
              "than that.",
}


def extra_sections(results: dict) -> list[str]:
    """Horizons and task success, when the study has them."""
    from harness.study.report.horizons import horizon_markdown
    from harness.study.report.success import success_markdown

    lines = []
    if horizon_markdown(results):
        lines += ["## CKNNA against future states (horizons)", "", READING["horizons"],
                  horizon_markdown(results)]
    if success_markdown(results):
        lines += ["## CKNNA and task success across models", success_markdown(results)]
    return lines


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """results.json, the figures, report.md (linking them) and report.html (embedding
    them), each written atomically; returns `report_files`."""
    from harness.io import write_json, write_text
    from harness.study.report.html import markdown_to_html

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
        from harness.study.report.horizons import cknna_vs_horizon
        cknna_vs_horizon(results, files["cknna_vs_horizon"])
    if "success_vs_cknna" in files:
        from harness.study.report.success import study_panels, success_vs_cknna
        success_vs_cknna(study_panels(results), files["success_vs_cknna"])
    figures = {name: path.name for name, path in files.items() if name in FIGURE_CAPTIONS}
    markdown = study_markdown(results, figures)
    write_text(files["markdown"], markdown)
    write_text(files["html"], markdown_to_html(markdown, Path(out_dir), "CKNNA study report"))
    return files
