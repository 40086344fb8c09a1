"""CKNNA against future states: does a model's feature encode where the robot goes next,
not only where it is?

`feats_B_seq.pt` (N, H+1, D, written by `harness.data.future`) holds the states t..t+H
of each sample's episode. Horizon a compares a model with the states t..t+a flattened,
`seq[:, :a+1].reshape(N, -1)` (N, D·(a+1)), as the seed's `compute_cknna_large.py` does,
with the same row L2 normalisation as `feats_B`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.cknna import chance
from harness.cknna import core as metrics
from harness.data.future import (DEFAULT_HORIZON_MAX, RULE, SEQ_FILE, SEQ_META,  # noqa: F401
                                 from_pool, load, record, write)
from harness.errors import HarnessError
from harness.data.states import normalised
from harness.data.states import zscore as zscore_columns

DEFAULT_HORIZONS = (0, 1, 2, 4, 8)


def horizon_states(seq: torch.Tensor, a: int) -> torch.Tensor:
    """States t..t+a flattened per sample: (N, D·(a+1)), step-major (as the seed)."""
    if not 0 <= a < seq.shape[1]:
        raise HarnessError(f"--horizon {a}: must be in [0, {seq.shape[1] - 1}] "
                           f"(feats_B_seq holds H = {seq.shape[1] - 1})")
    return seq[:, :a + 1].reshape(seq.shape[0], -1)


def horizon_scores(models: dict[str, tuple[str, torch.Tensor]], seq: torch.Tensor,
                   horizons, settings, zscore: bool = False, path: str = SEQ_FILE) -> dict:
    """{label: {"h{a}": {"cknna_k{K}", "mutual_knn_k{K}"}}} for L2-normalised model
    features against the flattened future states of each horizon (rows L2-normalised,
    columns z-scored first when `zscore`). Same kNN settings (ties, backend, same-group
    exclusion) as the main scores; each model's neighbour list is searched once."""
    ks = sorted(set(settings.ks))
    groups = settings.groups if settings.exclude_same_group else None
    options = {"backend": settings.backend}
    targets = {}
    for a in sorted(set(horizons)):
        flat = horizon_states(seq, a)
        if zscore:
            flat, _ = zscore_columns(flat)
        targets[a] = metrics.Space(normalised(path, flat).to(settings.device), max(ks),
                                   settings.ties, groups, options)
    out = {}
    for label, (_, a_feats) in models.items():
        space_a = metrics.Space(a_feats.to(settings.device), max(ks), settings.ties, groups, options)
        out[label] = {}
        for a, space_b in targets.items():
            entry = {}
            every_k = metrics.pair_scores(space_a, space_b, ks)  # one union graph
            scores = {k: every_k[k] for k in ks}
            for k, s in scores.items():
                entry[f"cknna_k{k}"], entry[f"mutual_knn_k{k}"] = s.cknna, s.mutual_knn
            found = chance.for_spaces(space_a, space_b, scores, settings.permutations,
                                      settings.seed, settings.groups)
            if found:
                entry["chance"] = {f"k{k}": r for k, r in found.items()}
            out[label][f"h{a}"] = entry
    return out


def add_to_results(results: dict, models: dict, seq: torch.Tensor, horizons, settings,
                   zscore: bool, path) -> None:
    """`models.<label>.horizons.h{a}.cknna_k{K}` and `_meta.horizons`, in place."""
    scores = horizon_scores(models, seq, horizons, settings, zscore, str(path))
    for label, by_horizon in scores.items():
        results["models"][label]["horizons"] = by_horizon
    results["_meta"]["horizons"] = meta(str(path), seq, horizons, zscore)
    chance.adjust(results)


def meta(path: str, seq: torch.Tensor, horizons, zscore: bool) -> dict:
    """The `_meta.horizons` entry: how the horizon scores were made."""
    sidecar = Path(path).with_name(SEQ_META)
    padded = None
    if sidecar.is_file():
        try:
            padded = json.loads(sidecar.read_text()).get("padded_per_step")
        except ValueError:
            padded = None
    return {"feats_B_seq_path": str(path), "feats_B_seq_shape": list(seq.shape),
            "horizons": sorted(set(horizons)),
            "flatten": "seq[:, :a+1].reshape(N, -1) (states t..t+a, step-major)",
            "row_l2_normalised": True, "zscored_per_column": zscore,
            "padded_per_step": padded, "rule": RULE}
