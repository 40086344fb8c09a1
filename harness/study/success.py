"""Alignment against task success across models: Spearman rank correlation with a
bootstrap interval that resamples models.

Few models (the seed authors' table has 8 to 17) make any correlation fragile, so every
record says how many models it rests on, and with fewer than MIN_MODELS none is given.
"""
from __future__ import annotations

import math

import numpy as np

MIN_MODELS = 3
DRAWS = 2000
LEVEL = 0.95


def ranks(values) -> np.ndarray:
    """Ranks 1..n; tied values share the mean of their ranks."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="stable")
    out = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        out[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return out


def spearman(x, y) -> float:
    """Pearson correlation of the ranks; NaN when either side is constant."""
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def bootstrap(x, y, draws: int = DRAWS, seed: int = 0, level: float = LEVEL) -> dict:
    """Percentile interval of Spearman's rho over `draws` resamples of the models (with
    replacement); resamples where one side is constant have no rho and are counted."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        pick = rng.integers(0, len(x), len(x))
        rho = spearman(x[pick], y[pick])
        if not math.isnan(rho):
            values.append(rho)
    tail = (1 - level) / 2
    low, high = (np.quantile(values, [tail, 1 - tail]).tolist() if values else [None, None])
    return {"low": low, "high": high, "level": level, "draws": draws,
            "draws_without_rho": draws - len(values), "seed": seed,
            "resampled": "models, with replacement"}


def correlate(cknna: dict[str, float | None], success: dict[str, float | None],
              draws: int = DRAWS, seed: int = 0) -> dict:
    """Spearman's rho of CKNNA with success over the models that have both (finite)."""
    used = [m for m in cknna if m in success and _finite(cknna[m]) and _finite(success[m])]
    left_out = sorted((set(cknna) | set(success)) - set(used))
    record = {"n_models": len(used), "models": used, "left_out": left_out,
              "cknna": [cknna[m] for m in used], "success": [success[m] for m in used]}
    if len(used) < MIN_MODELS:
        record.update(spearman_rho=None, interval=None,
                      note=f"not computed: {len(used)} model(s) with both CKNNA and a success "
                           f"rate; a rank correlation needs at least {MIN_MODELS}")
        return record
    x, y = record["cknna"], record["success"]
    record["spearman_rho"] = spearman(x, y)
    record["interval"] = bootstrap(x, y, draws, seed)
    record["note"] = (f"rests on {len(used)} models only: one model more or less can move rho a "
                      "lot; the interval resamples models")
    return record


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def study_section(results: dict, rates: dict[str, float], draws: int = DRAWS, seed: int = 0) -> dict:
    """`results["success"]`: rho of CKNNA (each k) with the config's success rates."""
    section = {"source": "the study config's success_rate per model", "rates": rates,
               "method": "Spearman rank correlation (average ranks for ties); percentile "
                         "bootstrap interval resampling models with replacement"}
    for k in results["_meta"]["k_values"]:
        cknna = {name: m.get(f"cknna_k{k}") for name, m in results["models"].items()}
        section[f"k{k}"] = correlate(cknna, rates, draws, seed)
    first = section[f"k{results['_meta']['k_values'][0]}"]
    section["left_out"] = first["left_out"]
    section["note"] = first["note"]
    return section
