"""Build the data directory from a local LeRobot v2.x dataset, sampling as the seed did.

The seed's builder (`cknna/load_bridge_data.py` in yunfeixie233/starVLA) gathers every
frame of the chosen chunks (chunks in the order given, each chunk's parquet files in
sorted name order, rows in file order), then draws with Python's `random`:
`random.seed(seed); sorted(random.sample(range(len(pool)), n))`, i.e. n distinct pool
positions kept in pool order. This module uses exactly that rule (`random.Random(seed)`
is the same generator), so the same source and arguments select the same frames. The
image of a sample is decoded frame number `frame_index` of the episode's mp4, as there.

Where the seed was silent this module is not: a frame_index past the end of its video
falls back to the last frame with a warning and is listed in the metadata; a non-zero
pad value (state index 6) is warned about and counted; frames that are not 256x256 are
resized (bicubic) and counted; asking for more samples than the pool holds is an error.

Episode-level sampling (`per_episode=True`): episodes are ordered by index, n of them are
drawn with `rng.sample`, then one frame of each with `rng.randrange(length)`, in that
order, using the same `random.Random(seed)`.
"""
from __future__ import annotations

import json
import os
import random
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from harness.data import future
from harness.data import IMAGE_SIZE, STATE_KEYS, staged_dir, write_image, write_metadata, write_states
from harness.errors import HarnessError

PAD_INDEX = 6
STATE_DIM_RAW = 8
VIDEO_KEY = "observation.images.image_0"
_COLUMNS = ("observation.state", "episode_index", "frame_index", "task_index")
_EXTRA = "pip install 'harness[lerobot-data]'"


def _optional_deps():
    """pyarrow and av are an optional extra: import them only when building."""
    try:
        import av
        import pyarrow.parquet as pq
    except ImportError as err:
        missing = err.name or "pyarrow/av"
        raise HarnessError(f"building from LeRobot data needs the '{missing}' package: {_EXTRA}") from None
    return pq, av


def read_info(src: Path, video_key: str) -> dict:
    path = src / "meta" / "info.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise HarnessError(f"{path}: missing (is {src} a LeRobot dataset root?)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise HarnessError(f"{path}: not readable JSON ({err})") from None
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v2"):
        raise HarnessError(f"{path}: codebase_version {version!r}; only the v2.x layout "
                           "(one parquet and one mp4 per episode) is supported")
    missing = [k for k in ("data_path", "video_path", "features") if k not in info]
    if missing:
        raise HarnessError(f"{path}: missing keys {missing}")
    if video_key not in info["features"]:
        videos = [k for k, v in info["features"].items() if isinstance(v, dict) and v.get("dtype") == "video"]
        raise HarnessError(f"{path}: no feature {video_key!r} (video features: {videos})")
    return info


