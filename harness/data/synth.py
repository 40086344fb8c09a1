"""A synthetic data directory with real state-image signal, built offline and deterministically.

States are smooth random episodes of a 7-D end-effector state (x, y, z, roll, pitch,
yaw, gripper) in Bridge-like ranges (metres and radians mixed, as in the real data).
Frames are drawn at random from all episode frames, so, like the real set, several
samples are near-duplicate frames of one episode. Each image shows a gripper seen from
above: position = (x, y), size and shadow offset = z, rotation = yaw, body colour =
(roll, pitch), jaw opening = gripper. A distractor object that differs per episode
(not in the state) keeps the images from being a pure function of the state.

The same seed gives identical bytes on the same install (numpy PCG64, fixed PNG
settings, no timestamps); the output is the layout `harness.data` reads.
"""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageDraw

from harness.data import (IMAGE_SIZE, STATE_KEYS, staged_dir, write_image, write_metadata,
                          write_states)
from harness.data import future
from harness.errors import HarnessError

GENERATOR_VERSION = 1
# Bridge-like ranges of each state key: (low, high).
RANGES = {
    "x": (0.20, 0.40), "y": (-0.15, 0.15), "z": (0.02, 0.20),
    "roll": (-0.30, 0.30), "pitch": (-0.40, 0.20), "yaw": (-0.80, 0.80),
    "gripper": (0.0, 1.0),
}
FRAMES_PER_EPISODE = (20, 40)
SAMPLES_PER_EPISODE = 5  # on average: sets the number of episodes for a given N
EMPTY_TASK_FRACTION = 1 / 3

_OBJECTS = ("carrot", "spoon", "eggplant", "corn", "towel", "pot", "banana", "cup")
_PLACES = ("pot", "sink", "drying rack", "bowl", "basket", "pan")
_TEMPLATES = (
    "put the {obj} in the {place}",
    "move the {obj} to the {side} of the table",
    "pick up the {obj}",
    "put {obj} on {place}",
    "take the {obj} out of the {place}",
    "flip the {obj}",
)
_SIDES = ("left", "right", "front", "back")


def _smooth(t: np.ndarray) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(np.pi * t)


def _episode(rng: np.random.Generator, length: int) -> np.ndarray:
    """One trajectory (length, 7): eased move start -> goal with a lift, grasp in the middle."""
    lo = np.array([RANGES[k][0] for k in STATE_KEYS[:6]])
    hi = np.array([RANGES[k][1] for k in STATE_KEYS[:6]])
    span = hi - lo
    start = lo + span * rng.uniform(0.1, 0.9, 6)
    goal = lo + span * rng.uniform(0.1, 0.9, 6)
    t = np.linspace(0.0, 1.0, length)
    s = _smooth(t)[:, None]
    pose = start + (goal - start) * s
    pose[:, 2] += 0.3 * span[2] * np.sin(np.pi * t) * rng.uniform(0.3, 1.0)  # lift
    pose[:, :2] += 0.03 * span[:2] * np.sin(2 * np.pi * t * rng.uniform(1, 2))[:, None]
    pose = np.clip(pose, lo, hi)
    close_at, open_at = rng.uniform(0.25, 0.5), rng.uniform(0.7, 1.1)
    gripper = 1.0 / (1.0 + np.exp(25 * (t - close_at))) + 1.0 / (1.0 + np.exp(-25 * (t - open_at)))
    return np.concatenate([pose, np.clip(gripper, 0.0, 1.0)[:, None]], axis=1)


def _task(rng: np.random.Generator) -> str:
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    return template.format(obj=_OBJECTS[rng.integers(len(_OBJECTS))],
                           place=_PLACES[rng.integers(len(_PLACES))],
                           side=_SIDES[rng.integers(len(_SIDES))])


