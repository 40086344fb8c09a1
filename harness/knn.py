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

# Elements of one block of the Gram matrix (float32): 16 M elements = 64 MB.
DEFAULT_BLOCK_ELEMENTS = 1 << 24
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
    """Top-k of each row of a Gram block under the tie rule."""
    take = min(k + 1, gram.shape[1])
    values, indices = torch.topk(gram, take, dim=1)
    # A left-out value equal to the k-th one means topk chose among ties arbitrarily.
    ambiguous = values[:, k] == values[:, k - 1] if take > k else None
    values, indices = _order_ties(values[:, :k], indices[:, :k])
    if ambiguous is not None and ambiguous.any():
        rows = ambiguous.nonzero().flatten()
        # Columns are in index order, so a stable sort puts the lower index first.
        v, i = torch.sort(gram[rows], dim=1, descending=True, stable=True)
        values[rows], indices[rows] = v[:, :k], i[:, :k]
    return values, indices


def _search_torch(x: torch.Tensor, k: int, block_rows: int | None,
                  queries: torch.Tensor | None = None) -> Neighbours:
    n = x.shape[0]
    rows = queries if queries is not None else torch.arange(n, device=x.device)
    block = block_rows or max(1, DEFAULT_BLOCK_ELEMENTS // max(n, 1))
    out_v = torch.empty(len(rows), k, dtype=x.dtype, device=x.device)
    out_i = torch.empty(len(rows), k, dtype=torch.long, device=x.device)
    with _exact_matmul():
        for start in range(0, len(rows), block):
            q = rows[start:start + block]
            gram = x[q] @ x.T
            gram[torch.arange(len(q), device=x.device), q] = float("-inf")
            out_v[start:start + len(q)], out_i[start:start + len(q)] = _block_topk(gram, k)
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


def knn(x: torch.Tensor, k: int, *, backend: str = "torch",
        block_rows: int | None = None) -> Neighbours:
    """The k most similar other rows of `x` (inner product), best first, ties to lower index.

    `faiss-flat` is exact but breaks boundary ties its own way; `faiss-hnsw` is
    approximate (measure it with `recall`)."""
    n = x.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k={k} must be in [1, N-1] = [1, {n - 1}]")
    if backend == "torch":
        return _search_torch(x, k, block_rows)
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
        gram = x[queries] @ sub.T
    gram[torch.arange(len(queries), device=x.device), local[queries]] = float("-inf")
    values, indices = _block_topk(gram, k)
    return Neighbours(indices, values)


def recall(found: Neighbours, exact: Neighbours) -> float:
    """Fraction of the exact neighbours that `found` also lists (same k)."""
    hits = (found.indices.unsqueeze(2) == exact.indices.unsqueeze(1)).any(dim=2)
    return hits.float().mean().item()
