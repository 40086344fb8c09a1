"""Future states of each sample (`feats_B_seq.pt`): the data side of the temporal horizons.

`feats_B_seq.pt` (N, H+1, D) holds, for sample i at frame t of its episode, the states
at t, t+1, ..., t+H of the SAME episode (frames in frame order). Past the episode's last
frame the last state is repeated; the sidecar `feats_B_seq.json` records how many samples
were padded at each step and each sample's number of real steps. The metric side is
`harness.cknna.horizons`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from harness.errors import HarnessError
from harness.io import read_tensor, save_tensor, write_json

SEQ_FILE = "feats_B_seq.pt"
SEQ_META = "feats_B_seq.json"
DEFAULT_HORIZON_MAX = 10
RULE = ("seq[i, h] = state of the same episode h frames after sample i (frame order); past "
        "the episode's last frame the last state is repeated")


def from_pool(episode_keys: np.ndarray, frames: np.ndarray, states: np.ndarray,
              rows, horizon_max: int) -> tuple[np.ndarray, np.ndarray]:
    """(seq (N, H+1, D), valid_steps (N,)) for the chosen pool `rows`.

    The pool holds every frame of the episodes (`episode_keys` says which episode a row
    belongs to, any integer key); a sample's future is the next rows of its episode in
    frame order, the last one repeated past the end. valid_steps[i] counts the real
    states in seq[i] (1 .. H+1)."""
    if horizon_max < 0:
        raise HarnessError(f"--horizon_max must be >= 0, got {horizon_max}")
    rows = np.asarray(rows, dtype=np.int64)
    order = np.lexsort((frames, episode_keys))  # episode-major, frames ascending
    where = np.empty(len(order), dtype=np.int64)
    where[order] = np.arange(len(order))
    sorted_keys = np.asarray(episode_keys)[order]
    starts = np.r_[0, np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1]
    ends = np.r_[starts[1:], len(order)]
    pos = where[rows]
    last = ends[np.searchsorted(starts, pos, side="right") - 1] - 1
    steps = np.minimum(pos[:, None] + np.arange(horizon_max + 1), last[:, None])
    return np.asarray(states)[order[steps]], np.minimum(last - pos, horizon_max) + 1


def record(valid_steps: np.ndarray, horizon_max: int) -> dict:
    """The sidecar `feats_B_seq.json`: what each step holds and how much is padding."""
    valid = np.asarray(valid_steps)
    return {"file": SEQ_FILE, "horizon_max": int(horizon_max), "shape_rule": "(N, horizon_max+1, D)",
            "rule": RULE,
            "padded_per_step": [int((valid <= h).sum()) for h in range(horizon_max + 1)],
            "samples_with_padding": int((valid <= horizon_max).sum()),
            "valid_steps": [int(v) for v in valid]}


def write(root: Path, seq: np.ndarray, valid_steps: np.ndarray, horizon_max: int) -> dict:
    """feats_B_seq.pt (float32) and its sidecar, atomically."""
    save_tensor(Path(root) / SEQ_FILE, torch.as_tensor(np.asarray(seq, dtype=np.float32)))
    meta = record(valid_steps, horizon_max)
    write_json(Path(root) / SEQ_META, meta)
    return meta


def load(path: str | Path, n: int) -> torch.Tensor:
    """A finite float (N, H+1, D) tensor (.pt, or .npy); one-line error naming the file."""
    path = Path(path)
    obj = read_tensor(path, expected="a float (N, H+1, D) tensor of future states")
    if not isinstance(obj, torch.Tensor) or obj.ndim != 3 or not obj.is_floating_point():
        shape = tuple(obj.shape) if isinstance(obj, torch.Tensor) else type(obj).__name__
        raise HarnessError(f"{path}: holds {shape}; expected a float (N, H+1, D) tensor of "
                           "future states")
    if not torch.isfinite(obj).all():
        raise HarnessError(f"{path}: holds NaN or Inf")
    if obj.shape[0] != n:
        raise HarnessError(f"{path}: {obj.shape[0]} samples, but feats_B has {n}")
    return obj.float()
