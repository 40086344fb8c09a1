"""Locating the task inside the prompt ids (harness.extractors.engine.modality), on hand-built
token lists."""
from __future__ import annotations

import torch

from harness.extractors.engine.modality import (EMPTY_TASK, NOT_FOUND, find_subsequence, locate_task,
                              task_mask)


class WordTokenizer:
    """A BPE-like toy: a word after a space is its own token ("Ġput" != "put"), as in
    Qwen / Llama tokenizers, so a task inside a prompt is found only with the ' ' prefix."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        assert add_special_tokens is False
        words, out = text.split(" "), []
        for i, word in enumerate(words):
            if word:
                piece = ("Ġ" if i > 0 else "") + word
                out.append(self.vocab.setdefault(piece, 100 + len(self.vocab)))
        return out


def test_find_subsequence():
    assert find_subsequence([1, 2, 3, 2, 3], [2, 3]) == 1
    assert find_subsequence([1, 2, 3], [3, 4]) == -1
    assert find_subsequence([1, 2, 3], []) == -1
    assert find_subsequence([], [1]) == -1
    assert find_subsequence([5], [5]) == 0


def test_task_found_only_with_a_leading_space_in_a_bpe_prompt():
    tok = WordTokenizer()
    prompt = tok.encode("Your task is put the cup down. Go")
    plain = tok.encode("put the cup down.")
    assert find_subsequence(prompt, plain) == -1  # "put" != "Ġput": the '' form misses
    assert locate_task(prompt, "put the cup down.", tok) == (3, 7)


def test_task_at_the_start_is_found_without_the_space():
    tok = WordTokenizer()
    prompt = [1] + tok.encode("open the drawer") + [2]
    assert locate_task(prompt, "open the drawer", tok) == (1, 4)


def test_empty_and_missing_tasks():
    tok = WordTokenizer()
    assert locate_task([1, 2, 3], "", tok) is None
    assert locate_task([1, 2, 3], "nowhere", tok) is None


def test_task_mask_selects_exactly_the_span_and_reports_fallbacks():
    tok = WordTokenizer()
    image_id, pad = 7, 0
    rows = [[image_id] * 3 + [1] + tok.encode("a b c") + [2],   # task found
            [image_id] * 3 + [1, 2] + [pad] * 3,                 # empty task
            [image_id] * 3 + [1] + tok.encode("z") + [2, pad, pad]]  # task not in prompt
    ids = torch.tensor(rows)
    valid = ids != pad
    image = ids == image_id
    mask, reasons = task_mask(ids, valid, ["a b c", "", "q"], tok, image)
    want0 = torch.zeros(8, dtype=torch.bool)
    want0[4:7] = True
    assert torch.equal(mask[0], want0)
    assert reasons == [None, EMPTY_TASK, NOT_FOUND]
    # fallback rows: the valid non-image tokens, never an empty mask
    assert torch.equal(mask[1], valid[1] & ~image[1])
    assert torch.equal(mask[2], valid[2] & ~image[2])


def test_task_search_ignores_padding_positions():
    """A pad id that happens to equal a task token must not be matched."""
    class Ids:
        def encode(self, text, add_special_tokens=False):
            return [0] if text == "p" else [9]
    ids = torch.tensor([[7, 0, 0, 5]])
    valid = torch.tensor([[True, False, False, True]])
    mask, reasons = task_mask(ids, valid, ["p"], Ids(), ids == 7)
    assert reasons == [NOT_FOUND]
    assert torch.equal(mask, torch.tensor([[False, False, False, True]]))
