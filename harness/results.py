"""The results JSON: the seed's compute_cknna.py layout, plus what makes it traceable.

`{"_meta": {...}, "models": {label: {"feats_A_path", "feats_A_dim", "cknna_k5", ...}}}`
keeps the seed's keys and nesting; extras sit beside them (details per k, pairwise
matrix, per-layer scores, provenance), so existing readers keep working."""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field

import torch

from harness import cknna as metrics
from harness import provenance
from harness.knn import knn
from harness.states import l2_rows  # noqa: F401  (its home is harness.states)

TIE_RULE = "neighbours ordered by similarity, equal similarities -> lower sample index first"


@dataclass
class Settings:
    """How the metrics are computed; all of it is written into `_meta`."""

    ks: list[int]
    mutual: bool = True
    permutations: int = 0
    subsample_draws: int = 0
    subsample_fraction: float = 0.8
    seed: int = 0
    pairwise: bool = False
    cka: bool = False
    backend: str = "torch"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def _k_search(s: Settings, n: int) -> int:
    k = max(s.ks)
    if s.subsample_draws:
        k = max(k, metrics.long_list_length(k, s.subsample_fraction, n))
    return k


def model_entry(a: torch.Tensor, b: torch.Tensor, s: Settings, nb, path: str):
    """One model's seed-style entry against the states, and its neighbour lists."""
    options = {"backend": s.backend}
    na = knn(a, _k_search(s, a.shape[0]), **options)
    per_k = metrics.align(a, b, s.ks, permutations=s.permutations,
                          subsample_draws=s.subsample_draws,
                          subsample_fraction=s.subsample_fraction, seed=s.seed,
                          neighbours_a=na, neighbours_b=nb, **options)
    entry = {"feats_A_path": path, "feats_A_dim": int(a.shape[1])}
    for k, r in per_k.items():
        entry[f"cknna_k{k}"] = r["cknna"]
        if s.mutual:
            entry[f"mutual_knn_k{k}"] = r["mutual_knn"]
        if "permutation" in r:
            entry[f"p_value_k{k}"] = r["permutation"]["p_value"]
    if s.cka:
        entry["cka_unbiased"] = metrics.cka(a, b, unbiased=True)
        entry["cka_biased"] = metrics.cka(a, b, unbiased=False)
    entry["details"] = {f"k{k}": r for k, r in per_k.items()}
    return entry, na


def pairwise(labels: list[str], neighbours: list, ks: list[int]) -> dict:
    """CKNNA(model_i, model_j) for every ordered pair, from the lists already searched."""
    out = {"labels": labels, "order": "rows are A, columns are B: CKNNA(row, column)"}
    for k in ks:
        out[f"cknna_k{k}"] = [[metrics.scores_from_neighbours(a, b, k).cknna for b in neighbours]
                              for a in neighbours]
    return out


def compute(models: dict[str, tuple[str, torch.Tensor]], feats_b: torch.Tensor, b_path: str,
            s: Settings, preprocessing: dict, extra_meta: dict | None = None,
            layers: dict[str, dict[str, torch.Tensor]] | None = None) -> dict:
    """Results for {label: (path, L2-normalised features)} against normalised states.

    `layers` ({label: {layer: features}}) adds per-layer CKNNA against the states."""
    n = feats_b.shape[0]
    feats_b = feats_b.to(s.device)
    nb = knn(feats_b, _k_search(s, n), backend=s.backend)
    entries, neighbours = {}, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for label, (path, a) in models.items():
            print(f"[cknna] {label}: N={n}, D={a.shape[1]}, k={s.ks}", file=sys.stderr)
            entry, na = model_entry(a.to(s.device), feats_b, s, nb, path)
            entries[label] = entry
            neighbours.append(na)
        matrix = pairwise(list(models), neighbours, s.ks) if s.pairwise else None
        per_layer = {label: {name: {f"k{k}": r["cknna"] for k, r in metrics.align(
            x.to(s.device), feats_b, s.ks, neighbours_b=nb, backend=s.backend).items()}
            for name, x in by_layer.items()} for label, by_layer in (layers or {}).items()}
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
            "knn": {"backend": s.backend, "tie_rule": TIE_RULE, "self_excluded": True,
                    "device": str(s.device)},
            "permutations": s.permutations,
            "subsample": {"draws": s.subsample_draws, "fraction": s.subsample_fraction}
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
    if per_layer:
        results["layers"] = per_layer
    return results
