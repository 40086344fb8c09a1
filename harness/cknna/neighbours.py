"""Neighbour lists and the tie-ordered top-k that every search backend shares.

Rows are ordered by similarity, highest first, and among exactly equal similarities the
lower sample index wins (deterministic, unlike `torch.topk` alone)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Neighbours:
    """Each row's neighbours, best first: indices (N, k) int64 and similarities (N, k)."""

    indices: torch.Tensor
    values: torch.Tensor
    exact: bool = True

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def prefix(self, k: int) -> "Neighbours":
        if k > self.k:
            raise ValueError(f"asked for k={k} but only {self.k} neighbours were searched")
        return Neighbours(self.indices[:, :k], self.values[:, :k], self.exact)


def _order_ties(values: torch.Tensor, indices: torch.Tensor):
    """Reorder each row by (value descending, index ascending)."""
    by_index = indices.argsort(dim=1)
    indices, values = indices.gather(1, by_index), values.gather(1, by_index)
    by_value = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, by_value), indices.gather(1, by_value)


def _order_sorted_ties(values: torch.Tensor, indices: torch.Tensor):
    """`_order_ties` for rows already sorted by value (a top-k's output): only rows with
    two equal values are reordered, so tie-free rows cost one comparison."""
    rows = (values[:, 1:] == values[:, :-1]).any(dim=1).nonzero().flatten()
    if len(rows):
        values[rows], indices[rows] = _order_ties(values[rows], indices[rows])
    return values, indices


def best_of(values: torch.Tensor, indices: torch.Tensor, k: int):
    """The k best of each row's candidates (any order) under the tie rule."""
    if k >= values.shape[1]:
        return _order_ties(values, indices)
    top, pos = torch.topk(values, k + 1, dim=1)
    found = indices.gather(1, pos)
    # A left-out value equal to the k-th one means topk chose among ties arbitrarily.
    ambiguous = (top[:, k] == top[:, k - 1]).nonzero().flatten()
    top, found = top[:, :k].contiguous(), found[:, :k].contiguous()
    if len(ambiguous):
        v, i = _order_ties(values[ambiguous], indices[ambiguous])
        top[ambiguous], found[ambiguous] = v[:, :k], i[:, :k]
    return _order_sorted_ties(top, found)


def _block_topk(gram: torch.Tensor, k: int):
    """Top-k of each row of a Gram block under the tie rule (all columns if fewer than k):
    `best_of` with the columns as candidates."""
    columns = torch.arange(gram.shape[1], device=gram.device).expand_as(gram)
    return best_of(gram, columns, k)


def product_error(x: torch.Tensor) -> float:
    """gamma_D: bound on |fl(x_i . x_j) - x_i . x_j| / (|x_i| |x_j|) in the search's dtype."""
    nu = x.shape[1] * torch.finfo(x.dtype).eps / 2
    return nu / (1 - nu) if nu < 1 else math.inf
