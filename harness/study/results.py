"""The results JSON: the seed's compute_cknna.py layout, plus what makes it traceable.

`{"_meta": {...}, "models": {label: {"feats_A_path", "feats_A_dim", "cknna_k5", ...}}}`
keeps the seed's keys and nesting; extras sit beside them (details per k, pairwise
matrix, per-layer scores, provenance), so existing readers keep working."""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field

import torch

from harness.cknna import chance
from harness.cknna import core as metrics
from harness import provenance
from harness.cknna import significance
from harness.errors import HarnessError
from harness.data.states import l2_rows  # noqa: F401  (its home is harness.data.states)

TIE_RULES = {
    "shared": "rows L2-normalised in float64, similarities re-scored in float64; neighbours "
              "tied (within 4*2^-23 of |x_i| max|x_j|, the rounding of float32 inputs) at "
              "the k-th place share the remaining slots, M = min(w_A, w_B): invariant to "
              "sample order",
    "index": "neighbours ordered by similarity, equal similarities -> lower sample index first",
}
TIE_RULE = TIE_RULES["index"]
INDEPENDENT = "samples treated as independent (no groups given)"
# More rows than this fraction with a tie across the k-th place earns a warning.
TIED_ROWS_WARNING = 0.05


@dataclass
class Settings:
    """How the metrics are computed; all of it is written into `_meta`."""

    ks: list[int]
    mutual: bool = True
    permutations: int = 0
    subsample_draws: int = 0
    subsample_fraction: float = 0.5  # and f/2: significance.two_size_subsets
    seed: int = 0
    pairwise: bool = False
    cka: bool = False
    backend: str = "torch"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ties: str = "shared"
    groups: torch.Tensor | None = None  # per-sample labels (e.g. episodes)
    groups_source: str | None = None
    exclude_same_group: bool = False  # same-group pairs are never neighbours
    side_by_side: bool = False  # with groups: also the other exclusion setting's CKNNA
    compare: bool = False  # paired differences between models (needs subsample_draws)


def _k_search(s: Settings, n: int) -> int:
    k = max(s.ks)
    if s.subsample_draws:  # subsets of f and f/2 (significance.two_size_subsets)
        k = max(k, significance.long_list_length(k, s.subsample_fraction / 2, n))
    return k


def _space(x: torch.Tensor, s: Settings, exclude: bool) -> metrics.Space:
    groups = s.groups.to(x.device) if exclude and s.groups is not None else None
    return metrics.Space(x, _k_search(s, x.shape[0]), s.ties, groups, {"backend": s.backend})


def model_entry(a: torch.Tensor, b: torch.Tensor, s: Settings, space_b, path: str,
                space_a=None, precomputed: dict | None = None):
    """One model's seed-style entry against the states, its space, and (for comparisons)
    its subsample values per k (`precomputed`: from `significance.subsample_table`)."""
    space_a = space_a or _space(a, s, s.exclude_same_group)
    per_k = significance.align(a, b, s.ks, permutations=s.permutations,
                               subsample_draws=s.subsample_draws,
                               subsample_fraction=s.subsample_fraction, seed=s.seed,
                               ties=s.ties, groups=s.groups,
                               exclude_same_group=s.exclude_same_group,
                               space_a=space_a, space_b=space_b, keep_draws=s.compare,
                               precomputed=precomputed, backend=s.backend)
    draws = {k: r.pop("subsample_values") for k, r in per_k.items() if "subsample_values" in r}
    entry = {"feats_A_path": path, "feats_A_dim": int(a.shape[1])}
    n = a.shape[0]
    for k, r in per_k.items():
        entry[f"cknna_k{k}"] = r["cknna"]
        if s.mutual:
            entry[f"mutual_knn_k{k}"] = r["mutual_knn"]
        if "permutation" in r:
            entry[f"p_value_k{k}"] = r["permutation"]["p_value"]
        for side in ("A", "B"):
            tied = r.get(f"tied_rows_{side}", 0)
            if tied > TIED_ROWS_WARNING * n:
                warnings.warn(f"k={k}: {tied} of {n} rows of {'feats_A ' + path if side == 'A' else 'feats_B'}"
                              " have a tie across the k-th neighbour (duplicate rows?); their "
                              "neighbours share the tied slots", RuntimeWarning, stacklevel=2)
    if s.cka:
        entry["cka_unbiased"] = metrics.cka(a, b, unbiased=True)
        entry["cka_biased"] = metrics.cka(a, b, unbiased=False)
    entry["details"] = {f"k{k}": r for k, r in per_k.items()}
    return entry, space_a, draws


def other_exclusion(a: torch.Tensor, b: torch.Tensor, s: Settings) -> dict:
    """CKNNA and mutual kNN per k with the opposite same-group setting, for side by side."""
    exclude = not s.exclude_same_group
    sa, sb = (metrics.Space(x, max(s.ks), s.ties, s.groups.to(x.device) if exclude else None,
                            {"backend": s.backend}) for x in (a, b))
    out = {"exclude_same_group": exclude}
    found_k = metrics.pair_scores(sa, sb, s.ks)  # every k on one union graph
    scores = {k: found_k[k] for k in s.ks}
    for k, sc in scores.items():
        out[f"cknna_k{k}"], out[f"mutual_knn_k{k}"] = sc.cknna, sc.mutual_knn
    found = chance.for_spaces(sa, sb, scores, s.permutations, s.seed, s.groups)
    if found:
        out["chance"] = {f"k{k}": rec for k, rec in found.items()}
    return out


