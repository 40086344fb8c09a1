"""Exact k-nearest-neighbour search by inner product, in row blocks.

CKNNA and mutual kNN only ever look at each sample's top-k neighbours, so the N x N Gram
matrix is never kept: each block of rows is multiplied against all rows, reduced to its
top-k, and dropped. One search at the largest k serves every smaller k, because the
top-k of a row is a prefix of its sorted top-k_max.

Tie rule (deterministic, unlike `torch.topk`): neighbours are ordered by similarity,
highest first, and among exactly equal similarities the lower sample index wins. A
sample is never its own neighbour.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

# Gram block sizes (float32). Row strategy: 16 M elements = 64 MB per block. Symmetric
# strategy: 2048 x 2048 = 16 MB, big enough for an efficient matmul and top-k, small
# enough that skipping the lower triangle saves a third of the product at N = 5000.
ROW_BLOCK_ELEMENTS = 1 << 24
SYMMETRIC_BLOCK = 2048
# Below this width the top-k costs more than the product: the row strategy wins.
SYMMETRIC_MIN_DIM = 64
STRATEGIES = ("auto", "rows", "symmetric")
BACKENDS = ("torch", "faiss-flat", "faiss-hnsw")


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


@contextlib.contextmanager
def _exact_matmul():
    """TF32 matmuls change neighbour sets on CUDA; keep full float32 during the search."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _order_ties(values: torch.Tensor, indices: torch.Tensor):
    """Reorder each row by (value descending, index ascending)."""
    by_index = indices.argsort(dim=1)
    indices, values = indices.gather(1, by_index), values.gather(1, by_index)
    by_value = values.argsort(dim=1, descending=True, stable=True)
    return values.gather(1, by_value), indices.gather(1, by_value)


def _block_topk(gram: torch.Tensor, k: int):
    """Top-k of each row of a Gram block under the tie rule (all columns if fewer than k)."""
    if k >= gram.shape[1]:
        return _order_ties(*torch.sort(gram, dim=1, descending=True, stable=True))
    values, indices = torch.topk(gram, k + 1, dim=1)
    # A left-out value equal to the k-th one means topk chose among ties arbitrarily.
    ambiguous = values[:, k] == values[:, k - 1]
    values, indices = _order_ties(values[:, :k], indices[:, :k])
    if ambiguous.any():
        rows = ambiguous.nonzero().flatten()
        # Columns are in index order, so a stable sort puts the lower index first.
        v, i = torch.sort(gram[rows], dim=1, descending=True, stable=True)
        values[rows], indices[rows] = v[:, :k], i[:, :k]
    return values, indices


def _merge(best, values, indices, k):
    """Keep the k best of two candidate lists under the tie rule."""
    if best is not None:
        values = torch.cat([best[0], values], dim=1)
        indices = torch.cat([best[1], indices], dim=1)
    values, indices = _order_ties(values, indices)
    return values[:, :k], indices[:, :k]


