"""The data directory's layout: file names, keys and shapes every job agrees on."""
from __future__ import annotations

import re
from typing import Iterable

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
