"""Compiled kernels (numba, CPU) for the metric's per-edge work, one pass each:

- `build`: the order-invariant tie graphs of several k at once (one edge list, one weight
  row per k), over all samples or over a subset, from neighbour lists searched once;
- `hsic`: the unbiased HSIC sums of two such graphs with M = min(w_A, w_B), for the
  identity or for a batch of relabellings of A (the permutation null);
- `fill_products`: the float64 products of the lists' first positions, ahead of many
  subset graphs.

Graphs are host (NumPy) arrays. On CUDA the callers copy lists and features to the host
once per space; the searches stay on the device.

The per-subset kernels (`_slab_graph`, `_one`, `_self`) compile with numba's "numpy"
error model: no Python exception paths in their loops (none of their divisions can be by
zero), which makes a subset's graph and sums about 8% faster.

The kernels take the k values as a tuple, not an array: its length is then part of the
compiled type, so every loop over k unrolls (builds and HSIC passes about 10% faster).

Float64 products x_i . x_j are summed in a free order (agreement with the dense float64
definition to ~1e-15, not bit-for-bit with a torch reduction); the same pair always gives
the same bits, so duplicate rows tie exactly wherever they sit.
"""
from __future__ import annotations

import types
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import numba
from numba import njit, prange

ROWS_PER_CHUNK = 256  # rows per parallel work item of `build`
SLAB_SPARE = 8  # edges a row may hold beyond max(k) before `build` computes it twice


@dataclass(frozen=True)
class UnionGraph:
    """Weighted kNN graphs for the k in `ks` on n nodes, as one edge list: row i's edges are
    ptr[i]:ptr[i+1], neighbours `dst` ascending, float64 similarity `val`, weight w[e, q]
    under ks[q] (0 where the edge belongs to another k only). `crossing[q]`: rows whose
    tie crosses the k-th place; `short[q]`: rows whose list held fewer than k candidates
    (scored again against every candidate). rev[e]: the edge (j, i) of edge e = (i, j), -1
    where there is none."""

    ptr: np.ndarray
    dst: np.ndarray
    val: np.ndarray
    w: np.ndarray
    rev: np.ndarray
    n: int
    ks: tuple
    crossing: np.ndarray
    short: np.ndarray

    def at(self, k: int) -> int:
        return self.ks.index(k)

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Where each row's edges start and end."""
        return self.ptr[:-1], self.ptr[1:]

    def self_scale(self, k: int) -> float:
        """Size of the trace term of the self-HSIC at k (a near-zero value counts as zero)."""
        w = self.w[:, self.at(k)]
        return float(((w * self.val) ** 2).sum()) / (self.n * (self.n - 3))


@njit(cache=True, fastmath={"reassoc", "contract"})
def _dot(x, i, j):
    """x_i . x_j in float64, summed in the vector order the compiler picks for this one
    function (reassociation is allowed here and nowhere else: vector registers make it
    about 2x faster than eight scalar running sums at D = 2048, within ~1e-16 of them).
    The kernels all link this one compiled function, so one pair (either way round), or
    two pairs of equal rows, always give the same bits: duplicates tie exactly and a
    relabelling that maps the data onto itself gives the observed sums bit for bit."""
    s = 0.0
    for t in range(x.shape[1]):
        s += np.float64(x[i, t]) * np.float64(x[j, t])
    return s


@njit(cache=True, inline="always")
def _remember(x, memo, rpos, i, p, j):
    """x_i . x_j for row i's list position p (neighbour j), stored there and, where j
    lists i too (rpos given and >= 0), at j's place for i: one product for both."""
    v = _dot(x, i, j)
    memo[i, p] = v
    if len(rpos) > 0 and rpos[i, p] >= 0:
        memo[j, rpos[i, p]] = v
    return v


@njit(cache=True)
def _sort_row(dst, val, w, lo, hi):
    """Insertion sort of one row's edges by neighbour (rows are short, mostly sorted)."""
    nk = w.shape[1]
    for a in range(lo + 1, hi):
        if dst[a - 1] <= dst[a]:
            continue
        d, v = dst[a], val[a]
        b = a - 1
        while b >= lo and dst[b] > d:
            b -= 1
        for c in range(a, b + 1, -1):  # rotate b+1..a right by one
            dst[c], val[c] = dst[c - 1], val[c - 1]
            for q in range(nk):
                w[c, q], w[c - 1, q] = w[c - 1, q], w[c, q]
        dst[b + 1], val[b + 1] = d, v


SORT_IN_PLACE_MAX = 16  # zones up to this size are sorted by insertion, without a slice


