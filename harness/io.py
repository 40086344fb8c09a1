"""Atomic writes and feature-file reading shared by every stage."""
from __future__ import annotations

import contextlib
import io
import json
import os
import math
import tempfile
import warnings
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
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a plain open() would not
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    """The process umask (reading it means setting it; it is restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shareable_dir(path: Path) -> Path:
    """Give a mkdtemp folder (0700) the mode a plain mkdir would have (0777 & ~umask)."""
    os.chmod(path, 0o777 & ~current_umask())
    return path


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Fail (before any work) when `path` cannot be written as a file: it is a folder,
    or a part of its folder path is a file or not writable."""
    path = Path(path)
    if path.is_dir():
        raise HarnessError(f"{what} {path}: is a directory")
    _check_parent(path.parent, what, path)
    return path


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Fail (before any work) when `path` cannot be (created and) written as a folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HarnessError(f"{what} {path}: exists and is not a directory")
    _check_parent(path, what, path)
    return path


def _check_parent(folder: Path, what: str, target: Path) -> None:
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise HarnessError(f"{what} {target}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise HarnessError(f"{what} {target}: directory {existing} is not writable")


def strict_json(obj, note: str = "not a finite number"):
    """A copy of `obj` that is strict JSON: a NaN/Inf float becomes null, and in a dict
    the key `<key>_warning` beside it says why (JavaScript and most parsers reject NaN)."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            out[key] = strict_json(value, note)
            if isinstance(value, float) and not math.isfinite(value):
                out[f"{key}_warning"] = f"{value} written as null: {note}"
        return out
    if isinstance(obj, (list, tuple)):
        return [strict_json(v, note) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, obj, nan_note: str = "not a finite number") -> None:
    """Strict JSON (see `strict_json`), written atomically."""
    text = json.dumps(strict_json(obj, nan_note), indent=2, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


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


def read_tensor(path: str | os.PathLike, feats_key: bool = True,
                expected: str | None = None) -> torch.Tensor:
    """One tensor as stored (no casting) from .pt/.pth (a tensor, or a dict's 'feats'
    entry when `feats_key`), .npy or .safetensors (one tensor, or the one named 'feats').
    Loads no pickled objects; an unreadable file gets one line saying what it is and what
    was `expected` (default: the feature-file description of its suffix)."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".pt", ".pth"):
            with warnings.catch_warnings():  # torch warns about pickle protocols on stderr
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict) and feats_key:
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
        raise HarnessError(f"{path}: {describe_unreadable(path, err, expected)}") from None
    if not isinstance(obj, torch.Tensor):
        raise HarnessError(f"{path}: expected a tensor, got {type(obj).__name__}")
    return obj


def load_features(path: str | os.PathLike) -> torch.Tensor:
    """Read an (N, D) float matrix (see `read_tensor` for the formats); every problem
    names the file."""
    obj = read_tensor(path)
    if obj.ndim != 2:
        raise HarnessError(f"{path}: expected a 2-D (N, D) array, got shape {tuple(obj.shape)}")
    if not (obj.is_floating_point() or obj.dtype in (torch.int32, torch.int64)):
        raise HarnessError(f"{path}: expected numbers, got dtype {obj.dtype}")
    obj = obj.float()
    # One min/max pass finds any NaN/Inf (both propagate into it) without an (N, D) mask.
    if obj.numel() and not torch.isfinite(torch.stack(torch.aminmax(obj))).all():
        bad = ~torch.isfinite(obj).all(dim=1)
        rows = bad.nonzero().flatten()[:5].tolist()
        raise HarnessError(f"{path}: {int(bad.sum())} rows contain NaN/Inf (first rows {rows})")
    return obj


EXPECTED = {".pt": "a torch.save'd (N, D) tensor or dict with a 'feats' tensor",
            ".pth": "a torch.save'd (N, D) tensor or dict with a 'feats' tensor",
            ".npy": "a numeric (N, D) numpy array (np.save)",
            ".safetensors": "a safetensors file with one tensor or one named 'feats'"}


def describe_unreadable(path: Path, err: Exception, expected: str | None = None) -> str:
    """What the file is and what was expected, in one line; never suggests unpickling
    untrusted objects (torch's own message does)."""
    expected = expected or EXPECTED[path.suffix.lower()]
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        found = "is empty (0 bytes)"
    elif head.startswith(b"PK\x03\x04") and path.suffix.lower() in (".pt", ".pth"):
        found = ("is a torch archive holding Python objects other than tensors "
                 "(e.g. numpy arrays or custom classes), which are not loaded, for safety"
                 if "weights only" in str(err).lower() else "is a damaged torch archive")
    elif head[:1] == b"\x80" and path.suffix.lower() in (".pt", ".pth"):
        found = ("is a plain Python pickle, not a torch tensor file; pickles are not loaded, "
                 "for safety" if "weights only" in str(err).lower()
                 else "is a damaged or truncated torch/pickle file")
    elif head.startswith(b"\x93NUMPY") and path.suffix.lower() == ".npy":
        found = ("is a numpy file of Python objects, which are not loaded, for safety"
                 if "allow_pickle" in str(err) else "is a damaged or truncated numpy file")
    elif _is_text(head):
        found = "is a text file"
    else:
        found = f"is not in that format ({type(err).__name__}: {_first_line(err)})"
    return f"{found}; expected {expected}"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:120] if text else "no detail"


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\n\r\t" for c in text)
