"""Load a checked data directory: rows, options that change them, fingerprint, samples."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from harness.data.check import read_states, validate
from harness.data.layout import image_name
from harness.errors import HarnessError


@dataclass(frozen=True)
class BridgeData:
    """A validated data directory, rows in sample order.

    `indices[p]` is the original sample index of row p (the image is
    images/{indices[p]:06d}.png); it is the identity until an option leaves rows out.
    `options` holds the record of every option applied, for the results file."""

    root: Path
    metadata: dict
    states: torch.Tensor
    tasks: list[str]
    episodes: list[int]
    frames: list[int]
    indices: list[int]
    options: tuple[dict, ...] = ()

    @property
    def n(self) -> int:
        return len(self.indices)

    def image_path(self, row: int) -> Path:
        return self.root / image_name(self.indices[row])

    def take(self, feats: torch.Tensor) -> torch.Tensor:
        """Rows of a per-sample array of the full directory that match this data's rows."""
        n_full = self.metadata["num_samples"]
        if feats.shape[0] != n_full:
            raise HarnessError(f"features have {feats.shape[0]} rows, the data directory "
                               f"{self.root} has {n_full} samples")
        return feats[torch.as_tensor(self.indices, dtype=torch.long)]


def load(data_dir: str | os.PathLike, images: str = "exists") -> BridgeData:
    """Validate, then load; any problem raises one HarnessError listing the first few."""
    report = validate(data_dir, images=images)
    if not report.ok:
        shown = "; ".join(report.problems[:3])
        more = (f" (+{len(report.problems) - 3} more)" if len(report.problems) > 3 else "")
        raise HarnessError(f"{report.data_dir}: {len(report.problems)} problem(s): {shown}{more}; "
                           f"run `python -m harness data check {report.data_dir}` for all")
    root = report.data_dir
    meta = json.loads((root / "metadata.json").read_text())
    states = read_states(root / "feats_B.pt").float()
    return BridgeData(root, meta, states, list(meta["task_descriptions"]),
                      list(meta["episode_indices"]), list(meta["frame_indices"]),
                      list(range(meta["num_samples"])))


def policy_states(data: BridgeData) -> torch.Tensor:
    """The states as the robot reported them (what a policy is fed): feats_B.pt with the
    always-zero column it dropped (metadata `pad_index_dropped`) put back as zeros, up to
    `state_dim_raw` dims; feats_B.pt as it is when the metadata names no dropped column."""
    states = data.states
    meta = data.metadata
    pad, raw = meta.get("pad_index_dropped"), meta.get("state_dim_raw")
    if pad is None or raw is None or states.shape[1] >= int(raw):
        return states
    if states.shape[1] != int(raw) - 1 or not 0 <= int(pad) < int(raw):
        raise HarnessError(f"{data.root}: metadata says state_dim_raw={raw}, pad_index_dropped="
                           f"{pad}, but feats_B.pt has {states.shape[1]} columns")
    zero = torch.zeros(states.shape[0], 1, dtype=states.dtype)
    return torch.cat([states[:, :int(pad)], zero, states[:, int(pad):]], dim=1)


# ----------------------------------------------------------------------------- options

def drop_empty_tasks(data: BridgeData) -> tuple[BridgeData, dict]:
    """Leave out samples whose task is empty or whitespace; keep the index map.

    The record's `kept_indices[p]` is the original index of row p, so features computed
    on the full directory are aligned with `BridgeData.take`."""
    keep = [p for p, t in enumerate(data.tasks) if t.strip()]
    if not keep:
        raise HarnessError(f"{data.root}: every task string is empty; nothing left to keep")
    kept = [data.indices[p] for p in keep]
    record = {
        "option": "drop_empty_tasks",
        "rule": "task.strip() == ''",
        "n_before": data.n,
        "n_after": len(keep),
        "n_dropped": data.n - len(keep),
        "kept_indices": kept,
    }
    out = replace(
        data,
        states=data.states[torch.as_tensor(keep, dtype=torch.long)],
        tasks=[data.tasks[p] for p in keep],
        episodes=[data.episodes[p] for p in keep],
        frames=[data.frames[p] for p in keep],
        indices=kept,
        options=data.options + (record,),
    )
    return out, record


# ----------------------------------------------------------------------------- fingerprint

def fingerprint(data_dir: str | os.PathLike) -> str:
    """sha256 over metadata.json and feats_B.pt bytes plus image names and sizes.

    Cheap (images are not read) yet changes with any re-sampling or re-rendering that
    changes a file size; extractors record it so features can be matched to their data."""
    root = Path(data_dir)
    h = hashlib.sha256(b"harness-data-fingerprint-v1\0")
    for name in ("metadata.json", "feats_B.pt"):
        path = root / name
        if not path.is_file():
            raise HarnessError(f"{path}: missing")
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise HarnessError(f"{images_dir}: missing")
    with os.scandir(images_dir) as entries:
        files = sorted((e.name, e.stat().st_size) for e in entries if e.is_file())
    for name, size in files:
        h.update(f"{name}\0{size}\0".encode())
    return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------- torch loading

class ImageTaskDataset(torch.utils.data.Dataset):
    """(original sample index, RGB PIL image, task) for each row, in row order."""

    def __init__(self, data: BridgeData):
        self.root = data.root
        self.indices = list(data.indices)
        self.tasks = list(data.tasks)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, row: int) -> tuple[int, Image.Image, str]:
        index = self.indices[row]
        path = self.root / image_name(index)
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as err:
            raise HarnessError(f"{path}: cannot decode ({type(err).__name__}: {err})") from None
        return index, image, self.tasks[row]


def collate_samples(batch):
    """Keep PIL images as a list (the default collate would try to stack them)."""
    indices, images, tasks = zip(*batch)
    return torch.tensor(indices, dtype=torch.long), list(images), list(tasks)


def make_loader(data: BridgeData, batch_size: int, num_workers: int = 0):
    """Batches in row order whatever num_workers is: no shuffling, in-order delivery."""
    return torch.utils.data.DataLoader(
        ImageTaskDataset(data), batch_size=batch_size, shuffle=False,
        num_workers=num_workers, collate_fn=collate_samples,
    )
