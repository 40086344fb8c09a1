"""The horizon part of a report: CKNNA against future states t..t+a (`harness.cknna.horizons`)."""
from __future__ import annotations

from pathlib import Path

from harness.cknna.chance import entry_record
from harness.study.report.figures import BAND_NOTE, chance_band, finish_axes, pyplot, save_figure, value_errors
from harness.study.report.cells import chance_cell


def _horizons(results: dict) -> list[int]:
    return (results["_meta"].get("horizons") or {}).get("horizons", [])

def _head(a: int, padded) -> str:
    """A horizon's column header, with how many samples repeat their episode's last state."""
    return f"a={a} ({padded[a]} padded)" if padded and a < len(padded) else f"a={a}"


def horizon_markdown(results: dict) -> str:
    """One row per model and k, one column per horizon; empty without horizon scores."""
    horizons = _horizons(results)
    if not horizons:
        return ""
    meta = results["_meta"]["horizons"]
    lines = ["", "CKNNA(model, states t..t+a) for each horizon a "
             f"({meta['flatten']}; z-scored per column: {meta['zscored_per_column']})", "",
             "| model | k | " + " | ".join(_head(a, meta.get("padded_per_step")) for a in horizons)
             + " |",
             "|---|---:|" + "---:|" * len(horizons)]
    for label, m in results["models"].items():
        by_h = m.get("horizons")
        if not by_h:
            continue
        for k in results["_meta"]["k_values"]:
            lines.append(f"| {label} | {k} | " + " | ".join(
                chance_cell(by_h[f"h{a}"][f"cknna_k{k}"], entry_record(by_h[f"h{a}"], k))
                for a in horizons) + " |")
    padded = meta.get("padded_per_step")
    if padded:
        shown = ", ".join(f"a={a}: {padded[a]}" for a in horizons if a < len(padded))
        lines += ["", f"- samples whose step a lies past their episode's end (last state "
                      f"repeated): {shown}"]
    return "\n".join(lines) + "\n"

def cknna_vs_horizon_figure(results: dict):
    """CKNNA against horizon: one colour per model, one line style per k, with error bars
    of each value's null spread and chance bands; the x labels count padded samples."""
    plt = pyplot()
    horizons, ks = _horizons(results), results["_meta"]["k_values"]
    fig, ax = plt.subplots(figsize=(8, 4))
    styles = ["-", "--", ":", "-."]
    for i, (label, m) in enumerate(results["models"].items()):
        by_h = m.get("horizons")
        if not by_h:
            continue
        colour = f"C{i % 10}"
        for j, k in enumerate(ks):
            ys = [by_h[f"h{a}"][f"cknna_k{k}"] for a in horizons]
            recs = [entry_record(by_h[f"h{a}"], k) for a in horizons]
            ax.errorbar(horizons, ys, yerr=value_errors(recs), marker="o", capsize=2,
                        color=colour, linestyle=styles[j % len(styles)], label=f"{label} k={k}")
            chance_band(ax, horizons, recs, colour)
    padded = (results["_meta"].get("horizons") or {}).get("padded_per_step") or []
    ax.set_xticks(horizons, [str(a) for a in horizons])
    counts = ", ".join(f"a={a}: {padded[a]}" for a in horizons if a < len(padded))
    finish_axes(ax, f"CKNNA against future states t..t+a\n(error bars: ±1.96 null sd; {BAND_NOTE})",
                "horizon a (steps ahead, same episode)" + (
                    f"\nsamples padded (step a past the episode's end, last state repeated): "
                    f"{counts}" if counts else ""), "CKNNA(model, states t..t+a)")
    return fig


def cknna_vs_horizon(results: dict, path: str | Path) -> None:
    save_figure(cknna_vs_horizon_figure(results), Path(path))