@njit(cache=True, inline="always")
def _sorted_copy(vals, lo, count, ranked):
    """vals[lo:lo + count] ascending into ranked[:count]. Tie zones hold a few values:
    an insertion sort with plain indices costs less than slicing and `sort` there."""
    if count > SORT_IN_PLACE_MAX:
        ranked[:count] = vals[lo:lo + count]
        ranked[:count].sort()
        return
    for t in range(count):
        v = vals[lo + t]
        u = t
        while u > 0 and ranked[u - 1] > v:
            ranked[u] = ranked[u - 1]
            u -= 1
        ranked[u] = v


@njit(cache=True, inline="always")
def _tie(vals, lo, count, k, n_above, tol, ranked):
    """Row i's k-th largest value s, known to be among vals[lo:lo + count] with n_above
    candidates above them all, and its tie: (s, share of each tied candidate, #above,
    #tied)."""
    if count == 1:
        s = vals[lo]
    else:
        _sorted_copy(vals, lo, count, ranked)
        s = ranked[count - 1 - min(max(k - n_above - 1, 0), count - 1)]
    above, tied = 0, 0
    for t in range(lo, lo + count):
        if vals[t] > s + tol:
            above += 1
        elif abs(vals[t] - s) <= tol:
            tied += 1
    n_up = n_above + above
    return s, (k - n_up) / max(tied, 1), n_up, tied


@njit(cache=True, inline="always")
def _weight(v, s, tol, share):
    if v > s + tol:
        return 1.0
    if abs(v - s) <= tol:
        return share
    return 0.0


@njit(cache=True, inline="always")
def _emit(wrow, dst, val, out_dst, out_val, out_w, at, limit):
    """An edge (1) if some k weighs it, written at `at` when below `limit`; else nothing (0)."""
    keep = False
    for q in range(len(wrow)):  # plain loops: array methods and slice copies cost more here
        keep = keep or wrow[q] > 0
    if not keep:
        return 0
    if at < limit:
        out_dst[at], out_val[at] = dst, val
        for q in range(len(wrow)):
            out_w[at, q] = wrow[q]
    return 1


@njit(cache=True)
def _rescan_row(r, x, members, groups, ks, tol, sc, crossing_row, out_dst, out_val, out_w, start,
                limit):
    """Row r against every member in float64 (its list may miss part of a tie)."""
    sims, ranked, s_k, share_k, wrow = sc.sims, sc.ranked, sc.s_k, sc.share_k, sc.wrow
    i = members[r]
    m = len(members)
    valid = 0
    for c in range(m):
        j = members[c]
        if c == r or (len(groups) > 0 and groups[j] == groups[i]):
            sims[c] = -np.inf
        else:
            sims[c] = _dot(x, i, j)
            valid += 1
    nk = len(ks)
    if valid < ks[nk - 1]:
        return -1
    for q in range(nk):
        s_k[q], share_k[q], n_up, tied = _tie(sims, 0, m, ks[q], 0, tol, ranked)
        crossing_row[q] = n_up + tied > ks[q]
    count = 0
    for c in range(m):
        if sims[c] == -np.inf:
            continue
        for q in range(nk):
            wrow[q] = _weight(sims[c], s_k[q], tol, share_k[q])
        count += _emit(wrow, c, sims[c], out_dst, out_val, out_w, start + count, limit)
    return count


_Scratch = namedtuple("_Scratch", "kept_pos kept_val ex sims ranked n_above zone_end s_k share_k wrow "
                                  "rescanned")


@njit(cache=True)
def _scratch(length, m, nk):
    """One thread's work arrays for `_row`."""
    return _Scratch(np.empty(length, np.int64), np.empty(length), np.empty(length), np.empty(m),
                    np.empty(max(m, length)), np.empty(nk, np.int64), np.empty(nk, np.int64),
                    np.empty(nk), np.empty(nk), np.empty(nk), np.zeros(1, np.int64))


