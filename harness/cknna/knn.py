"""Exact k-nearest-neighbour search by inner product, in row blocks.

CKNNA and mutual kNN only ever look at each sample's top-k neighbours, so the N x N Gram
matrix is never kept: each block of rows is multiplied against all rows, reduced to its
top-k, and dropped. One search at the largest k serves every smaller k, because the
top-k of a row is a prefix of its sorted top-k_max.

`knn` orders neighbours by similarity, highest first, and among exactly equal
similarities the lower sample index wins (deterministic, unlike `torch.topk`). That
order depends on where rows sit, so the metrics use `tie_graph` on top of it:
neighbours tied at the k-th place (decided in float64) share the remaining slots (see
its docstring and the README). A sample is never its own neighbour, nor,
when `groups` are given, a sample of its own group.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from harness.cknna import graph_kernels, topk_kernels
from harness.cknna.device_memory import block_elements
from harness.cknna.knn_lowdim import MAX_DIM as TREE_MAX_DIM
from harness.cknna.knn_lowdim import search_tree
from harness.cknna.neighbours import Neighbours, _block_topk, _order_ties, best_of, product_error

# Gram block sizes (float32) on CPU; on CUDA they follow free memory (device_memory).
# Row strategy: 4 M elements = 16 MB per block (as fast as 64 MB at N = 5000, D = 2304,
# and a quarter of the memory). Symmetric strategy: 2048 x 2048 = 16 MB.
ROW_BLOCK_ELEMENTS = 1 << 22
SYMMETRIC_BLOCK = 2048
# Working bytes per Gram element: the float32 block, a copy of it for a transposed top-k,
# and for rows with ties at the k-th place a gathered copy sorted with int64 indices.
GRAM_BYTES_PER_ELEMENT = 32
# Below this width the top-k costs more than the product: the row strategy wins. At
# D = 2304, N = 5000 the symmetric one is faster at k = 28 (0.37 s against 0.44 s) and as
# fast at k = 256 (0.51 s), measured on a quiet machine.
SYMMETRIC_MIN_DIM = 64
STRATEGIES = ("auto", "rows", "symmetric")
BACKENDS = ("torch", "faiss-flat", "faiss-hnsw", "tree")


@contextlib.contextmanager
def _exact_matmul():
    """TF32 matmuls change neighbour sets on CUDA; keep full float32 during the search."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _mask_same_group(gram: torch.Tensor, groups: torch.Tensor | None, row0: int, col0: int) -> None:
    """Pairs in one group are never neighbours: their similarities become -inf."""
    if groups is not None:
        rows = groups[row0:row0 + gram.shape[0]]
        cols = groups[col0:col0 + gram.shape[1]]
        gram.masked_fill_(rows.unsqueeze(1) == cols.unsqueeze(0), float("-inf"))


class _BlockTopK:
    """Each offered block's `torch.topk` (for its rows, and transposed for its columns'
    rows), a row block's candidates merged once it has had every column block: the path
    on CUDA and for dtypes other than float32."""

    def __init__(self, x: torch.Tensor, k: int):
        self.k = k
        self.found: dict[int, list] = {}  # per row block: candidate lists from each block
        self.values = torch.empty(x.shape[0], k, dtype=x.dtype, device=x.device)
        self.indices = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)

    def offer(self, gram: torch.Tensor, row0: int, col0: int, transposed: bool = False):
        v, i = _block_topk(gram, self.k)
        self.found.setdefault(row0, []).append((v, i + col0))
        if transposed:
            v, i = _block_topk(gram.T.contiguous(), self.k)
            self.found.setdefault(col0, []).append((v, i + row0))

    def rows_done(self, row0: int) -> None:
        """The rows of the block starting at row0 have had every column."""
        parts = self.found.pop(row0)
        if len(parts) == 1:  # all columns in one block: its top-k is the rows' top-k
            values, indices = parts[0]
        else:
            values, indices = best_of(*(torch.cat(p, dim=1) for p in zip(*parts)), self.k)
        self.values[row0:row0 + len(values)], self.indices[row0:row0 + len(values)] = values, indices

    def result(self) -> Neighbours:
        return Neighbours(self.indices, self.values)


