"""The data directory every stage shares, split by job: `check` (validate), `load`
(rows, options, fingerprint, samples) and `write` (atomic, reproducible bytes).

Layout (the seed's `cknna_data/`, see docs/facts.md §1): `metadata.json` (per-sample lists
`task_descriptions`, `episode_indices`, `frame_indices` and `num_samples`, `state_keys`),
`images/{i:06d}.png` (256x256 RGB) and `feats_B.pt`, a float (N, 7) tensor of states.

Validation collects every problem, each naming its file or sample index, instead of
stopping at the first. Options that change the data (leaving out empty-task samples,
z-scoring states) never run implicitly: each returns a record for the results file.
"""
from __future__ import annotations

from harness.data.check import CheckReport, read_states, validate
from harness.data.layout import (IMAGE_SIZE, PER_SAMPLE_KEYS, REQUIRED_KEYS, STATE_KEYS,
                                 image_name)
from harness.data.load import (BridgeData, ImageTaskDataset, collate_samples, drop_empty_tasks,
                               fingerprint, load, make_loader, policy_states)
from harness.data.write import staged_dir, write_image, write_metadata, write_states

__all__ = ["CheckReport", "read_states", "validate", "IMAGE_SIZE", "PER_SAMPLE_KEYS",
           "REQUIRED_KEYS", "STATE_KEYS", "image_name", "BridgeData", "ImageTaskDataset",
           "collate_samples", "drop_empty_tasks", "fingerprint", "load", "make_loader",
           "policy_states", "staged_dir", "write_image", "write_metadata", "write_states"]