@njit(cache=True)
def _row(r, x, norms, idx, vals, memo, rpos, members, local, groups, ks, rtol, gamma, full_lists,
         maxnorm, sc, crossing_row, short_row, out_dst, out_val, out_w, start, limit, out_pos,
         sort):
    """Row r's edges (written from `start` on, those that fall below `limit`; with `sort`,
    rows are written sorted by neighbour when all fit); returns their count, -1 when the
    row has fewer than max(ks) candidates at all. `out_pos` (when not empty) gets each
    edge's position in the list; a row scored against every candidate instead sets
    sc.rescanned.

    Search values are within gamma |x_i| max|x_j| of the truth, so only candidates within
    `reach` of the listed k-th value can be tied or cross it: those are scored in float64
    (as is every kept edge's value). A row whose k-th place or tie zone may lie past its
    list is scored against every candidate (`_rescan_row`)."""
    kept_pos, kept_val, ex = sc.kept_pos, sc.kept_val, sc.ex
    n_above, zone_end, s_k, share_k, wrow = sc.n_above, sc.zone_end, sc.s_k, sc.share_k, sc.wrow
    i = members[r]
    scale = norms[i] * maxnorm
    tol = rtol * scale
    reach = 2 * gamma * scale + tol
    length = idx.shape[1]
    nk = len(ks)
    kmax = ks[nk - 1]
    cnt = 0
    stop = -np.inf  # once kmax members are kept: the last zone's end
    for pos in range(length):  # the list's subset members, best first, to the last zone's end
        v = vals[i, pos]
        if v == -np.inf or v < stop:
            break
        kept_pos[cnt], kept_val[cnt] = pos, v  # kept only if a member: no branch to mispredict
        ex[cnt] = memo[i, pos]  # read in list order beside the list, not scattered later
        cnt += local[idx[i, pos]] >= 0
        if cnt == kmax:
            stop = kept_val[kmax - 1] - reach
    last = -np.inf if full_lists else vals[i, length - 1]
    rescan = False
    for q in range(nk):
        short_row[q] = cnt < ks[q]
        if cnt < ks[q] or last >= kept_val[ks[q] - 1] - reach:
            rescan = True
    if rescan:
        sc.rescanned[0] = 1
        return _rescan_row(r, x, members, groups, ks, tol, sc, crossing_row, out_dst, out_val,
                           out_w, start, limit)
    end = 0
    for q in range(nk):
        kth = kept_val[ks[q] - 1]
        a = 0
        while kept_val[a] > kth + reach:
            a += 1
        b = a
        while b < cnt and kept_val[b] >= kth - reach:
            b += 1
        n_above[q], zone_end[q] = a, b
        end = max(end, b)
    for t in range(end):  # written out, not a helper: array arguments cost a call each
        if ex[t] != ex[t]:  # NaN: not computed yet
            ex[t] = _remember(x, memo, rpos, i, kept_pos[t], idx[i, kept_pos[t]])
    for q in range(nk):
        a, b = n_above[q], zone_end[q]
        if b - a == 1:  # one candidate near the k-th place: no tie (as `_tie` finds)
            s_k[q], share_k[q], n_up, tied = ex[a], ks[q] - a, a, 1
        else:
            s_k[q], share_k[q], n_up, tied = _tie(ex, a, b - a, ks[q], a, tol, sc.ranked)
        crossing_row[q] = n_up + tied > ks[q]
    count = 0
    for t in range(end):
        for q in range(nk):
            if t < n_above[q]:
                wrow[q] = 1.0
            elif t < zone_end[q]:
                wrow[q] = _weight(ex[t], s_k[q], tol, share_k[q])
            else:
                wrow[q] = 0.0
        keep = False  # `_emit`, written out with the list position
        for q in range(nk):
            keep = keep or wrow[q] > 0
        if not keep:
            continue
        at = start + count
        if at < limit:
            out_dst[at], out_val[at] = local[idx[i, kept_pos[t]]], ex[t]
            for q in range(nk):
                out_w[at, q] = wrow[q]
            if len(out_pos) > 0:
                out_pos[at] = kept_pos[t]
        count += 1
    if sort and start + count <= limit:
        _sort_row(out_dst, out_val, out_w, start, start + count)
    return count


@njit(cache=True, nogil=True)
def _reverse(ptr, dst):
    """rev[e]: the edge (j, i) of each edge e = (i, j), -1 where there is none. In-edges are
    bucketed by target (sources ascending, like each row's targets), then each row's out-
    and in-edges are merged."""
    n, e_count = len(ptr) - 1, len(dst)
    in_ptr = np.zeros(n + 1, np.int64)
    for e in range(e_count):
        in_ptr[dst[e] + 1] += 1
    in_ptr = np.cumsum(in_ptr)
    fill = in_ptr[:n].copy()
    in_src, in_edge = np.empty(e_count, np.int64), np.empty(e_count, np.int64)
    for i in range(n):
        for e in range(ptr[i], ptr[i + 1]):
            at = fill[dst[e]]
            in_src[at], in_edge[at] = i, e
            fill[dst[e]] += 1
    rev = np.full(e_count, -1, np.int64)
    for j in range(n):
        a, b = ptr[j], in_ptr[j]
        while a < ptr[j + 1] and b < in_ptr[j + 1]:
            if dst[a] == in_src[b]:  # edge a = (j, i) reverses edge in_edge[b] = (i, j)
                rev[in_edge[b]] = a
                a += 1
                b += 1
            elif dst[a] < in_src[b]:
                a += 1
            else:
                b += 1
    return rev


