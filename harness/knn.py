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

import torch

from harness.device_memory import block_elements
from harness.knn_lowdim import MAX_DIM as TREE_MAX_DIM
from harness.knn_lowdim import search_tree
from harness.neighbours import Neighbours, _block_topk, _order_ties, product_error

# Gram block sizes (float32) on CPU; on CUDA they follow free memory (device_memory).
# Row strategy: 16 M elements = 64 MB per block. Symmetric strategy: 2048 x 2048 = 16 MB,
# big enough for an efficient matmul and top-k, small enough that skipping the lower
# triangle saves a third of the product at N = 5000.
ROW_BLOCK_ELEMENTS = 1 << 24
SYMMETRIC_BLOCK = 2048
# Working bytes per Gram element: the float32 block, a copy of it for a transposed top-k,
# and for rows with ties at the k-th place a gathered copy sorted with int64 indices.
GRAM_BYTES_PER_ELEMENT = 32
# Below this width the top-k costs more than the product: the row strategy wins.
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


def _merge(best, values, indices, k):
    """Keep the k best of two candidate lists under the tie rule."""
    if best is not None:
        values = torch.cat([best[0], values], dim=1)
        indices = torch.cat([best[1], indices], dim=1)
    values, indices = _order_ties(values, indices)
    return values[:, :k], indices[:, :k]


def _mask_same_group(gram: torch.Tensor, groups: torch.Tensor | None, row0: int, col0: int) -> None:
    """Pairs in one group are never neighbours: their similarities become -inf."""
    if groups is not None:
        rows = groups[row0:row0 + gram.shape[0]]
        cols = groups[col0:col0 + gram.shape[1]]
        gram.masked_fill_(rows.unsqueeze(1) == cols.unsqueeze(0), float("-inf"))