class _CompiledTopK:
    """`topk_kernels.RunningTopK` behind the same calls: every row keeps its best so far,
    so a finished row block needs nothing more."""

    def __init__(self, x: torch.Tensor, k: int):
        self.running = topk_kernels.RunningTopK(x.shape[0], k)

    def offer(self, gram: torch.Tensor, row0: int, col0: int, transposed: bool = False):
        self.running.offer(gram.numpy(), row0, col0, transposed)

    def rows_done(self, row0: int) -> None:
        pass

    def result(self) -> Neighbours:
        values, indices = self.running.result()
        return Neighbours(torch.from_numpy(indices), torch.from_numpy(values))


def _top_k(x: torch.Tensor, k: int) -> _BlockTopK | _CompiledTopK:
    """The compiled running top-k for float32 rows on the CPU (the same lists as the
    per-block `torch.topk` and merge; searches at N = 50,000 about 1.7x faster); the
    per-block torch top-k elsewhere (CUDA)."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return _CompiledTopK(x, k)
    return _BlockTopK(x, k)


def _search_rows(x: torch.Tensor, k: int, block_rows: int | None,
                 groups: torch.Tensor | None = None) -> Neighbours:
    """Row blocks against all rows: one wide top-k per row. Best when D is small and the
    top-k, not the product, dominates (e.g. 7-D states)."""
    n = x.shape[0]
    block = block_rows or max(1, block_elements(x.device, ROW_BLOCK_ELEMENTS,
                                                GRAM_BYTES_PER_ELEMENT) // n)
    top = _top_k(x, k)
    with _exact_matmul():
        for s in range(0, n, block):
            gram = x[s:s + block] @ x.T
            gram[:, s:s + block].fill_diagonal_(float("-inf"))
            _mask_same_group(gram, groups, s, 0)
            top.offer(gram, s, 0)
            top.rows_done(s)
    return top.result()


def _search_symmetric(x: torch.Tensor, k: int, block_rows: int | None,
                      groups: torch.Tensor | None = None) -> Neighbours:
    """Gram blocks (I, J) with J >= I only: block (I, J) gives rows I their candidates
    among columns J, and its transpose gives rows J theirs among columns I, so each
    inner product is computed once. Best when D is large and the product dominates."""
    n = x.shape[0]
    block = block_rows or math.isqrt(block_elements(x.device, SYMMETRIC_BLOCK ** 2,
                                                    GRAM_BYTES_PER_ELEMENT))
    starts = list(range(0, n, block))
    top = _top_k(x, k)
    with _exact_matmul():
        for bi, s in enumerate(starts):
            rows = x[s:s + block]
            for bj in range(bi, len(starts)):
                t = starts[bj]
                gram = rows @ x[t:t + block].T
                if bi == bj:
                    gram.fill_diagonal_(float("-inf"))
                _mask_same_group(gram, groups, s, t)
                top.offer(gram, s, t, transposed=bj != bi)
            top.rows_done(s)  # earlier row blocks' transposes and its own blocks: all columns
    return top.result()


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
        block_rows: int | None = None, groups: torch.Tensor | None = None) -> Neighbours:
    """The k most similar other rows of `x` (inner product), best first, ties to lower index.

    Both torch strategies give identical lists; `auto` picks the faster one for the
    width. `faiss-flat` is exact but breaks boundary ties its own way; `faiss-hnsw` is
    approximate (measure it with `recall`); `tree` gives the torch lists by a k-d tree
    (faster for low-D rows at large N). With `groups` (N integer labels) rows of one
    group are never neighbours; a row with fewer than k others outside its group gets
    -inf similarities at the end of its list."""
    n = x.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k={k} must be in [1, N-1] = [1, {n - 1}]")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    if backend == "torch":
        if groups is not None:
            groups = groups.to(x.device)
        if strategy == "symmetric" or (strategy == "auto" and x.shape[1] >= SYMMETRIC_MIN_DIM):
            return _search_symmetric(x, k, block_rows, groups)
        return _search_rows(x, k, block_rows, groups)
    if backend == "tree" and x.shape[1] <= TREE_MAX_DIM:  # exact k-d tree for low-D rows
        return search_tree(x, k, groups)
    if backend == "tree":  # wider rows: a tree visits most of itself, torch is faster
        return knn(x, k, strategy=strategy, block_rows=block_rows, groups=groups)
    if groups is not None:
        raise ValueError(f"excluding same-group neighbours needs the torch kNN backend, not {backend!r}")
    if backend in ("faiss-flat", "faiss-hnsw"):
        return _search_faiss(x, k, approximate=backend == "faiss-hnsw")
    raise ValueError(f"unknown kNN backend {backend!r}; choose from {BACKENDS}")


def knn_among(x: torch.Tensor, queries: torch.Tensor, subset: torch.Tensor, k: int,
              groups: torch.Tensor | None = None) -> Neighbours:
    """Exact neighbours of rows `queries` among rows `subset` only (indices into `subset`);
    used when a subsample leaves a row with too few neighbours from its long list."""
    sub = x[subset]
    local = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    local[subset] = torch.arange(len(subset), device=x.device)
    with _exact_matmul():
        gram = x[queries] @ sub.T  # few rows: only a subsample's short-list misses
    gram[torch.arange(len(queries), device=x.device), local[queries]] = float("-inf")
    if groups is not None:
        gram.masked_fill_(groups[queries].unsqueeze(1) == groups[subset].unsqueeze(0), float("-inf"))
    values, indices = _block_topk(gram, k)
    return Neighbours(indices, values)


def recall(found: Neighbours, exact: Neighbours) -> float:
    """Fraction of the exact neighbours that `found` also lists (same k)."""
    hits = (found.indices.unsqueeze(2) == exact.indices.unsqueeze(1)).any(dim=2)
    return hits.float().mean().item()


# ---------------------------------------------------------------- order-invariant ties

# Similarities within TIE_RTOL * |x_i| * max|x_j| of each other (computed in float64) are
# one tie. The inputs (features, states) are float32, and rounding a float32 input moves a
# similarity by up to 2^-23 of that scale: differences below a few such units are not in
# the data (e.g. one frame extracted at two scales, normalised either way), so they tie.
TIE_RTOL = 4 * 2.0 ** -23
# Extra list length searched beyond the largest k, so a tie zone rarely runs off the list.
TIE_MARGIN = 8
# A weighted graph larger than this is refused rather than filling memory.
MAX_GRAPH_EDGES = 50_000_000


@dataclass(frozen=True)
class Graph:
    """A weighted kNN graph (host tensors): row src[e] has neighbour dst[e] with weight[e]
    in (0, 1] and similarity val[e] (float64); each row's weights sum to k. `tied_rows`
    counts rows whose tie at the k-th place crosses it (some tied neighbours in, some out)."""

    src: torch.Tensor
    dst: torch.Tensor
    val: torch.Tensor
    weight: torch.Tensor
    n: int
    k: int
    tied_rows: int


def search_error(x: torch.Tensor, search_dtype: torch.dtype | None = None) -> float:
    """Bound on |searched x_i . x_j - exact x_i . x_j| / (|x_i| |x_j|): the product's
    rounding in the search's dtype, plus the rounding of x into that dtype when the
    search ran on a lower-precision copy of float64 rows (`Space` does)."""
    search_dtype = search_dtype or x.dtype
    error = product_error(x if x.dtype == search_dtype else x[:0].to(search_dtype))
    if x.dtype != search_dtype:
        error += 2 * torch.finfo(search_dtype).eps
    return error


def graph_at(g: graph_kernels.UnionGraph, k: int) -> Graph:
    """One k's graph out of a union of graphs."""
    w = g.w[:, g.at(k)]
    keep = w > 0
    src = np.repeat(np.arange(g.n), np.diff(g.ptr))[keep]
    return Graph(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (src, g.dst[keep], g.val[keep], w[keep])),
                 g.n, k, int(g.crossing[g.at(k)]))