def _build(x, norms, idx, vals, memo, members, local, groups, ks, rtol, gamma, full_lists,
           max_edges):
    m, nk, length = len(members), len(ks), idx.shape[1]
    maxnorm = 0.0
    for r in range(m):
        maxnorm = max(maxnorm, norms[members[r]])
    counts = np.zeros(m + 1, np.int64)
    crossing = np.zeros((m, nk), np.bool_)
    short = np.zeros((m, nk), np.bool_)
    chunks = (m + ROWS_PER_CHUNK - 1) // ROWS_PER_CHUNK
    # Pass 1 writes each row into a slab of `cap` edges (enough without ties); pass 2
    # copies the slabs into place and computes again only rows that overflowed theirs.
    cap = ks[nk - 1] + SLAB_SPARE
    tmp_dst, tmp_val = np.empty(m * cap, np.int64), np.empty(m * cap)
    tmp_w = np.empty((m * cap, nk))
    no_pos, no_rpos = np.empty(0, np.int64), np.empty((0, 0), np.int32)
    for c in prange(chunks):
        sc = _scratch(length, m, nk)
        for r in range(c * ROWS_PER_CHUNK, min(m, (c + 1) * ROWS_PER_CHUNK)):
            counts[r + 1] = _row(r, x, norms, idx, vals, memo, no_rpos, members, local, groups,
                                 ks, rtol, gamma, full_lists, maxnorm, sc, crossing[r], short[r],
                                 tmp_dst, tmp_val, tmp_w, r * cap, (r + 1) * cap, no_pos, True)
    ptr = np.cumsum(counts)
    if counts.min() < 0 or ptr[m] > max_edges:
        return (False, ptr, tmp_dst[:0], tmp_val[:0], tmp_w[:0], crossing.sum(axis=0),
                short.sum(axis=0))
    dst, val, w = np.empty(ptr[m], np.int64), np.empty(ptr[m]), np.empty((ptr[m], nk))
    for c in prange(chunks):
        sc = _scratch(length, m, nk)
        for r in range(c * ROWS_PER_CHUNK, min(m, (c + 1) * ROWS_PER_CHUNK)):
            n_r = ptr[r + 1] - ptr[r]
            if n_r <= cap:
                dst[ptr[r]:ptr[r + 1]] = tmp_dst[r * cap:r * cap + n_r]
                val[ptr[r]:ptr[r + 1]] = tmp_val[r * cap:r * cap + n_r]
                w[ptr[r]:ptr[r + 1]] = tmp_w[r * cap:r * cap + n_r]
            else:
                _row(r, x, norms, idx, vals, memo, no_rpos, members, local, groups, ks, rtol,
                     gamma, full_lists, maxnorm, sc, crossing[r], short[r], dst, val, w, ptr[r],
                     ptr[r + 1], no_pos, True)
    return True, ptr, dst, val, w, crossing.sum(axis=0), short.sum(axis=0)


def _compiled(f, name, **options):
    """`f` compiled under its own name (its own cache entry) with `options`."""
    g = types.FunctionType(f.__code__, f.__globals__, name, f.__defaults__, f.__closure__)
    g.__qualname__ = name
    return njit(cache=True, **options)(g)


# Parallel over rows (one graph over all samples), or one thread (`nogil`: a subset's
# graph, many subsets side by side in Python threads).
_build_rows = _compiled(_build, "_build_rows", parallel=True)
_build_one = _compiled(_build, "_build_one", nogil=True)
# Inlined where one thread builds row after row (`_slab_graph`): a call with array
# arguments costs as much as a short row.
_row_inline = _compiled(_row.py_func, "_row_inline", inline="always")


def build(x: np.ndarray, norms: np.ndarray, idx: np.ndarray, vals: np.ndarray, memo: np.ndarray,
          ks, *, members: np.ndarray | None = None, groups: np.ndarray | None = None,
          rtol: float, gamma: float, max_edges: int, parallel: bool = True) -> UnionGraph:
    """Tie graphs at every k in `ks` over `members` (sorted sample indices; all by default),
    nodes numbered by position in `members`, from lists `idx`/`vals` (every sample's,
    best first, -inf padding last) and the float64 products known so far (`memo`, NaN where
    not yet computed; filled in here). `groups`: same-group pairs are never candidates.
    `parallel=False` runs on the calling thread only, without holding the GIL; threads
    building graphs of one space at once may both compute a product and store it (the
    same bits, one aligned 8-byte store each)."""
    n = x.shape[0]
    members = np.arange(n) if members is None else np.ascontiguousarray(members, np.int64)
    local = np.full(n, -1, np.int64)
    local[members] = np.arange(len(members))
    ks = tuple(sorted(set(int(k) for k in ks)))
    groups = np.empty(0, np.int64) if groups is None else np.ascontiguousarray(groups, np.int64)
    full_lists = idx.shape[1] >= n - 1
    ok, ptr, dst, val, w, crossing, short = (_build_rows if parallel else _build_one)(
        x, norms, idx, vals, memo, members, local, groups, ks, rtol, gamma, full_lists, max_edges)
    if not ok:
        raise ValueError(f"k={ks[-1]}: some rows have fewer than k candidate neighbours, or "
                         f"ties make the neighbour graph larger than {max_edges} edges (most "
                         "rows tie with most others); the data are degenerate")
    return UnionGraph(ptr, dst, val, w, _reverse(ptr, dst), len(members), ks, crossing, short)