def _search_rows(x: torch.Tensor, k: int, block_rows: int | None,
                 groups: torch.Tensor | None = None) -> Neighbours:
    """Row blocks against all rows: one wide top-k per row. Best when D is small and the
    top-k, not the product, dominates (e.g. 7-D states)."""
    n = x.shape[0]
    block = block_rows or max(1, block_elements(x.device, ROW_BLOCK_ELEMENTS,
                                                GRAM_BYTES_PER_ELEMENT) // n)
    out_v = torch.empty(n, k, dtype=x.dtype, device=x.device)
    out_i = torch.empty(n, k, dtype=torch.long, device=x.device)
    with _exact_matmul():
        for s in range(0, n, block):
            gram = x[s:s + block] @ x.T
            gram[:, s:s + block].fill_diagonal_(float("-inf"))
            _mask_same_group(gram, groups, s, 0)
            out_v[s:s + block], out_i[s:s + block] = _block_topk(gram, k)
    return Neighbours(out_i, out_v)


def _search_symmetric(x: torch.Tensor, k: int, block_rows: int | None,
                      groups: torch.Tensor | None = None) -> Neighbours:
    """Gram blocks (I, J) with J >= I only: block (I, J) gives rows I their candidates
    among columns J, and its transpose gives rows J theirs among columns I, so each
    inner product is computed once. Best when D is large and the product dominates."""
    n = x.shape[0]
    block = block_rows or math.isqrt(block_elements(x.device, SYMMETRIC_BLOCK ** 2,
                                                    GRAM_BYTES_PER_ELEMENT))
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
                _mask_same_group(gram, groups, s, t)
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
RESCAN_ELEMENTS = 1 << 22  # float64 similarities per re-scan chunk (32 MB)
# A weighted graph larger than this is refused rather than filling memory.
MAX_GRAPH_EDGES = 50_000_000


@dataclass(frozen=True)
class Graph:
    """A weighted kNN graph: row src[e] has neighbour dst[e] with weight[e] in (0, 1] and
    similarity val[e] (float64); each row's weights sum to k. `tied_rows` counts rows
    whose tie at the k-th place crosses it (some tied neighbours in, some out)."""

    src: torch.Tensor
    dst: torch.Tensor
    val: torch.Tensor
    weight: torch.Tensor
    n: int
    k: int
    tied_rows: int


def _weights(exact: torch.Tensor, zone: torch.Tensor, n_above: torch.Tensor, k: int,
             tol: torch.Tensor):
    """Tie weights of each row from float64 similarities `exact` (valid inside `zone`)
    and the number of candidates known to be above the zone: the k-th largest value s
    lies in the zone; within tol of s is tied; above the tie weighs 1, the tied share
    the remaining slots. Returns weights (0 outside the zone's relevant part) and the
    rows whose tie crosses the k-th place."""
    ranked = exact.masked_fill(~zone, float("-inf")).sort(dim=1, descending=True).values
    need = (k - n_above - 1).clamp(0, exact.shape[1] - 1)
    s = ranked.gather(1, need.unsqueeze(1))
    above = zone & (exact > s + tol.unsqueeze(1))
    tied = zone & ((exact - s).abs() <= tol.unsqueeze(1))
    n_up, n_tied = n_above + above.sum(1), tied.sum(1)
    share = (k - n_up).double() / n_tied.clamp_min(1).double()
    weights = above.double() + tied.double() * share.unsqueeze(1)
    return weights, n_up + n_tied > k


PRODUCT_ELEMENTS = 1 << 17  # float64 pair products per chunk: 1 MB, stays in cache


def _dot64(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Float64 x_rows[e] . x_cols[e], pair by pair, in cache-sized chunks (rows converted
    to float64 as they are gathered, so no float64 copy of x is kept). Each pair is one
    row sum of the same length, so chunking never changes a bit of the result."""
    out = torch.empty(len(rows), dtype=torch.float64, device=x.device)
    chunk = max(1, PRODUCT_ELEMENTS // x.shape[1])
    for s in range(0, len(rows), chunk):
        pairs = x[rows[s:s + chunk]].double()
        pairs.mul_(x[cols[s:s + chunk]].double())
        torch.sum(pairs, 1, out=out[s:s + chunk])
    return out


def _count_at_least(values: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Per row, how many float32 `values` are >= the float64 `bound`: compared against the
    smallest float32 >= bound, so the values need no float64 copy."""
    if values.dtype != torch.float32:
        return (values.double() >= bound.unsqueeze(1)).sum(1)
    rounded = bound.float()
    up = torch.nextafter(rounded, torch.full_like(rounded, float("inf")))
    at_least = torch.where(rounded.double() < bound, up, rounded)
    return (values >= at_least.unsqueeze(1)).sum(1)


def search_error(x: torch.Tensor, search_dtype: torch.dtype | None = None) -> float:
    """Bound on |searched x_i . x_j - exact x_i . x_j| / (|x_i| |x_j|): the product's
    rounding in the search's dtype, plus the rounding of x into that dtype when the
    search ran on a lower-precision copy of float64 rows (`Space` does)."""
    search_dtype = search_dtype or x.dtype
    error = product_error(x if x.dtype == search_dtype else x[:0].to(search_dtype))
    if x.dtype != search_dtype:
        error += 2 * torch.finfo(search_dtype).eps
    return error


def zone_reach(x: torch.Tensor, members: torch.Tensor, memo: "ZoneMemo | None" = None,
               search_dtype: torch.dtype | None = None):
    """Per member row: the tie tolerance, and how far a listed (searched) similarity may
    lie from the true one plus that tolerance (see `tie_graph`)."""
    norms = memo.norms if memo is not None else x.double().norm(dim=1)
    scale = norms[members] * norms[members].max()
    tol = TIE_RTOL * scale
    return tol, 2 * search_error(x, search_dtype) * scale + tol


def zone_ends_inside(nb: Neighbours, k: int, reach: torch.Tensor) -> bool:
    """Whether every row's zone at k ends before its last listed entry: then `tie_graph`
    never looks past it, and longer lists (same leading entries) give the same graph."""
    lo = nb.values[:, k - 1].double() - reach
    return bool((_count_at_least(nb.values, lo) < nb.k).all())


def tie_graph(x: torch.Tensor, nb: Neighbours, k: int, *, universe: torch.Tensor | None = None,
              groups: torch.Tensor | None = None, last: torch.Tensor | None = None,
              memo: "ZoneMemo | None" = None, positions: torch.Tensor | None = None) -> Graph:
    """The order-invariant kNN graph at k from a search's lists (`knn`, any tie order).

    Definition: row i's k-th largest similarity s; every candidate within
    tol = TIE_RTOL |x_i| max|x_j| of s is tied; candidates above the tie weigh 1, the
    tied ones share the remaining slots, (k - #above) / #tied each; the rest 0. Only
    similarities enter, so a joint reordering of the samples cannot change the graph.

    The search's (float32) values are within beta = gamma_D |x_i| max|x_j| of the truth
    (plus the rounding of x into the search's dtype when x is float64: `search_error`),
    so only candidates whose value is within 2 beta + tol of the listed k-th value can be
    tied or cross it: those are scored again in float64 (two copies of one row then get
    the same value wherever they sat in a block), the rest keep the search's values.
    A row whose zone may run past its list (`last`, default its last listed value, is in
    the zone) is scored again in float64 against every candidate. `universe` (sorted
    sample indices) restricts the candidates to a subset: `nb`'s rows are then the
    subset's and its indices local, with -inf for entries outside it. `groups` drops
    same-group candidates in those re-scans. `memo` (the full search's float64 products,
    by row and list position; `positions` maps `nb`'s entries to those positions) saves
    computing a product twice; the values are the same either way."""
    n, length = nb.indices.shape
    device = nb.indices.device
    members = universe if universe is not None else torch.arange(x.shape[0], device=device)
    tol, reach = zone_reach(x, members, memo, nb.values.dtype)
    kth = nb.values[:, k - 1].double()
    hi, lo = kth + reach, kth - reach
    last = nb.values[:, -1].double() if last is None else last.double()
    # Entries below every row's zone weigh 0: drop those columns (lists are sorted).
    width = max(k, int(_count_at_least(nb.values, lo).max()))
    if width < length:
        nb = Neighbours(nb.indices[:, :width], nb.values[:, :width], nb.exact)
        positions = positions[:, :width] if positions is not None else None
    values = nb.values.double()
    above = values > hi.unsqueeze(1)
    zone = (values >= lo.unsqueeze(1)) & ~above
    unsafe = (last >= lo) | (kth == float("-inf"))
    if length == len(members) - 1 and universe is None:
        unsafe &= kth == float("-inf")
    zone &= ~unsafe.unsqueeze(1)
    # Float64 rows searched as a float32 copy: every kept entry's value in float64 too.
    scored = zone
    if x.dtype == torch.float64 and nb.values.dtype != torch.float64:
        scored = (~unsafe).unsqueeze(1).expand_as(zone)
    r, c = scored.nonzero(as_tuple=True)
    exact = torch.zeros_like(values)
    if memo is not None:
        exact[r, c] = memo.products(members[r], c if positions is None else positions[r, c])
    else:
        exact[r, c] = _dot64(x, members[r], members[nb.indices[r, c]])
    weights, crossing = _weights(exact, zone, above.sum(1), k, tol)
    weights = weights + above.double()
    keep = ((weights > 0) & ~unsafe.unsqueeze(1)).view(-1).nonzero().flatten()
    vals = torch.where(scored, exact, values)
    parts = [(keep // values.shape[1], nb.indices.reshape(-1).index_select(0, keep),
              vals.view(-1).index_select(0, keep), weights.view(-1).index_select(0, keep))]
    crossing = crossing & ~unsafe
    redo = unsafe.nonzero().flatten()
    if len(redo):
        rescanned, crossed = _rescan(x.double(), members, redo, k, tol, groups)
        parts += rescanned
        crossing[redo] = crossed
    src, dst, val, weight = (torch.cat(p) for p in zip(*parts))
    return Graph(src, dst, val, weight, n, k, int(crossing.sum()))


class ZoneMemo:
    """Float64 products x_i . x_j of a search's listed pairs, computed on first use and
    kept by (row, list position): subsets and every k ask for the same few pairs again."""

    def __init__(self, x: torch.Tensor, nb: Neighbours):
        self.x = x
        self.norms = x.double().norm(dim=1)
        self.indices = nb.indices
        self.known = torch.zeros(nb.indices.shape, dtype=torch.bool, device=nb.indices.device)
        self.values = torch.zeros(nb.indices.shape, dtype=torch.float64, device=nb.indices.device)

    def products(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        flat = rows * self.indices.shape[1] + positions  # flat views: plain index kernels
        known, values = self.known.view(-1), self.values.view(-1)
        missing = flat[~known.index_select(0, flat)]
        if len(missing):
            r, p = missing // self.indices.shape[1], missing % self.indices.shape[1]
            values.index_copy_(0, missing, _dot64(self.x, r, self.indices[r, p]))
            known.index_fill_(0, missing, True)
        return values.index_select(0, flat)


def _rescan(x64, members, redo, k, tol, groups):
    """Float64 similarities of rows `redo` (local) to every member, as weighted edges."""
    cand = x64[members]
    chunk = max(1, RESCAN_ELEMENTS // max(1, len(members)))
    out, crossed, total = [], [], 0
    for s in range(0, len(redo), chunk):
        local_rows = redo[s:s + chunk]
        sims = x64[members[local_rows]] @ cand.T
        sims[torch.arange(len(local_rows), device=sims.device), local_rows] = float("-inf")
        if groups is not None:
            sims.masked_fill_(groups[members[local_rows]].unsqueeze(1) == groups[members].unsqueeze(0),
                              float("-inf"))
        if k > sims.shape[1] or (sims.topk(k, dim=1).values[:, -1] == float("-inf")).any():
            raise ValueError(f"k={k}: some rows have fewer than k candidate neighbours")
        none_above = torch.zeros(len(local_rows), dtype=torch.long, device=sims.device)
        weights, cross = _weights(sims, sims > float("-inf"), none_above, k, tol[local_rows])
        r, c = (weights > 0).nonzero(as_tuple=True)
        total += len(r)
        if total > MAX_GRAPH_EDGES:
            raise ValueError(f"k={k}: ties make the neighbour graph larger than {MAX_GRAPH_EDGES} "
                             "edges (most rows tie with most others); the data are degenerate")
        out.append((local_rows[r], c, sims[r, c], weights[r, c]))
        crossed.append(cross)
    return out, torch.cat(crossed)
