"""The data directory every stage shares: load it, validate it, write it.

Layout (the seed's `cknna_data/`, see FACTS §1): `metadata.json` (per-sample lists
`task_descriptions`, `episode_indices`, `frame_indices` and `num_samples`, `state_keys`),
`images/{i:06d}.png` (256x256 RGB) and `feats_B.pt`, a float (N, 7) tensor of states.

Validation collects every problem, each naming its file or sample index, instead of
stopping at the first. Options that change the data (leaving out empty-task samples,
z-scoring states) never run implicitly: each returns a record for the results file.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from harness.errors import HarnessError
from harness.io import atomic_path, shareable_dir, write_json

STATE_KEYS = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")
PER_SAMPLE_KEYS = ("task_descriptions", "episode_indices", "frame_indices")
REQUIRED_KEYS = ("num_samples", "state_keys", *PER_SAMPLE_KEYS)
IMAGE_SIZE = (256, 256)
_IMAGE_NAME = re.compile(r"^(\d{6})\.png$")
_MAX_LISTED = 10  # indices listed per problem before "... (+k more)"


def image_name(i: int) -> str:
    return f"images/{i:06d}.png"


def _listed(indices: Iterable[int]) -> str:
    indices = list(indices)
    shown = ", ".join(str(i) for i in indices[:_MAX_LISTED])
    more = f", ... (+{len(indices) - _MAX_LISTED} more)" if len(indices) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


# ----------------------------------------------------------------------------- validation

@dataclass
class CheckReport:
    """What `validate` found: problems make the directory unusable; the rest is summary."""

    data_dir: Path
    n: int | None = None
    problems: list[str] = field(default_factory=list)
    state_keys: list[str] = field(default_factory=list)
    state_min: list[float] = field(default_factory=list)
    state_max: list[float] = field(default_factory=list)
    empty_tasks: int | None = None
    duplicate_frames: int | None = None  # samples whose (episode, frame) pair came earlier
    duplicate_states: int | None = None  # samples whose state row equals an earlier row
    image_sizes: dict[str, int] = field(default_factory=dict)  # "256x256 RGB" -> count

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [f"data directory: {self.data_dir}", f"samples: {self.n}"]
        for key, lo, hi in zip(self.state_keys, self.state_min, self.state_max):
            lines.append(f"  state {key:>8}: [{lo:.4g}, {hi:.4g}]")
        if self.empty_tasks is not None:
            lines.append(f"empty tasks: {self.empty_tasks}")
        if self.duplicate_frames is not None:
            lines.append(f"repeated (episode, frame) pairs: {self.duplicate_frames}")
        if self.duplicate_states is not None:
            lines.append(f"exact duplicate states: {self.duplicate_states}"
                         + (" (kNN ties: see the tie rule in harness/knn.py)"
                            if self.duplicate_states else ""))
        if self.image_sizes:
            sizes = ", ".join(f"{k}: {v}" for k, v in sorted(self.image_sizes.items()))
            lines.append(f"images: {sizes}")
        lines.append(f"problems: {len(self.problems)}")
        lines.extend(f"  {p}" for p in self.problems)
        return "\n".join(lines)


def _read_metadata(root: Path, report: CheckReport) -> dict | None:
    path = root / "metadata.json"
    if not path.is_file():
        report.problems.append(f"{path}: missing")
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        report.problems.append(f"{path}: not readable JSON ({err})")
        return None
    if not isinstance(meta, dict):
        report.problems.append(f"{path}: expected a JSON object, got {type(meta).__name__}")
        return None
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        report.problems.append(f"{path}: missing keys {missing}")
    n = meta.get("num_samples")
    if "num_samples" in meta and not (isinstance(n, int) and n >= 0):
        report.problems.append(f"{path}: num_samples must be a non-negative integer, got {n!r}")
    for key in PER_SAMPLE_KEYS:
        if key in meta and not isinstance(meta[key], list):
            report.problems.append(f"{path}: {key} must be a list")
    for key, kind in (("task_descriptions", str), ("episode_indices", int),
                      ("frame_indices", int)):
        values = meta.get(key)
        if isinstance(values, list):
            bad = [i for i, v in enumerate(values) if not isinstance(v, kind)
                   or isinstance(v, bool) or (kind is int and v < 0)]
            if bad:
                what = "strings" if kind is str else "non-negative integers"
                report.problems.append(f"{path}: {key} must be {what}; bad at indices {_listed(bad)}")
    keys = meta.get("state_keys")
    if "state_keys" in meta and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        report.problems.append(f"{path}: state_keys must be a list of strings")
    return meta


def read_states(path: Path) -> torch.Tensor:
    """feats_B.pt as saved (no casting): the checks below must see its real dtype."""
    if not path.is_file():
        raise HarnessError(f"{path}: missing")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or not a torch file
        raise HarnessError(f"{path}: cannot read ({type(err).__name__}: {err})") from None
    if not isinstance(obj, torch.Tensor):
        raise HarnessError(f"{path}: expected a tensor, got {type(obj).__name__}")
    return obj


def _check_states(root: Path, meta: dict | None, report: CheckReport) -> torch.Tensor | None:
    path = root / "feats_B.pt"
    try:
        states = read_states(path)
    except HarnessError as err:
        report.problems.append(str(err))
        return None
    keys = meta.get("state_keys") if meta else None
    if states.ndim != 2:
        report.problems.append(f"{path}: expected shape (N, D), got {tuple(states.shape)}")
        return None
    if not states.is_floating_point():
        report.problems.append(f"{path}: expected a float tensor, got {states.dtype}")
        return None
    if isinstance(keys, list) and states.shape[1] != len(keys):
        report.problems.append(f"{path}: has {states.shape[1]} columns but metadata.json "
                               f"names {len(keys)} state_keys")
    bad = (~torch.isfinite(states).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        report.problems.append(f"{path}: {len(bad)} rows with NaN/Inf at indices {_listed(bad)}")
    return states


def _check_images(root: Path, n: int, decode: bool, report: CheckReport, progress: bool) -> None:
    from tqdm import tqdm

    sizes: Counter = Counter()
    missing, broken = [], []
    for i in tqdm(range(n), desc="checking images", unit="img", disable=not progress):
        path = root / image_name(i)
        if not path.is_file():
            missing.append(i)
            continue
        if not decode:
            continue
        try:
            with Image.open(path) as im:
                im.load()
                sizes[f"{im.width}x{im.height} {im.mode}"] += 1
        except Exception as err:  # PIL raises many types for truncated/corrupt files
            broken.append(f"{path}: cannot decode ({type(err).__name__}: {err})")
    if missing:
        report.problems.extend(f"{root / image_name(i)}: missing" for i in missing[:_MAX_LISTED])
        if len(missing) > _MAX_LISTED:
            report.problems.append(f"{root / 'images'}: {len(missing)} images missing in all, "
                                   f"at indices {_listed(missing)}")
    report.problems.extend(broken)
    images_dir = root / "images"
    if images_dir.is_dir():
        extra = sorted(int(m.group(1)) for name in os.listdir(images_dir)
                       if (m := _IMAGE_NAME.match(name)) and int(m.group(1)) >= n)
        if extra:
            report.problems.append(f"{images_dir}: {len(extra)} images beyond the {n} samples, "
                                   f"at indices {_listed(extra)}")
    report.image_sizes = dict(sizes)


def _count_sources(root: Path, meta: dict | None, states: torch.Tensor | None,
                   report: CheckReport) -> int | None:
    """Every count that says how many samples there are; a disagreement is a problem."""
    counts: dict[str, int] = {}
    if meta:
        if isinstance(meta.get("num_samples"), int):
            counts["metadata.json num_samples"] = meta["num_samples"]
        for key in PER_SAMPLE_KEYS:
            if isinstance(meta.get(key), list):
                counts[f"metadata.json {key}"] = len(meta[key])
    if states is not None:
        counts["feats_B.pt rows"] = states.shape[0]
    if not counts:
        return None
    n = next(iter(counts.values()))
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k}={v}" for k, v in counts.items())
        report.problems.append(f"{root}: sample counts disagree ({listed})")
    return n


def validate(data_dir: str | os.PathLike, images: str = "decode",
             progress: bool = False) -> CheckReport:
    """Check a data directory and collect every problem, each naming a file or index.

    images: "decode" opens and decodes every PNG, "exists" only checks that each file is
    there (cheap, for loading), "skip" does neither."""
    root = Path(data_dir)
    if not root.is_dir():
        raise HarnessError(f"{root}: not a directory")
    if images not in ("decode", "exists", "skip"):
        raise ValueError(f"images={images!r}")
    report = CheckReport(root)
    meta = _read_metadata(root, report)
    states = _check_states(root, meta, report)
    n = _count_sources(root, meta, states, report)
    report.n = n
    if n is not None and images != "skip":
        _check_images(root, n, images == "decode", report, progress)
    if meta:
        _summarise(meta, states, report)
    return report


def _summarise(meta: dict, states: torch.Tensor | None, report: CheckReport) -> None:
    keys = meta.get("state_keys")
    tasks = meta.get("task_descriptions")
    if isinstance(tasks, list):
        report.empty_tasks = sum(1 for t in tasks if isinstance(t, str) and not t.strip())
    episodes, frames = meta.get("episode_indices"), meta.get("frame_indices")
    if isinstance(episodes, list) and isinstance(frames, list) and len(episodes) == len(frames):
        pairs = [(e, f) for e, f in zip(episodes, frames) if isinstance(e, int) and isinstance(f, int)]
        report.duplicate_frames = len(pairs) - len(set(pairs))
    if states is not None and states.ndim == 2 and states.is_floating_point() and len(states):
        report.duplicate_states = len(states) - len(torch.unique(states, dim=0))
        finite = states[torch.isfinite(states).all(dim=1)]
        if len(finite):
            report.state_min = finite.min(dim=0).values.tolist()
            report.state_max = finite.max(dim=0).values.tolist()
            names = keys if isinstance(keys, list) and len(keys) == states.shape[1] else None
            report.state_keys = names or [f"dim{j}" for j in range(states.shape[1])]


# ----------------------------------------------------------------------------- loading

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


def zscore_states(data: BridgeData) -> tuple[BridgeData, dict]:
    """`zscore` applied to a data directory's states, recorded in its options."""
    z, record = zscore(data.states, data.metadata.get("state_keys"))
    return replace(data, states=z, options=data.options + (record,)), record


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


# ----------------------------------------------------------------------------- writing

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
    tmp = shareable_dir(Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial",
                                              dir=out.parent)))
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
    """feats_B.pt as float32. Saved through a buffer: torch.save to a path stores the
    (temp) file name inside the archive, which would make the bytes vary run to run."""
    tensor = torch.as_tensor(np.asarray(states, dtype=np.float32))
    buf = io.BytesIO()
    torch.save(tensor, buf)
    with atomic_path(root / "feats_B.pt") as tmp:
        tmp.write_bytes(buf.getvalue())


def write_metadata(root: Path, meta: dict) -> None:
    write_json(root / "metadata.json", meta)