@njit(cache=True, nogil=True)
def _from_lists(lists, values, ks):
    m, kmax = lists.shape
    nk = len(ks)
    ptr = np.arange(m + 1) * kmax
    dst, val, w = np.empty(m * kmax, np.int64), np.empty(m * kmax), np.zeros((m * kmax, nk))
    for r in range(m):
        for t in range(kmax):
            e = r * kmax + t
            dst[e], val[e] = lists[r, t], values[r, t]
            for q in range(nk):
                w[e, q] = 1.0 if t < ks[q] and values[r, t] > -np.inf else 0.0
        _sort_row(dst, val, w, r * kmax, (r + 1) * kmax)
    return ptr, dst, val, w


def from_lists(lists: np.ndarray, values: np.ndarray, ks) -> UnionGraph:
    """The index rule's graphs: row r's first k listed neighbours (`lists`, node numbers)
    weigh 1, with similarities `values` (float64)."""
    ks = tuple(sorted(set(int(k) for k in ks)))
    ptr, dst, val, w = _from_lists(np.ascontiguousarray(lists[:, :ks[-1]], np.int64),
                                   np.ascontiguousarray(values[:, :ks[-1]], np.float64),
                                   np.array(ks, np.int64))
    zeros = np.zeros(len(ks), np.int64)
    return UnionGraph(ptr, dst, val, w, _reverse(ptr, dst), len(lists), ks, zeros, zeros)


@njit(cache=True, parallel=True)
def _row_norms(x, out):
    for i in prange(x.shape[0]):
        out[i] = np.sqrt(_dot(x, i, i))


def row_norms(x: np.ndarray) -> np.ndarray:
    """|x_i| in float64 from `_dot` (float32 rows are not copied to float64 first)."""
    out = np.empty(x.shape[0])
    _row_norms(x, out)
    return out


@njit(cache=True, nogil=True)
def products(x, rows, cols):
    """Float64 x_rows[e] . x_cols[e] for every pair e."""
    out = np.empty(len(rows))
    for e in range(len(rows)):
        out[e] = _dot(x, rows[e], cols[e])
    return out


GROUP_ROWS = 8  # rows whose listed products `fill_products` computes together


@njit(cache=True)
def _neighbourhoods(idx, vals, size):
    """Rows in groups of up to `size`: a row and its first listed neighbours not yet in a
    group (rows of one group share much of their lists). Returns (rows, group starts)."""
    n = idx.shape[0]
    taken = np.zeros(n, np.bool_)
    order, starts = np.empty(n, np.int64), np.zeros(n + 1, np.int64)
    at, groups = 0, 0
    for i in range(n):
        if taken[i]:
            continue
        taken[i], order[at] = True, i
        at += 1
        for p in range(idx.shape[1]):
            if at - starts[groups] == size or vals[i, p] == -np.inf:
                break
            j = idx[i, p]
            if not taken[j]:
                taken[j], order[at] = True, j
                at += 1
        groups += 1
        starts[groups] = at
    return order, starts[:groups + 1]


@njit(cache=True, parallel=True)
def _fill_products(x, idx, vals, memo, rpos, order, starts, depth):
    """Group by group, memo[i, p] for the group's listed pairs at positions p < depth not
    known yet, in ascending neighbour order (each neighbour's row read once per group,
    in address order); a pair listed both ways is stored in both places."""
    for g in prange(len(starts) - 1):
        size = (starts[g + 1] - starts[g]) * depth
        rows, places = np.empty(size, np.int64), np.empty(size, np.int64)
        nbrs = np.empty(size, np.int64)
        c = 0
        for t in range(starts[g], starts[g + 1]):
            i = order[t]
            for p in range(depth):
                if vals[i, p] == -np.inf:
                    break
                if memo[i, p] != memo[i, p]:  # NaN: not known
                    rows[c], places[c], nbrs[c] = i, p, idx[i, p]
                    c += 1
        for e in np.argsort(nbrs[:c], kind="mergesort"):
            i, p, j = rows[e], places[e], nbrs[e]
            if memo[i, p] != memo[i, p]:  # not stored meanwhile as j's pair
                _remember(x, memo, rpos, i, p, j)


def fill_products(lists, depth: int) -> None:
    """The float64 products of every listed pair at positions < depth, into `lists.memo`
    (a `knn.HostLists`), in one parallel pass before many graphs ask for them (rows read
    in groups of neighbours, each pair listed both ways computed once): five models at
    N = 5000 take about 0.5 s, against about 1.4 s when subset graphs meet the products
    one by one. The same bits as `_dot` gives anywhere."""
    depth = min(depth, lists.indices.shape[1])
    order, starts = _neighbourhoods(lists.indices, lists.values, GROUP_ROWS)
    _fill_products(lists.x, lists.indices, lists.values, lists.memo, lists.rpos, order, starts,
                   depth)


