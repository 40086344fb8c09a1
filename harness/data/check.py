"""Check a data directory: every problem collected, each naming its file or sample."""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from harness.data.layout import (_IMAGE_NAME, _MAX_LISTED, PER_SAMPLE_KEYS, REQUIRED_KEYS,
                                 _listed, image_name)
from harness.data import future
from harness.errors import HarnessError
from harness.io import read_tensor
from harness.data.states import zero_rows


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
                         + (" (kNN ties: see the tie rule in harness/cknna/knn.py)"
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
    return read_tensor(path, feats_key=False, expected="a torch.save'd float (N, 7) tensor")


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
    zero = zero_rows(states)
    if zero:  # CKNNA L2-normalises rows: a zero row has no direction
        report.problems.append(f"{path}: {len(zero)} all-zero rows (cannot be L2-normalised) "
                               f"at indices {_listed(zero)}")
    return states


def _check_future_states(root: Path, states: torch.Tensor | None, report: CheckReport) -> None:
    """feats_B_seq.pt, when present: (N, H+1, D) whose step 0 is feats_B itself."""
    path = root / future.SEQ_FILE
    if not path.is_file() or states is None or states.ndim != 2:
        return
    try:
        seq = future.load(path, states.shape[0])
    except HarnessError as err:
        report.problems.append(str(err))
        return
    if seq.shape[2] != states.shape[1] or not torch.equal(seq[:, 0], states.float()):
        report.problems.append(f"{path}: step 0 is not feats_B.pt (shape {tuple(seq.shape)})")
    if not (root / future.SEQ_META).is_file():
        report.problems.append(f"{root / future.SEQ_META}: missing (it records the padding "
                               f"of {future.SEQ_FILE})")


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
    _check_future_states(root, states, report)
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