def layer_entry(x: torch.Tensor, feats_b: torch.Tensor, s: Settings, space_b) -> dict:
    """One layer's CKNNA per k ("k5": value) against the states, with its chance records."""
    per_k = significance.align(x, feats_b, s.ks, permutations=s.permutations, seed=s.seed,
                               ties=s.ties, groups=s.groups,
                               exclude_same_group=s.exclude_same_group, space_b=space_b,
                               backend=s.backend)
    entry = {f"k{k}": r["cknna"] for k, r in per_k.items()}
    if s.permutations:
        entry["chance"] = {f"k{k}": r["permutation"] for k, r in per_k.items()}
    return entry


def pairwise(labels: list[str], spaces: list, ks: list[int]) -> dict:
    """CKNNA(model_i, model_j) for every ordered pair, from the lists already searched."""
    out = {"labels": labels, "order": "rows are A, columns are B: CKNNA(row, column)"}
    for k in ks:
        out[f"cknna_k{k}"] = [[metrics.space_scores(a, b, k).cknna for b in spaces]
                              for a in spaces]
    return out


def compute(models: dict[str, tuple[str, torch.Tensor]], feats_b: torch.Tensor, b_path: str,
            s: Settings, preprocessing: dict, extra_meta: dict | None = None,
            layers: dict[str, dict[str, torch.Tensor]] | None = None) -> dict:
    """Results for {label: (path, L2-normalised features)} against normalised states.

    `layers` ({label: {layer: features}}) adds per-layer CKNNA against the states."""
    n = feats_b.shape[0]
    feats_b = feats_b.to(s.device)
    space_b = _space(feats_b, s, s.exclude_same_group)
    entries, spaces, draws = {}, [], {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for label, (path, a) in models.items():
            print(f"[cknna] {label}: N={n}, D={a.shape[1]}, k={s.ks}: neighbours", file=sys.stderr)
            spaces.append(_space(a.to(s.device), s, s.exclude_same_group))
        tables = [None] * len(models)
        if s.subsample_draws:  # every model on the same subsets, B's subset graphs once
            print(f"[cknna] {s.subsample_draws} subsets x {len(models)} models", file=sys.stderr)
            try:  # a k too large for the f/2 subsets: one line naming both, not a traceback
                for k in s.ks:
                    significance._check_fraction(n, s.subsample_fraction / 2, k)
                subsets = significance.two_size_subsets(n, s.subsample_draws,
                                                        s.subsample_fraction, s.seed, s.groups)
                tables = significance.subsample_table(spaces, space_b, s.ks, subsets)
            except ValueError as err:
                raise HarnessError(
                    f"intervals need subsets of {s.subsample_fraction / 2:g} x N = "
                    f"{int(round(n * s.subsample_fraction / 2))} of N = {n} samples, too few for "
                    f"k = {max(s.ks)} ({err}): use a smaller k, more samples, or no "
                    "subsampling/compare") from None
        for i, (label, (path, a)) in enumerate(models.items()):
            print(f"[cknna] {label}: scores, null", file=sys.stderr)
            entry, _, draws[label] = model_entry(a.to(s.device), feats_b, s, space_b, path,
                                                 space_a=spaces[i], precomputed=tables[i])
            if s.side_by_side and s.groups is not None:
                entry["other_same_group_setting"] = other_exclusion(a.to(s.device), feats_b, s)
            entries[label] = entry
        matrix = pairwise(list(models), spaces, s.ks) if s.pairwise else None
        comparisons = None
        if s.compare and len(models) > 1:
            observed = {label: {k: e[f"cknna_k{k}"] for k in s.ks} for label, e in entries.items()}
            comparisons = significance.compare(list(models), observed, draws, s.ks,
                                               fraction=s.subsample_fraction, seed=s.seed,
                                               groups=s.groups is not None)
        per_layer = {label: {name: layer_entry(x.to(s.device), feats_b, s, space_b)
                             for name, x in by_layer.items()}
                     for label, by_layer in (layers or {}).items()}
    notes = sorted({str(w.message) for w in caught})
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    results = {
        "_meta": {
            "timestamp": provenance.now(),
            "feats_B_path": b_path,
            "feats_B_shape": [n, int(feats_b.shape[1])],
            "N": n,
            "k_values": s.ks,
            "metric": "CKNNA (platonic-rep unbiased form, 1e-6 denominator term)",
            "preprocessing": preprocessing,
            "knn": {"backend": s.backend, "tie_rule": TIE_RULES[s.ties], "ties": s.ties,
                    "self_excluded": True, "device": str(s.device)},
            "groups": {"source": s.groups_source, "n_groups": int(s.groups.unique().numel()),
                       "exclude_same_group": s.exclude_same_group,
                       "permutations_and_subsets": "whole groups"}
            if s.groups is not None else None,
            "samples": "grouped: permutations and subsets move whole groups"
            if s.groups is not None else INDEPENDENT,
            "permutations": s.permutations,
            "subsample": {"draws": s.subsample_draws, "fraction": s.subsample_fraction,
                          "method": significance.INTERVAL_METHOD}
            if s.subsample_draws else None,
            "seed": s.seed,
            "warnings": notes,
            "command": provenance.command_line(),
            "git": provenance.git_hash(),
            "versions": provenance.versions(),
            **(extra_meta or {}),
        },
        "models": entries,
    }
    if matrix:
        results["pairwise"] = matrix
    if comparisons:
        results["comparisons"] = comparisons
    if per_layer:
        results["layers"] = per_layer
    chance.adjust(results)  # callers adding sections (views, horizons) adjust again
    return results  # NaN stays a float here; io.write_json writes null + a warning