# ---------------------------------------------------------------- HSIC sums


@njit(cache=True, nogil=True, error_model="numpy")
def _one(ks, perm, a_start, a_end, a_dst, a_val, a_w, a_rev, b_start, b_end, b_dst, b_val, b_w,
         b_rev):
    """Per k: unbiased HSIC (Song et al. 2012, eq. 5) of M*K_A[perm] and M*L_B, and sum M,
    in one pass over B's rows. Edge (i, j) of A[perm] is edge (perm[i], perm[j]) of A:
    A's row perm[i] is marked (row stamp and edge number), B's row i looked up in the
    mark. With K~ = M*K, L~ = M*L: tr(K~L~) = sum over shared (i, j) whose reverse is
    shared of M_ij K_ij M_ji L_ji (the reverse edges are precomputed: (j, i) of B and
    (perm[j], perm[i]) of A); 1'K~1 = sum M K; 1'L~1 = sum M L;
    1'K~L~1 = sum_l (K~ into l)(L~ out of l)."""
    n, nk = len(perm), len(ks)
    mark = np.zeros(n, np.int64)
    k_into = np.zeros((nk, n))
    l_out = np.zeros((nk, n))
    acc = np.zeros((nk, 4))
    for i in range(n):
        u = perm[i]
        stamp = (i + 1) << 32  # marks of earlier rows are below it: none to clear (edge
        # numbers take the low 32 bits: `build` refuses graphs over knn.MAX_GRAPH_EDGES)
        for ea in range(a_start[u], a_end[u]):
            mark[a_dst[ea]] = stamp | ea
        for eb in range(b_start[i], b_end[i]):
            j = b_dst[eb]
            got = mark[perm[j]]
            if got < stamp:
                continue
            ea = got & 0xFFFFFFFF
            eb2, ea2 = b_rev[eb], a_rev[ea]
            for q in range(nk):
                m = min(a_w[ea, q], b_w[eb, q])
                if m <= 0:
                    continue
                mk, ml = m * a_val[ea], m * b_val[eb]
                acc[q, 0] += mk
                acc[q, 1] += ml
                acc[q, 3] += m
                k_into[q, j] += mk
                l_out[q, i] += ml
                if ea2 >= 0 and eb2 >= 0:
                    m2 = min(a_w[ea2, q], b_w[eb2, q])
                    if m2 > 0:
                        acc[q, 2] += mk * m2 * b_val[eb2]
    return _finish(acc, k_into, l_out)


@njit(cache=True, nogil=True, error_model="numpy")
def _self(ks, start, end, dst, val, w, rev):
    """`_one` of a graph with itself under the identity, the same sums in the same order,
    without the marks: every edge is shared with itself."""
    n, nk = len(start), len(ks)
    k_into = np.zeros((nk, n))
    l_out = np.zeros((nk, n))
    acc = np.zeros((nk, 4))
    for i in range(n):
        for e in range(start[i], end[i]):
            j, e2 = dst[e], rev[e]
            for q in range(nk):
                m = w[e, q]
                if m <= 0:
                    continue
                mk = m * val[e]
                acc[q, 0] += mk
                acc[q, 3] += m
                k_into[q, j] += mk
                l_out[q, i] += mk
                if e2 >= 0 and w[e2, q] > 0:
                    acc[q, 2] += mk * w[e2, q] * val[e2]
    acc[:, 1] = acc[:, 0]
    return _finish(acc, k_into, l_out)


@njit(cache=True, nogil=True, inline="always")
def _finish(acc, k_into, l_out):
    """Per k: the unbiased HSIC from the sums (tr, 1'K1, 1'L1, sum M) and the row sums
    into and out of each node, and sum M."""
    nk, n = k_into.shape
    out = np.empty((2, nk))
    for q in range(nk):
        cross = 0.0
        for l in range(n):
            cross += k_into[q, l] * l_out[q, l]
        hsic = acc[q, 2] + acc[q, 0] * acc[q, 1] / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)
        out[0, q], out[1, q] = hsic / (n * (n - 3)), acc[q, 3]
    return out


@njit(cache=True, parallel=True)
def _many(ks, perms, a_start, a_end, a_dst, a_val, a_w, a_rev, b_start, b_end, b_dst, b_val, b_w,
          b_rev):
    """`_one` for every row of perms, in parallel."""
    out = np.empty((perms.shape[0], 2, len(ks)))
    for d in prange(perms.shape[0]):
        out[d] = _one(ks, perms[d], a_start, a_end, a_dst, a_val, a_w, a_rev, b_start, b_end,
                      b_dst, b_val, b_w, b_rev)
    return out


