"""Chance level beside every CKNNA value: the permutation null's mean under the grouping in
force, the excess over it, the p-value, and one multiple-testing correction per report.

CKNNA of unrelated data is not 0, and with episode-grouped shuffles it can be as high as
the value itself, so a bare number invites ranking noise. Every value a report shows gets a
`chance` record {"chance", "excess", "p_value", ...}; `adjust` then applies the
Benjamini-Hochberg correction across ALL of the report's p-values and marks each value
above chance or not (adjusted p < ALPHA and a positive excess).
"""
from __future__ import annotations

import math

import torch

from harness.cknna.significance import shared_null, summarise_null

ALPHA = 0.05
CORRECTION = "Benjamini-Hochberg"
MARK = "at chance"  # the words every table puts beside a value not above chance


def chance_record(observed: float, null: torch.Tensor, seed: int, grouped: bool) -> dict:
    """One value's chance level from its null draws (adjusted p added by `adjust`)."""
    s = summarise_null(observed, null, seed)
    return {"chance": s["null_mean"], "excess": s["cknna_minus_null_mean"],
            "p_value": s["p_value"], "null_std": s["null_std"],
            "n_permutations": s["n_permutations"], "seed": seed, "groups_respected": grouped}


def for_spaces(sa, sb, scores: dict, permutations: int, seed: int,
               groups: torch.Tensor | None) -> dict[int, dict]:
    """{k: chance record} of CKNNA(sa, sb) at every k of `scores` ({k: Scores}), from
    `permutations` shuffles of sa's samples (whole groups when `groups`); {} for none."""
    if not permutations:
        return {}
    nulls = shared_null(sa, sb, scores, permutations, seed, groups)  # every k in one pass
    return {k: chance_record(scores[k].cknna, nulls[k], seed, groups is not None) for k in scores}


def benjamini_hochberg(p: list[float]) -> list[float]:
    """BH-adjusted p-values (step-up, monotone, at most 1); NaN stays NaN."""
    index = [i for i, v in enumerate(p) if v is not None and not math.isnan(v)]
    order = sorted(index, key=lambda i: p[i])
    m, out = len(order), [float("nan")] * len(p)
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        out[i] = running
    return out


def model_record(m: dict, k) -> dict | None:
    """A model entry's record at k: its permutation null (with the chance level), or None."""
    return m.get("details", {}).get(f"k{k}", {}).get("permutation")


def entry_record(entry: dict, k) -> dict | None:
    """A section entry's chance record at k (its "chance": {"k5": ...}), or None."""
    return entry.get("chance", {}).get(f"k{k}")


def records(results: dict):
    """Every chance record of a results dict, with a name saying which value it belongs to."""
    ks = results["_meta"]["k_values"]
    for label, m in results.get("models", {}).items():
        for k in ks:
            perm = model_record(m, k)
            if perm and "chance" in perm:
                yield f"{label} k={k}", perm
        other = (m.get("other_same_group_setting") or {}).get("chance", {})
        for key, rec in other.items():
            yield f"{label} other same-group setting {key}", rec
        for h, entry in (m.get("horizons") or {}).items():
            for key, rec in entry.get("chance", {}).items():
                yield f"{label} horizon {h} {key}", rec
    for label, by_layer in (results.get("layers") or {}).items():
        for name, entry in by_layer.items():
            for key, rec in entry.get("chance", {}).items():
                yield f"{label} layer {name} {key}", rec
    for label, v in (results.get("views") or {}).items():
        for view, entry in v.get("against_states", {}).items():
            for key, rec in entry.get("chance", {}).items():
                yield f"{label} view {view} {key}", rec


def adjust(results: dict) -> None:
    """BH across every p-value of the results, in place: each record gets `p_adjusted` and
    `above_chance`; the model entries their flat `*_k{K}` copies; `_meta` names the method."""
    found = list(records(results))
    adjusted = benjamini_hochberg([rec["p_value"] for _, rec in found])
    for (_, rec), p_adj in zip(found, adjusted):
        rec["p_adjusted"] = p_adj
        rec["above_chance"] = bool(p_adj < ALPHA and rec["excess"] > 0)
    for m in results.get("models", {}).values():
        for k in results["_meta"]["k_values"]:
            perm = model_record(m, k)
            if perm and "chance" in perm:
                for key in ("chance", "excess", "p_adjusted", "above_chance"):
                    m[f"{key}_k{k}"] = perm[key]
    results["_meta"]["multiple_testing"] = {
        "method": CORRECTION, "alpha": ALPHA, "family_size": len(found),
        "family": "every CKNNA p-value in this results file (models, other same-group "
                  "setting, layers, views, horizons)",
        "above_chance": "adjusted p < alpha and CKNNA above its chance level"}
    if not found:
        results["_meta"]["multiple_testing"]["note"] = (
            "no permutations were run: chance levels not computed (use --permutations N)")
