"""State (and feature) preprocessing before the metric, in one place, with its record.

Rows are L2-normalised before CKNNA, as the reference does (a zero row cannot be, and is
an error naming its file). States may be z-scored per column first (raw states mix metres
and radians); that is never implicit, and `record` writes down what was done.
"""
from __future__ import annotations

import warnings

import torch

from harness.errors import HarnessError


def l2_rows(x: torch.Tensor) -> torch.Tensor:
    """Row L2 normalisation, as the seed applies before CKNNA (callers reject zero rows),
    computed and kept in float64: rows equal up to a positive scale then differ by a few
    float64 ulps, far inside the tie tolerance, where float32 normalisation leaves them
    about 6e-8 apart (tied or not by rounding). The kNN search still runs in float32
    (`cknna.Space`)."""
    x = x.to(torch.float64, copy=True)  # a copy even of float64 rows: divided in place
    x /= x.norm(dim=1, keepdim=True)
    return x


def zero_rows(x: torch.Tensor) -> list[int]:
    """Indices of rows that cannot be L2-normalised."""
    return (x.norm(dim=1) == 0).nonzero().flatten().tolist()


def normalised(path, x: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows; a zero row is an error naming the file."""
    zero = zero_rows(x)
    if zero:
        raise HarnessError(f"{path}: {len(zero)} rows have zero norm (first rows "
                           f"{zero[:5]}); cannot L2-normalise")
    return l2_rows(x)


def zscore(states: torch.Tensor, keys: list[str] | None = None) -> tuple[torch.Tensor, dict]:
    """Standardise each column (population std), so metres and radians weigh alike.

    A constant column is only centred (std taken as 1) and named in the record."""
    x = states.double()
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    constant = (std == 0).nonzero().flatten().tolist()
    keys = list(keys or [f"dim{j}" for j in range(x.shape[1])])
    if constant:
        warnings.warn(f"z-score: constant state columns {[keys[j] for j in constant]} are "
                      "centred only", RuntimeWarning, stacklevel=2)
    safe = torch.where(std == 0, torch.ones_like(std), std)
    record = {
        "option": "zscore_states",
        "state_keys": keys,
        "mean": mean.tolist(),
        "std": std.tolist(),
        "ddof": 0,
        "constant_columns": [keys[j] for j in constant],
    }
    return ((x - mean) / safe).float(), record


def standardised(path, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """`zscore`, but a constant column is an error naming the file (the CLI and `run`
    refuse it rather than centre it silently)."""
    const = (x.std(0) == 0).nonzero().flatten()
    if len(const):
        raise HarnessError(f"{path}: columns {const.tolist()} are constant; cannot z-score")
    return zscore(x)


def record(zscore_record: dict | None, data_options: list | None = None) -> dict:
    """The `_meta.preprocessing` entry of a results file."""
    out = {"row_l2_normalised": True, "feats_B_zscored": zscore_record is not None,
           "feats_B_zscore": zscore_record}
    if data_options is not None:
        out["data_options"] = data_options
    return out
