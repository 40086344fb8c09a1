"""Which prompt tokens are image and which are the task: masks for the modality split.

`feats_A_img.pt` and `feats_A_txt.pt` (issue 14, item 1) pool the same final hidden
states as `feats_A.pt` over two sub-masks of its pooling mask:
- image: the image placeholder tokens (HF families: `input_ids == image_token_id`; Pi0:
  the image embeddings at the front of its prefix);
- text: the tokens of the task instruction, found as the seed's scripts do, by searching
  `tokenizer.encode(prefix + task, add_special_tokens=False)` for prefix in ("", " ")
  inside the row's valid token ids (first match; a BPE tokenizer merges a leading space
  into the first word, so the task inside a prompt is often the " "-prefixed form).

A row whose task has no tokens (an empty task, about a third of Bridge samples) or whose
task was not found is never pooled to a silent zero vector (the seed's `clamp(min=1)`
gives one): its text feature falls back to the mean over the prompt's non-image tokens
(template and special tokens), and the row is listed by reason in the extraction
metadata (`txt_fallback`), so an analysis can drop it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

PREFIXES = ("", " ")
FALLBACK = "mean over the prompt's non-image tokens (template and special tokens)"
EMPTY_TASK = "empty_task"
NOT_FOUND = "task_not_found"


def find_subsequence(seq: Sequence[int], pattern: Sequence[int]) -> int:
    """Start of the first occurrence of `pattern` in `seq`, or -1 (also for an empty pattern)."""
    seq, pattern = list(seq), list(pattern)
    n = len(pattern)
    if n == 0:
        return -1
    for start in range(len(seq) - n + 1):
        if seq[start:start + n] == pattern:
            return start
    return -1


def locate_task(ids: Sequence[int], task: str, tokenizer) -> tuple[int, int] | None:
    """(start, end) of the task's tokens among `ids`, trying the prefixes "" then " ";
    None when the task has no tokens or is not found."""
    for prefix in PREFIXES:
        pattern = tokenizer.encode(prefix + task, add_special_tokens=False) if task else []
        start = find_subsequence(ids, pattern)
        if start >= 0:
            return start, start + len(pattern)
    return None


@dataclass
class ModalityMasks:
    """Image and text masks of one batch (both within the pooling mask), and per row why
    the text mask fell back (None: the task's own tokens)."""

    image: torch.Tensor
    text: torch.Tensor
    text_fallback: list[str | None] = field(default_factory=list)


def task_mask(ids: torch.Tensor, valid: torch.Tensor, tasks: Sequence[str], tokenizer,
              image: torch.Tensor) -> tuple[torch.Tensor, list[str | None]]:
    """(B, T) mask of each row's task tokens, searched among its valid positions only; a
    row without them gets its valid non-image tokens and a reason."""
    mask = torch.zeros_like(valid, dtype=torch.bool)
    reasons: list[str | None] = []
    for row, task in enumerate(tasks):
        positions = valid[row].nonzero().flatten()
        span = locate_task(ids[row, positions].tolist(), task, tokenizer)
        if span is None:
            mask[row] = valid[row] & ~image[row]
            reasons.append(EMPTY_TASK if not task.strip() else NOT_FOUND)
            if not mask[row].any():  # a prompt of image tokens only: the whole prompt
                mask[row] = valid[row]
        else:
            mask[row, positions[span[0]:span[1]]] = True
            reasons.append(None)
    return mask, reasons


def hf_masks(inputs: dict, tasks: Sequence[str], tokenizer, image_token_id: int | None
             ) -> ModalityMasks:
    """Masks for a transformers VLM batch: image tokens by id, the task by search."""
    if image_token_id is None:
        raise ValueError("the modality split needs the model's image token id")
    ids = inputs["input_ids"]
    valid = inputs["attention_mask"].bool()
    image = valid & (ids == image_token_id)
    text, reasons = task_mask(ids, valid, tasks, tokenizer, image)
    return ModalityMasks(image=image, text=text, text_fallback=reasons)