def _arrays(g, ks):
    """A graph's rows (edges start:end of each) and edge arrays, weights of `ks` only."""
    rows = [g.at(k) for k in ks]
    w = g.w if rows == list(range(len(g.ks))) else np.ascontiguousarray(g.w[:, rows])
    return (*g.rows(), g.dst, g.val, w, g.rev)


def hsic(ga, gb, ks, perms: np.ndarray | None = None):
    """Unbiased HSIC of M*K_A and M*L_B, M = min(W_A, W_B), at each k in `ks`, and sum M:
    arrays (len(ks),) for the graphs as they are, or (P, len(ks)) for A relabelled by each
    row p of `perms` (A[p]: edge (i, j) weighs what (p[i], p[j]) weighs in A), in
    parallel. Graphs are `UnionGraph`s or `SlabGraph`s, in any pairing. Each relabelling
    is one `_one`: an identity row gives the bits of `perms=None` (`_self` for a graph
    with itself: the same sums, no marks)."""
    if ga.n != gb.n:
        raise ValueError(f"graphs on {ga.n} and {gb.n} nodes")
    if ga.n < 4:
        raise ValueError(f"unbiased HSIC needs N >= 4 samples, got {ga.n}")
    ks = tuple(int(k) for k in ks)
    a, b = _arrays(ga, ks), _arrays(gb, ks)
    if perms is None:  # on the calling thread (callers run many pairs side by side)
        out = _self(ks, *a) if ga is gb else _one(ks, np.arange(ga.n), *a, *b)
        return out[0], out[1]
    out = _many(ks, np.ascontiguousarray(perms, np.int64), *a, *b)
    return out[:, 0], out[:, 1]



# ---------------------------------------------------------------- subset graphs in slabs
#
# A subset's graph over and over (hundreds of subsets x every model): each row's edges sit
# in a fixed slab of `cap` slots (list order, unsorted), in arrays reused from subset to
# subset, and each edge's reverse is found through the lists themselves: rpos[i, p] is
# where i sits in the list of its p-th neighbour j, and slot[j, p'] the place in j's slab
# that j's edge at list position p' took (-1 if none). No allocation, sort or merge per
# subset; the table holds places within a slab (< cap), not edge numbers, so it is int8 at
# the usual k and stays in a core's cache.


def index_type(limit: int):
    """The smallest signed integer type that holds 0..limit-1 and -1 (places in a slab, list
    positions)."""
    return np.int8 if limit <= 127 else np.int16 if limit <= 32767 else np.int32


@njit(cache=True, parallel=True)
def _reverse_positions(idx, vals, rpos):
    """Fills `rpos` (all -1 on entry): each listed pair (i, p) is bucketed under its
    neighbour j; then row j's list is marked once and all of j's bucket read off the mark."""
    n, length = idx.shape
    ptr = np.zeros(n + 1, np.int64)
    for i in range(n):
        for p in range(length):
            if vals[i, p] > -np.inf:
                ptr[idx[i, p] + 1] += 1
    ptr = np.cumsum(ptr)
    fill = ptr[:n].copy()
    asked = np.empty(ptr[n], np.int64)  # i * length + p, bucketed by j
    for i in range(n):
        for p in range(length):
            if vals[i, p] > -np.inf:
                j = idx[i, p]
                asked[fill[j]] = i * length + p
                fill[j] += 1
    chunks = (n + ROWS_PER_CHUNK - 1) // ROWS_PER_CHUNK
    for c in prange(chunks):
        mark = np.zeros(n, np.int64)
        for j in range(c * ROWS_PER_CHUNK, min(n, (c + 1) * ROWS_PER_CHUNK)):
            for q in range(length):
                if vals[j, q] > -np.inf:
                    mark[idx[j, q]] = q + 1
            for t in range(ptr[j], ptr[j + 1]):
                i, p = asked[t] // length, asked[t] % length
                rpos[i, p] = mark[i] - 1
            for q in range(length):
                mark[idx[j, q]] = 0


