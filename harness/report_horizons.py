"""The horizon part of a report: CKNNA against future states t..t+a (`harness.horizons`)."""
from __future__ import annotations

from pathlib import Path

from harness.figures import finish_axes, fmt, pyplot, save_figure

def _horizons(results: dict) -> list[int]:
    return (results["_meta"].get("horizons") or {}).get("horizons", [])

def horizon_markdown(results: dict) -> str:
    """One row per model and k, one column per horizon; empty without horizon scores."""
    horizons = _horizons(results)
    if not horizons:
        return ""
    meta = results["_meta"]["horizons"]
    lines = ["", "CKNNA(model, states t..t+a) for each horizon a "
             f"({meta['flatten']}; z-scored per column: {meta['zscored_per_column']})", "",
             "| model | k | " + " | ".join(f"a={a}" for a in horizons) + " |",
             "|---|---:|" + "---:|" * len(horizons)]
    for label, m in results["models"].items():
        by_h = m.get("horizons")
        if not by_h:
            continue
        for k in results["_meta"]["k_values"]:
            lines.append(f"| {label} | {k} | "
                         + " | ".join(fmt(by_h[f"h{a}"][f"cknna_k{k}"]) for a in horizons) + " |")
    padded = meta.get("padded_per_step")
    if padded:
        shown = ", ".join(f"a={a}: {padded[a]}" for a in horizons if a < len(padded))
        lines += ["", f"- samples whose step a lies past their episode's end (last state "
                      f"repeated): {shown}"]
    return "\n".join(lines) + "\n"

def cknna_vs_horizon_figure(results: dict):
    """CKNNA against horizon: one colour per model, one line style per k."""
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
            ax.plot(horizons, [by_h[f"h{a}"][f"cknna_k{k}"] for a in horizons], marker="o",
                    color=colour, linestyle=styles[j % len(styles)], label=f"{label} k={k}")
    ax.set_xticks(horizons, [str(a) for a in horizons])
    finish_axes(ax, "CKNNA against future states t..t+a", "horizon a (steps ahead, same episode)",
            "CKNNA(model, states t..t+a)")
    return fig


def cknna_vs_horizon(results: dict, path: str | Path) -> None:
    save_figure(cknna_vs_horizon_figure(results), Path(path))
