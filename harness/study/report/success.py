"""The success part of a report: CKNNA against task success across models
(`harness.study.success`)."""
from __future__ import annotations

from pathlib import Path

from harness.study.report.figures import fmt, pyplot, save_figure

def rho_text(record: dict) -> str:
    """'rho = 0.43 [-0.3, 0.9] (95%, 2000 model resamples), 8 models' or why there is none."""
    if record.get("spearman_rho") is None:
        return record["note"]
    iv = record["interval"]
    return (f"Spearman rho = {fmt(record['spearman_rho'])} [{fmt(iv['low'])}, {fmt(iv['high'])}] "
            f"({iv['level']:.0%} bootstrap, {iv['draws']} resamples of the models), "
            f"{record['n_models']} models")

def short_text(record: dict) -> str:
    """A figure title's line: rho, interval and the number of models (or why none)."""
    if record.get("spearman_rho") is None:
        return f"no rho: only {record['n_models']} model(s)"
    iv = record["interval"]
    return (f"Spearman rho = {record['spearman_rho']:.2f} [{iv['low']:.2f}, {iv['high']:.2f}] "
            f"({iv['level']:.0%} bootstrap), n = {record['n_models']} models")


def success_markdown(results: dict) -> str:
    """A table of rho per k and the caveat; empty when no model has a success rate."""
    section = results.get("success")
    if not section:
        return ""
    lines = ["", f"Success rates from {section['source']}; {section['note']}", "",
             "| k | models | Spearman rho | 95% bootstrap interval |", "|---:|---:|---:|---|"]
    for k in results["_meta"]["k_values"]:
        r = section[f"k{k}"]
        iv = r.get("interval") or {}
        cell = f"[{fmt(iv.get('low'))}, {fmt(iv.get('high'))}]" if iv else r["note"]
        lines.append(f"| {k} | {r['n_models']} | {fmt(r.get('spearman_rho')) or 'not computed'} | {cell} |")
    if section.get("left_out"):
        lines += ["", f"- left out (no success rate or no CKNNA): {', '.join(section['left_out'])}"]
    return "\n".join(lines) + "\n"

def scatter_figure(panels: list[tuple[str, dict]], success_label: str = "task success"):
    """One panel per (title, correlate() record): success against CKNNA, points named."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (title, record) in zip(axes[0], panels):
        ax.scatter(record["cknna"], record["success"])
        for name, x, y in zip(record["models"], record["cknna"], record["success"]):
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{title}\n{short_text(record)}", fontsize=8)
        ax.set_xlabel(title)
        ax.set_ylabel(success_label)
    fig.tight_layout()
    return fig

def success_vs_cknna(panels: list[tuple[str, dict]], path: str | Path,
                     success_label: str = "task success") -> None:
    save_figure(scatter_figure(panels, success_label), Path(path))

def study_panels(results: dict) -> list[tuple[str, dict]]:
    return [(f"CKNNA k={k}", results["success"][f"k{k}"]) for k in results["_meta"]["k_values"]]
