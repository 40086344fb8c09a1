"""Atomic writes and feature-file reading shared by every stage."""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from harness.errors import HarnessError

FEATURE_SUFFIXES = (".pt", ".pth", ".npy", ".safetensors")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=True) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_tensor(path: str | os.PathLike, tensor) -> None:
    """torch.save through a buffer: saving to a path stores the (random) temp file name
    in the archive, which would make identical tensors give different bytes."""
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def load_features(path: str | os.PathLike) -> torch.Tensor:
    """Read an (N, D) float matrix from .pt/.pth (tensor or dict with 'feats'), .npy or
    .safetensors (single tensor or key 'feats'); every problem names the file."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                if "feats" not in obj:
                    raise HarnessError(f"{path}: dict has no 'feats' key (keys: {sorted(obj)[:8]})")
                obj = obj["feats"]
        elif suffix == ".npy":
            obj = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".safetensors":
            from safetensors.torch import load_file
            tensors = load_file(str(path))
            if "feats" in tensors:
                obj = tensors["feats"]
            elif len(tensors) == 1:
                obj = next(iter(tensors.values()))
            else:
                raise HarnessError(f"{path}: several tensors and none named 'feats'")
        else:
            raise HarnessError(f"{path}: unsupported suffix {suffix!r} (use {', '.join(FEATURE_SUFFIXES)})")
    except HarnessError:
        raise
    except Exception as err:  # unreadable or corrupt file
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise HarnessError(f"{path}: cannot read ({type(err).__name__}: {first_line})") from None
    if not isinstance(obj, torch.Tensor):
        raise HarnessError(f"{path}: expected a tensor, got {type(obj).__name__}")
    if obj.ndim != 2:
        raise HarnessError(f"{path}: expected a 2-D (N, D) array, got shape {tuple(obj.shape)}")
    if not (obj.is_floating_point() or obj.dtype in (torch.int32, torch.int64)):
        raise HarnessError(f"{path}: expected numbers, got dtype {obj.dtype}")
    obj = obj.float()
    bad = ~torch.isfinite(obj).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten()[:5].tolist()
        raise HarnessError(f"{path}: {int(bad.sum())} rows contain NaN/Inf (first rows {rows})")
    return obj
