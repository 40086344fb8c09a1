"""Write a data directory atomically, with bytes that depend only on the content."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from harness.data.layout import image_name
from harness.errors import HarnessError
from harness.io import atomic_path, save_tensor, shareable_dir, write_json


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Build a data directory in a temp folder beside `out`, then move it into place.

    Refuses (before any work) to replace a non-empty `out` unless `force`, and even with
    `force` only one that looks like a data directory (has metadata.json). On any error
    the temp folder is removed and `out` is untouched."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HarnessError(f"{out}: exists and is not a directory")
    nonempty = out.is_dir() and any(out.iterdir())
    if nonempty and not force:
        raise HarnessError(f"{out}: directory exists and is not empty (use --force to replace it)")
    if nonempty and not (out / "metadata.json").is_file():
        raise HarnessError(f"{out}: not a data directory (no metadata.json); refusing to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HarnessError(f"{out.parent}: cannot create ({err})") from None
    try:
        tmp = shareable_dir(Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial",
                                                  dir=out.parent)))
    except OSError as err:  # read-only folder or file system (even for root)
        raise HarnessError(f"{out}: cannot write in {out.parent} ({err.strerror})") from None
    try:
        yield tmp
        if out.is_dir() and any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old)  # old is an empty dir, so rename over it works
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if out.is_dir():
                out.rmdir()
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_image(root: Path, i: int, image: Image.Image) -> None:
    """Fixed PNG settings and no metadata chunks, so equal pixels give equal bytes."""
    with atomic_path(root / image_name(i)) as tmp:
        image.save(tmp, format="PNG", compress_level=6, optimize=False)


def write_states(root: Path, states: np.ndarray | torch.Tensor) -> None:
    """feats_B.pt as float32, through `harness.io.save_tensor` (atomic, same bytes for
    the same states)."""
    save_tensor(root / "feats_B.pt", torch.as_tensor(np.asarray(states, dtype=np.float32)))


def write_metadata(root: Path, meta: dict) -> None:
    write_json(root / "metadata.json", meta)