def sample_episodes(n: int, seed: int) -> dict:
    """States, episode/frame indices, tasks and distractors for n samples (sample order)."""
    if n < 1:
        raise HarnessError(f"--n must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    n_episodes = max(3, math.ceil(n / SAMPLES_PER_EPISODE))
    lengths = rng.integers(FRAMES_PER_EPISODE[0], FRAMES_PER_EPISODE[1] + 1, n_episodes)
    trajectories = [_episode(rng, int(length)) for length in lengths]
    tasks = [_task(rng) for _ in range(n_episodes)]
    for e in rng.choice(n_episodes, size=round(n_episodes * EMPTY_TASK_FRACTION), replace=False):
        tasks[e] = ""  # a fixed share of episodes, so about a third of samples, as in Bridge
    distractors = [(rng.uniform(20, 236, 2), rng.integers(40, 230, 3)) for _ in range(n_episodes)]
    pool = [(e, f) for e, length in enumerate(lengths) for f in range(int(length))]
    chosen = np.sort(rng.choice(len(pool), size=n, replace=False))  # pool is (episode, frame) order
    pairs = [pool[i] for i in chosen]
    return {
        "states": np.stack([trajectories[e][f] for e, f in pairs]).astype(np.float32),
        "episodes": [e for e, _ in pairs],
        "frames": [f for _, f in pairs],
        "tasks": [tasks[e] for e, _ in pairs],
        "distractors": [distractors[e] for e, _ in pairs],
        "n_episodes": n_episodes,
        "pool_episodes": np.array([e for e, _ in pool]),
        "pool_frames": np.array([f for _, f in pool]),
        "pool_states": np.concatenate(trajectories).astype(np.float32),
        "chosen": chosen,
    }


def _unit(key: str, value: float) -> float:
    lo, hi = RANGES[key]
    return float(np.clip((value - lo) / (hi - lo), 0.0, 1.0))


def _rect(cx: float, cy: float, w: float, h: float) -> np.ndarray:
    return np.array([[cx - w / 2, cy - h / 2], [cx + w / 2, cy - h / 2],
                     [cx + w / 2, cy + h / 2], [cx - w / 2, cy + h / 2]])


def render(state, distractor=None) -> Image.Image:
    """A 256x256 RGB top view of the gripper described by a 7-D state."""
    x, y, z, roll, pitch, yaw, grip = (float(v) for v in state)
    width, height = IMAGE_SIZE
    image = Image.new("RGB", IMAGE_SIZE, (176, 150, 112))  # table
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, width - 1, 24], fill=(92, 92, 100))  # back wall, fixed
    if distractor is not None:
        (dx, dy), colour = distractor
        draw.ellipse([dx - 12, dy - 12, dx + 12, dy + 12], fill=tuple(int(c) for c in colour))

    centre = np.array([40 + 176 * _unit("y", y), 40 + 176 * _unit("x", x)])
    scale = 0.7 + 0.8 * _unit("z", z)
    opening = 4 + 16 * float(np.clip(grip, 0.0, 1.0))
    parts = [
        _rect(0, -26, 14, 22),               # wrist
        _rect(0, -10, 48, 14),               # palm
        _rect(-opening - 4, 12, 8, 30),      # left jaw
        _rect(opening + 4, 12, 8, 30),       # right jaw
    ]
    c, s = math.cos(yaw), math.sin(yaw)
    rotation = np.array([[c, -s], [s, c]])
    body = (int(40 + 180 * _unit("roll", roll)), int(40 + 180 * _unit("pitch", pitch)), 70)
    shadow_offset = np.array([6.0, 10.0]) * (0.5 + 3 * _unit("z", z))
    for offset, fill in ((shadow_offset, (120, 100, 75)), (np.zeros(2), body)):
        for part in parts:
            points = (part * scale) @ rotation.T + centre + offset
            draw.polygon([tuple(p) for p in points.round(2)], fill=fill,
                         outline=(30, 30, 30) if fill is body else None)
    return image


def generate(out: str | os.PathLike, n: int, seed: int, force: bool = False,
             progress: bool = False, horizon_max: int = future.DEFAULT_HORIZON_MAX) -> dict:
    """Write a synthetic data directory at `out` (atomically) and return its metadata.

    With horizon_max > 0 it also writes each sample's future states (`harness.data.future`)
    from its episode's trajectory; the other files are the same bytes either way."""
    from tqdm import tqdm

    if n < 5:
        raise HarnessError(f"--n must be at least 5 (CKNNA needs N >= 4 and k >= 1), got {n}")
    if horizon_max < 0:
        raise HarnessError(f"--horizon_max must be >= 0, got {horizon_max}")
    with staged_dir(out, force=force) as tmp:
        sample = sample_episodes(n, seed)
        rows = zip(sample["states"], sample["distractors"])
        for i, (state, distractor) in enumerate(tqdm(rows, total=n, desc="rendering",
                                                     unit="img", disable=not progress)):
            write_image(tmp, i, render(state, distractor))
        write_states(tmp, sample["states"])
        if horizon_max > 0:
            seq, valid = future.from_pool(sample["pool_episodes"], sample["pool_frames"],
                                            sample["pool_states"], sample["chosen"], horizon_max)
            future.write(tmp, seq, valid, horizon_max)
        meta = {
            "num_samples": n,
            "state_dim_raw": 8,
            "state_dim_effective": 7,
            "pad_index_dropped": 6,
            "state_keys": list(STATE_KEYS),
            "dataset_repo": "synthetic",
            "num_chunks_used": 0,
            "chunk_indices": [],
            "seed": seed,
            "task_descriptions": sample["tasks"],
            "episode_indices": sample["episodes"],
            "frame_indices": sample["frames"],
            "synthetic": True,
            # the generator's name when the format was fixed (now harness.data.synth), kept
            # so the demo data keep their bytes and fingerprint
            "generator": {"module": "harness.synth", "version": GENERATOR_VERSION,
                          "num_episodes": sample["n_episodes"]},
        }
        write_metadata(tmp, meta)
    return meta

