"""What the forward pass actually used, noted from the inputs and outputs themselves.

Provenance says how an extractor is configured; this says what the model was really fed
(image size handed to the processor, image tokens per row, which side the padding was on,
the dtype the hidden states came out in). Each extractor notes values per batch; the run
loop keeps them per shard and writes their union into the metadata as `observed`, so a
reader can check the configured record against what ran.
"""
from __future__ import annotations

import torch


class Observed:
    """A set of values per key, noted batch by batch."""

    def __init__(self):
        self.values: dict[str, set] = {}

    def note(self, key: str, *values) -> None:
        self.values.setdefault(key, set()).update(values)

    def as_dict(self) -> dict:
        return {k: sorted(v, key=str) for k, v in sorted(self.values.items())}

    def clear(self) -> None:
        self.values.clear()


def padding_side(attention_mask: torch.Tensor) -> str | None:
    """'left' / 'right' from where the zeros of a (B, T) mask are, None if no row is padded."""
    mask = attention_mask.bool()
    left, right = bool((~mask[:, 0]).any()), bool((~mask[:, -1]).any())
    if left and right:
        return "both"
    return "left" if left else "right" if right else None


def note_token_inputs(observed: Observed, input_ids: torch.Tensor | None,
                      attention_mask: torch.Tensor, image_token_id: int | None) -> None:
    """Image tokens per row (counted in the ids) and the padding side (read from the mask)."""
    if input_ids is not None and image_token_id is not None:
        observed.note("image_tokens", *(input_ids == image_token_id).sum(dim=1).tolist())
    side = padding_side(attention_mask)
    if side is not None:
        observed.note("padding_side", side)


def merge(per_shard: list[dict | None]) -> dict:
    """Union of the shards' observations (a shard older than this record adds nothing)."""
    out: dict[str, set] = {}
    for record in per_shard:
        for key, values in (record or {}).items():
            out.setdefault(key, set()).update(map(_hashable, values))
    return {k: sorted(v, key=str) for k, v in sorted(out.items())}


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value