def reverse_positions(idx: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """rpos[i, p]: the position of i in the list of its p-th neighbour, -1 where absent."""
    rpos = np.full(idx.shape, -1, index_type(idx.shape[1]))  # a list position, or -1
    _reverse_positions(np.ascontiguousarray(idx), vals, rpos)
    return rpos


@njit(cache=True, nogil=True, inline="always")
def _clear_slots(slot, members, pos, end, cap, rows):
    """The slot table left all -1 again, where rows 0..rows-1 wrote to it."""
    for r in range(rows):
        for e in range(r * cap, end[r]):
            slot[members[r], pos[e]] = -1


@njit(cache=True, nogil=True, error_model="numpy")
def _slab_graph(x, norms, idx, vals, memo, rpos, members, local, groups, ks, rtol, gamma,
                full_lists, cap, dst, val, w, pos, end, rev, slot, totals):
    """`_build`'s graphs over `members`, row r in slots r*cap..end[r] (list order); False
    when a row needs more than its slab or was scored against every candidate (the
    caller then uses `build`). totals[q] = (crossing rows, sum of (w val)^2)."""
    m, nk, length = len(members), len(ks), idx.shape[1]
    maxnorm = 0.0
    for r in range(m):
        maxnorm = max(maxnorm, norms[members[r]])
    sc = _scratch(length, m, nk)
    crossing_row, short_row = np.zeros(nk, np.bool_), np.zeros(nk, np.bool_)
    totals[:] = 0.0
    for r in range(m):
        c = _row_inline(r, x, norms, idx, vals, memo, rpos, members, local, groups, ks, rtol,
                        gamma, full_lists, maxnorm, sc, crossing_row, short_row, dst, val, w,
                        r * cap, (r + 1) * cap, pos, False)
        if c < 0 or c > cap or sc.rescanned[0]:
            _clear_slots(slot, members, pos, end, cap, r)
            return False
        end[r] = r * cap + c
        for e in range(r * cap, end[r]):
            slot[members[r], pos[e]] = e - r * cap
            for q in range(nk):
                totals[q, 1] += (w[e, q] * val[e]) ** 2
        for q in range(nk):
            totals[q, 0] += crossing_row[q]
    for r in range(m):
        i = members[r]
        for e in range(r * cap, end[r]):
            p = rpos[i, pos[e]]
            t = slot[members[dst[e]], p] if p >= 0 else -1
            rev[e] = dst[e] * cap + t if t >= 0 else -1
    _clear_slots(slot, members, pos, end, cap, m)
    return True


class SlabScratch:
    """One thread's arrays for slab graphs, reused from subset to subset: a `slot` table
    (n x list length, all -1 between calls) and slabs grown to the largest subset seen."""

    def __init__(self):
        self._arrays = {}

    def array(self, name: str, shape: tuple, dtype, fill=None) -> np.ndarray:
        have = self._arrays.get(name)
        if have is None or have.shape[1:] != shape[1:] or len(have) < shape[0] or have.dtype != dtype:
            have = np.empty(shape, dtype) if fill is None else np.full(shape, fill, dtype)
            self._arrays[name] = have
        return have[:shape[0]]


class SlabGraph:
    """The graphs at every k over a subset, as `UnionGraph` but in slabs: row r's edges
    are r*cap..end[r], unsorted. Its arrays are `scratch`'s under `name`: valid until the
    next slab graph of that name on that thread."""

    def __init__(self, ks, n: int, scratch: SlabScratch, name: str):
        self.ks, self.n = ks, n
        self.cap = ks[-1] + SLAB_SPARE
        size = n * self.cap
        self.dst = scratch.array(name + ".dst", (size,), np.int64)
        self.val = scratch.array(name + ".val", (size,), np.float64)
        self.w = scratch.array(name + ".w", (size, len(ks)), np.float64)
        self.pos = scratch.array(name + ".pos", (size,), np.int64)
        self.rev = scratch.array(name + ".rev", (size,), np.int64)
        self.end = scratch.array(name + ".end", (n,), np.int64)
        self.totals = np.empty((len(ks), 2))

    def at(self, k: int) -> int:
        return self.ks.index(k)

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        return np.arange(self.n) * self.cap, self.end

    @property
    def crossing(self) -> np.ndarray:
        return self.totals[:, 0].astype(np.int64)

    def self_scale(self, k: int) -> float:
        return float(self.totals[self.at(k), 1]) / (self.n * (self.n - 3))


def slab(lists, ks, members: np.ndarray, scratch: SlabScratch, name: str, *,
         groups: np.ndarray | None, rtol: float) -> SlabGraph | None:
    """`build`'s graphs of `lists` (a `knn.HostLists`) over sorted `members`, or None when
    some row needs `build`'s general path (a tie wider than its slab, a short list)."""
    ks = tuple(sorted(set(int(k) for k in ks)))
    g = SlabGraph(ks, len(members), scratch, name)
    n = lists.x.shape[0]
    local = scratch.array("local", (n,), np.int64, fill=-1)
    slot = scratch.array("slot", lists.indices.shape, index_type(g.cap), fill=-1)
    local[members] = np.arange(len(members))
    groups = np.empty(0, np.int64) if groups is None else np.ascontiguousarray(groups, np.int64)
    try:
        ok = _slab_graph(lists.x, lists.norms, lists.indices, lists.values, lists.memo,
                         lists.rpos, members, local, groups, ks, rtol,
                         lists.gamma, lists.indices.shape[1] >= n - 1, g.cap, g.dst, g.val, g.w,
                         g.pos, g.end, g.rev, slot, g.totals)
    finally:
        local[members] = -1
    return g if ok else None


def threads() -> int:
    """Threads the kernels use (numba's setting: NUMBA_NUM_THREADS, default every core)."""
    return numba.get_num_threads()
