"""Turning (B, T, D) hidden states into one (B, D) feature per sample.

Padding must never influence a feature: tokens are *selected* with the mask
(`torch.where`), never multiplied by it, so a NaN or Inf at a pad position cannot leak
(NaN * 0 is NaN). Sums run in float32 whatever the model dtype.
"""
from __future__ import annotations

import torch

MODES = ("mean", "last")
TOKENS = ("all", "image", "text")


class EmptyMaskError(ValueError):
    """A row has no token to pool over; `rows` holds the batch rows concerned."""

    def __init__(self, rows: list[int]):
        self.rows = rows
        super().__init__(f"pooling mask is empty for batch row(s) {rows}: nothing to pool")


def _check(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if hidden.ndim != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden (B, T, D) and mask (B, T), got "
                         f"{tuple(hidden.shape)} and {tuple(mask.shape)}")
    mask = mask.to(device=hidden.device, dtype=torch.bool)
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise EmptyMaskError(empty)
    return mask


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where `mask` is True, in float32; (B, T, D) -> (B, D)."""
    mask = _check(hidden, mask)
    kept = torch.where(mask.unsqueeze(-1), hidden.float(), hidden.new_zeros((), dtype=torch.float32))
    return kept.sum(dim=1) / mask.sum(dim=1, keepdim=True).float()


def last_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The hidden state of each row's last True token (either padding side), in float32."""
    mask = _check(hidden, mask)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Dispatch on `mode` ('mean' or 'last')."""
    if mode == "mean":
        return masked_mean(hidden, mask)
    if mode == "last":
        return last_token(hidden, mask)
    raise ValueError(f"unknown pooling mode {mode!r}; choose from {MODES}")


def token_mask(attention_mask: torch.Tensor, input_ids: torch.Tensor | None = None,
               image_token_id: int | None = None, tokens: str = "all") -> torch.Tensor:
    """Pooling mask restricted to image tokens, text tokens, or all non-pad tokens.

    Image tokens are those with `input_ids == image_token_id`; text tokens are the other
    non-pad tokens (special tokens included).
    """
    mask = attention_mask.bool()
    if tokens == "all":
        return mask
    if tokens not in TOKENS:
        raise ValueError(f"unknown token selection {tokens!r}; choose from {TOKENS}")
    if input_ids is None or image_token_id is None:
        raise ValueError(f"tokens={tokens!r} needs input_ids and image_token_id")
    is_image = input_ids == image_token_id
    return mask & is_image if tokens == "image" else mask & ~is_image