class HostLists:
    """A search's lists and its features on the host, as the kernels take them, with the
    float64 products of listed pairs computed so far: every graph of a space (all
    samples, each subset, every k) asks for the same few pairs again."""

    def __init__(self, x: torch.Tensor, nb: Neighbours):
        host = x.detach().cpu()
        self.x = host.contiguous().numpy()
        self.norms = graph_kernels.row_norms(self.x)
        self.indices = nb.indices.cpu().contiguous().numpy()
        self.values = nb.values.detach().cpu().contiguous().numpy()  # as searched (float32)
        self.memo = np.full(self.indices.shape, np.nan)
        self.gamma = search_error(x, nb.values.dtype)
        self._rpos = None

    @property
    def rpos(self) -> np.ndarray:
        """Where each row sits in its neighbours' lists (`graph_kernels.reverse_positions`)."""
        if self._rpos is None:
            self._rpos = graph_kernels.reverse_positions(self.indices, self.values)
        return self._rpos

    def forget_reverse_positions(self) -> None:
        self._rpos = None

    def fill_products(self, depth: int) -> None:
        """The products of listed pairs at positions < depth, now, in one parallel pass
        (`graph_kernels.fill_products`): for many subset graphs that will ask for them."""
        graph_kernels.fill_products(self, depth)

    def slab(self, ks, members: torch.Tensor, scratch: graph_kernels.SlabScratch, name: str,
             groups: torch.Tensor | None = None) -> graph_kernels.SlabGraph | None:
        """`tie_graphs` over `members` in a thread's reusable slabs, or None where a row
        needs the general path (`graph_kernels.slab`)."""
        return graph_kernels.slab(self, ks, members.cpu().numpy(), scratch, name,
                                  groups=None if groups is None else groups.cpu().numpy(),
                                  rtol=TIE_RTOL)

    def tie_graphs(self, ks, members: torch.Tensor | None = None,
                   groups: torch.Tensor | None = None) -> graph_kernels.UnionGraph:
        """`tie_graph` at every k in ks, over all samples (in parallel) or the sorted
        `members` only (on the calling thread: subsets run side by side)."""
        return graph_kernels.build(
            self.x, self.norms, self.indices, self.values, self.memo, ks,
            members=None if members is None else members.cpu().numpy(),
            groups=None if groups is None else groups.cpu().numpy(),
            rtol=TIE_RTOL, gamma=self.gamma, max_edges=MAX_GRAPH_EDGES, parallel=members is None)

    def list_graphs(self, ks, lists: Neighbours | None = None,
                    members: torch.Tensor | None = None) -> graph_kernels.UnionGraph:
        """The index rule's graphs from `lists` (default: the search's own; node numbers
        are positions in `members`), with float64 similarities."""
        members = np.arange(self.x.shape[0]) if members is None else members.cpu().numpy()
        local = self.indices[:, :max(ks)] if lists is None else lists.indices.cpu().numpy()
        rows = np.repeat(members, local.shape[1])
        values = graph_kernels.products(self.x, rows, members[local.ravel()]).reshape(local.shape)
        listed = self.values[:, :local.shape[1]] if lists is None else lists.values.cpu().double().numpy()
        values[listed == -np.inf] = -np.inf
        return graph_kernels.from_lists(local, values, ks)


def tie_graph(x: torch.Tensor, nb: Neighbours, k: int, *,
              groups: torch.Tensor | None = None) -> Graph:
    """The order-invariant kNN graph at k from a search's lists (`knn`, any tie order).

    Definition: row i's k-th largest similarity s; every candidate within
    tol = TIE_RTOL |x_i| max|x_j| of s is tied; candidates above the tie weigh 1, the
    tied ones share the remaining slots, (k - #above) / #tied each; the rest 0. Only
    similarities enter, so a joint reordering of the samples cannot change the graph.
    How the lists are used (which candidates are scored again in float64, which rows
    against every candidate) is `graph_kernels.build`'s docstring."""
    return graph_at(HostLists(x, nb).tie_graphs((k,), groups=groups), k)