def _search_rows(x: torch.Tensor, k: int, block_rows: int | None) -> Neighbours:
    """Row blocks against all rows: one wide top-k per row. Best when D is small and the
    top-k, not the product, dominates (e.g. 7-D states)."""
    n = x.shape[0]
    block = block_rows or max(1, ROW_BLOCK_ELEMENTS // n)
    out_v = torch.empty(n, k, dtype=x.dtype, device=x.device)
    out_i = torch.empty(n, k, dtype=torch.long, device=x.device)
    with _exact_matmul():
        for s in range(0, n, block):
            gram = x[s:s + block] @ x.T
            gram[:, s:s + block].fill_diagonal_(float("-inf"))
            out_v[s:s + block], out_i[s:s + block] = _block_topk(gram, k)
    return Neighbours(out_i, out_v)


def _search_symmetric(x: torch.Tensor, k: int, block_rows: int | None) -> Neighbours:
    """Gram blocks (I, J) with J >= I only: block (I, J) gives rows I their candidates
    among columns J, and its transpose gives rows J theirs among columns I, so each
    inner product is computed once. Best when D is large and the product dominates."""
    n = x.shape[0]
    block = block_rows or SYMMETRIC_BLOCK
    starts = list(range(0, n, block))
    best = [None] * len(starts)
    out_v = torch.empty(n, k, dtype=x.dtype, device=x.device)
    out_i = torch.empty(n, k, dtype=torch.long, device=x.device)
    with _exact_matmul():
        for bi, s in enumerate(starts):
            rows = x[s:s + block]
            for bj in range(bi, len(starts)):
                t = starts[bj]
                gram = rows @ x[t:t + block].T
                if bi == bj:
                    gram.fill_diagonal_(float("-inf"))
                v, i = _block_topk(gram, k)
                best[bi] = _merge(best[bi], v, i + t, k)
                if bj != bi:
                    v, i = _block_topk(gram.T, k)
                    best[bj] = _merge(best[bj], v, i + s, k)
            out_v[s:s + block], out_i[s:s + block] = best[bi]
            best[bi] = None
    return Neighbours(out_i, out_v)


def _search_faiss(x: torch.Tensor, k: int, approximate: bool, hnsw_m: int = 32,
                  ef_search: int = 128) -> Neighbours:
    try:
        import faiss
    except ImportError:
        raise ImportError("the faiss backends need faiss: pip install 'harness[faiss]'") from None
    data = x.detach().cpu().float().contiguous().numpy()
    n, d = data.shape
    if approximate:
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(ef_search, k + 1)
    else:
        index = faiss.IndexFlatIP(d)
    index.add(data)
    values, indices = (torch.from_numpy(a) for a in index.search(data, k + 1))
    # Drop self; where self was not returned (many exact duplicates), drop the last.
    is_self = indices == torch.arange(n).unsqueeze(1)
    no_self = ~is_self.any(dim=1)
    is_self[no_self, -1] = True
    keep = ~is_self
    indices = indices[keep].view(n, k)
    values = values[keep].view(n, k)
    values, indices = _order_ties(values, indices)
    return Neighbours(indices.to(x.device), values.to(x.device), exact=not approximate)


def knn(x: torch.Tensor, k: int, *, backend: str = "torch", strategy: str = "auto",
        block_rows: int | None = None) -> Neighbours:
    """The k most similar other rows of `x` (inner product), best first, ties to lower index.

    Both torch strategies give identical lists; `auto` picks the faster one for the
    width. `faiss-flat` is exact but breaks boundary ties its own way; `faiss-hnsw` is
    approximate (measure it with `recall`)."""
    n = x.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k={k} must be in [1, N-1] = [1, {n - 1}]")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    if backend == "torch":
        if strategy == "symmetric" or (strategy == "auto" and x.shape[1] >= SYMMETRIC_MIN_DIM):
            return _search_symmetric(x, k, block_rows)
        return _search_rows(x, k, block_rows)
    if backend in ("faiss-flat", "faiss-hnsw"):
        return _search_faiss(x, k, approximate=backend == "faiss-hnsw")
    raise ValueError(f"unknown kNN backend {backend!r}; choose from {BACKENDS}")


def knn_among(x: torch.Tensor, queries: torch.Tensor, subset: torch.Tensor, k: int) -> Neighbours:
    """Exact neighbours of rows `queries` among rows `subset` only (indices into `subset`);
    used when a subsample leaves a row with too few neighbours from its long list."""
    sub = x[subset]
    local = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    local[subset] = torch.arange(len(subset), device=x.device)
    with _exact_matmul():
        gram = x[queries] @ sub.T  # few rows: only a subsample's short-list misses
    gram[torch.arange(len(queries), device=x.device), local[queries]] = float("-inf")
    values, indices = _block_topk(gram, k)
    return Neighbours(indices, values)


def recall(found: Neighbours, exact: Neighbours) -> float:
    """Fraction of the exact neighbours that `found` also lists (same k)."""
    hits = (found.indices.unsqueeze(2) == exact.indices.unsqueeze(1)).any(dim=2)
    return hits.float().mean().item()