def read_tasks(src: Path) -> dict[int, str]:
    path = src / "meta" / "tasks.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise HarnessError(f"{path}: missing") from None
    tasks = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            tasks[int(row["task_index"])] = str(row["task"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise HarnessError(f"{path}:{number}: bad task line ({err})") from None
    return tasks


def gather_pool(pq, src: Path, info: dict, chunks: list[int], progress: bool) -> dict:
    """Every frame of the chosen chunks, in the seed's pool order."""
    from tqdm import tqdm

    files = []
    for chunk in chunks:
        folder = src / Path(info["data_path"].format(episode_chunk=chunk, episode_index=0)).parent
        found = sorted(folder.glob("*.parquet"))
        if not found:
            raise HarnessError(f"{folder}: no parquet files for chunk {chunk}")
        files += [(chunk, f) for f in found]
    parts = {k: [] for k in ("state", "episode", "frame", "task", "chunk")}
    for chunk, path in tqdm(files, desc="reading parquet", unit="file", disable=not progress):
        try:
            table = pq.read_table(path, columns=list(_COLUMNS))
        except Exception as err:  # missing column, corrupt file
            raise HarnessError(f"{path}: cannot read columns {list(_COLUMNS)} ({err})") from None
        states = np.asarray(table.column("observation.state").to_pylist(), dtype=np.float32)
        if states.ndim != 2 or states.shape[1] != STATE_DIM_RAW:
            raise HarnessError(f"{path}: observation.state must be {STATE_DIM_RAW}-D, "
                               f"got shape {states.shape}")
        parts["state"].append(states)
        for key, column in (("episode", "episode_index"), ("frame", "frame_index"),
                            ("task", "task_index")):
            parts[key].append(table.column(column).to_numpy().astype(np.int64))
        parts["chunk"].append(np.full(len(states), chunk, dtype=np.int64))
    return {k: np.concatenate(v) for k, v in parts.items()}


def choose_rows(episodes: np.ndarray, n: int, seed: int, per_episode: bool) -> list[int]:
    """Pool rows to keep, in pool order (see the module docstring for the rule)."""
    rng = random.Random(seed)
    total = len(episodes)
    if not per_episode:
        if n > total:
            raise HarnessError(f"--n {n} exceeds the {total} frames of the chosen chunks")
        return sorted(rng.sample(range(total), n))
    order = np.argsort(episodes, kind="stable")
    unique, starts, counts = np.unique(episodes[order], return_index=True, return_counts=True)
    if n > len(unique):
        raise HarnessError(f"--n {n} exceeds the {len(unique)} episodes of the chosen chunks "
                           "(per-episode sampling takes one frame per episode)")
    picked = sorted(rng.sample(range(len(unique)), n))
    return sorted(int(order[starts[e] + rng.randrange(int(counts[e]))]) for e in picked)


def decode_frames(av, path: Path, wanted: set[int]) -> tuple[dict[int, Image.Image], list[int]]:
    """Decoded frames number `wanted` of one video (RGB), and those past its end (given
    the last frame instead)."""
    if not path.is_file():
        raise HarnessError(f"{path}: video missing")
    images: dict[int, Image.Image] = {}
    last = None
    try:
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    images[i] = frame.to_image()
                last = frame
                if i >= max(wanted):
                    break
    except Exception as err:  # av raises its own error types for corrupt files
        raise HarnessError(f"{path}: cannot decode ({type(err).__name__}: {err})") from None
    if last is None:
        raise HarnessError(f"{path}: no video frames")
    past_end = sorted(wanted - images.keys())
    for i in past_end:
        images[i] = last.to_image()
    return images, past_end


def build_from_lerobot(src: str | os.PathLike, out: str | os.PathLike, n: int, seed: int,
                       chunks: list[int], per_episode: bool = False, force: bool = False,
                       video_key: str = VIDEO_KEY, dataset_repo: str | None = None,
                       progress: bool = False,
                       horizon_max: int = future.DEFAULT_HORIZON_MAX) -> dict:
    """Sample n frames of a LeRobot v2.x dataset into a data directory at `out`, with
    each sample's future states t..t+horizon_max of its episode (`feats_B_seq.pt`,
    `harness.data.future`; none when horizon_max is 0)."""
    from tqdm import tqdm

    pq, av = _optional_deps()
    src = Path(src)
    if n < 1:
        raise HarnessError(f"--n must be at least 1, got {n}")
    if horizon_max < 0:
        raise HarnessError(f"--horizon_max must be >= 0, got {horizon_max}")
    if len(set(chunks)) != len(chunks) or any(c < 0 for c in chunks):
        raise HarnessError(f"--chunks must be distinct non-negative integers, got {chunks}")
    info = read_info(src, video_key)
    tasks = read_tasks(src)
    pool = gather_pool(pq, src, info, list(chunks), progress)
    rows = choose_rows(pool["episode"], n, seed, per_episode)

    unknown = sorted({int(t) for t in pool["task"][rows]} - tasks.keys())
    if unknown:
        raise HarnessError(f"{src / 'meta' / 'tasks.jsonl'}: no task for task_index {unknown}")
    states = pool["state"][rows]
    pad_nonzero = np.flatnonzero(states[:, PAD_INDEX] != 0).tolist()
    if pad_nonzero:
        warnings.warn(f"state index {PAD_INDEX} (pad) is non-zero in {len(pad_nonzero)} sampled "
                      f"frames (first sample indices {pad_nonzero[:5]}); dropped anyway",
                      RuntimeWarning, stacklevel=2)

    by_video: dict[tuple[int, int], list[int]] = {}
    for i, row in enumerate(rows):
        by_video.setdefault((int(pool["chunk"][row]), int(pool["episode"][row])), []).append(i)
    source_sizes: Counter = Counter()
    fallbacks = []
    with staged_dir(out, force=force) as tmp:
        for (chunk, episode), samples in tqdm(by_video.items(), desc="decoding videos",
                                              unit="video", disable=not progress):
            path = src / info["video_path"].format(episode_chunk=chunk, video_key=video_key,
                                                   episode_index=episode)
            wanted = {int(pool["frame"][rows[i]]) for i in samples}
            images, past_end = decode_frames(av, path, wanted)
            if past_end:
                warnings.warn(f"{path}: frames {past_end} are past the end of the video; "
                              "using its last frame", RuntimeWarning, stacklevel=2)
                fallbacks.append({"episode_index": episode, "frame_indices": past_end})
            for i in samples:
                image = images[int(pool["frame"][rows[i]])]
                source_sizes[f"{image.width}x{image.height}"] += 1
                if image.size != IMAGE_SIZE:
                    image = image.resize(IMAGE_SIZE, Image.BICUBIC)
                write_image(tmp, i, image)
        write_states(tmp, np.delete(states, PAD_INDEX, axis=1))
        if horizon_max > 0:  # an episode is one (chunk, episode_index); frames in frame order
            episode_keys = pool["chunk"] * (1 << 32) + pool["episode"]
            seq, valid = future.from_pool(episode_keys, pool["frame"], pool["state"], rows,
                                            horizon_max)
            future.write(tmp, np.delete(seq, PAD_INDEX, axis=2), valid, horizon_max)
        meta = {
            "num_samples": len(rows),
            "state_dim_raw": STATE_DIM_RAW,
            "state_dim_effective": STATE_DIM_RAW - 1,
            "pad_index_dropped": PAD_INDEX,
            "state_keys": list(STATE_KEYS),
            "dataset_repo": dataset_repo or str(src),
            "num_chunks_used": len(chunks),
            "chunk_indices": list(chunks),
            "seed": seed,
            "task_descriptions": [tasks[int(pool["task"][r])] for r in rows],
            "episode_indices": [int(pool["episode"][r]) for r in rows],
            "frame_indices": [int(pool["frame"][r]) for r in rows],
            "sampling": {
                "rule": ("per-episode: random.Random(seed).sample(episodes, n), then randrange(length)"
                         if per_episode else
                         "frames: sorted(random.Random(seed).sample(range(pool_size), n))"),
                "per_episode": per_episode,
                "pool_size": int(len(pool["episode"])),
                "pool_episodes": int(len(np.unique(pool["episode"]))),
            },
            "num_episodes_sampled": len({e for _, e in by_video}),
            "source": {"path": str(src.resolve()), "codebase_version": info.get("codebase_version"),
                       "video_key": video_key, "image_sizes": dict(source_sizes),
                       "resized_to": list(IMAGE_SIZE)},
            "pad_nonzero_samples": len(pad_nonzero),
            "frame_fallbacks": fallbacks,
        }
        write_metadata(tmp, meta)
    return meta
