"""CKNNA, mutual kNN and linear CKA, computed from neighbour lists in O(N k).

The reference (platonic-rep `metrics.py`, copied as the seed's `compute_cknna.py`) builds
N x N kernels and masks and does three N^3 products per k. Every term it needs lives on
the edges of the kNN mask, so here each term is a sum over edges (see `_hsic_on_edges`).
Argument order matters: CKNNA(A, B) != CKNNA(B, A). Inputs are used as given; the
reference callers L2-normalise rows first (the CLI does too).

Sums run in float64. A result whose self-similarity terms are not positive (or vanish
against their own scale), or whose features are all one row, is NaN with a warning (the
reference would return a meaningless number or NaN).

Ties: by default (`ties="shared"`) the neighbour graphs are `knn.tie_graph`s, where
neighbours tied at the k-th place share the remaining slots; M = min(w_A, w_B) edge by
edge, so CKNNA and mutual kNN depend on similarities only and a joint reordering of the
samples leaves them unchanged. `ties="index"` is the earlier rule (lower index wins).
Significance (null, subsampling, comparisons) lives in `harness.significance`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from harness.knn import TIE_MARGIN, Graph, Neighbours, ZoneMemo, knn, tie_graph

EPS = 1e-6  # the reference's denominator term; part of its value


@dataclass(frozen=True)
class Edges:
    """A kNN mask as an edge list: sample src[e] has neighbour dst[e]; kernel values on it."""

    src: torch.Tensor
    dst: torch.Tensor
    k_val: torch.Tensor
    l_val: torch.Tensor
    n: int


# Pair maps: one int32 entry per pair row * n + col, shared and wiped after each use,
# while n^2 fits (N <= 5792 here: 128 MB); sorted keys and binary search beyond.
MAP_ELEMENTS = 1 << 25
_PAIR_MAPS: dict = {}


def _pair_map(size: int, device: torch.device) -> torch.Tensor:
    """A zeroed int32 array of at least `size` entries, kept for reuse (callers wipe what
    they write)."""
    table = _PAIR_MAPS.get(device)
    if table is None or len(table) < size:
        table = _PAIR_MAPS[device] = torch.zeros(size, dtype=torch.int32, device=device)
    return table


class EdgeKeys:
    """Where each edge (src[e], dst[e]) sits, found by pair key src * n + dst: written into
    the shared pair map for one lookup and wiped after it (no sort), or binary search in
    sorted keys (computed once: `sort`, or n^2 too large for the map), better when the
    same edges are searched many times for few keys."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, n: int, sort: bool | None = None):
        self.keys, self.n = src * n + dst, n
        self.sorted = None
        if sort or (sort is None and n * n > MAP_ELEMENTS):
            order = self.keys.argsort()
            self.sorted = order, self.keys[order]

    def find(self, queries: torch.Tensor) -> torch.Tensor:
        """The edge index of each query key, -1 where it is not an edge."""
        if self.sorted is not None:
            order, ordered = self.sorted
            if len(ordered) == 0:
                return torch.full_like(queries, -1)
            pos = torch.searchsorted(ordered, queries).clamp_max_(len(ordered) - 1)
            return torch.where(ordered[pos] == queries, order[pos], -1)
        table = _pair_map(self.n * self.n, self.keys.device)
        # index_copy_/index_select: the plain kernels, much faster than [] indexing.
        table.index_copy_(0, self.keys, torch.arange(1, len(self.keys) + 1, dtype=torch.int32,
                                                     device=self.keys.device))
        try:
            return table.index_select(0, queries.flatten()).view(queries.shape).long() - 1
        finally:
            table.index_fill_(0, self.keys, 0)


def _hsic_on_edges(e: Edges) -> float:
    """Unbiased HSIC (Song et al. 2012, eq. 5) of M*K and M*L, M the edge mask.

    tr(K~L~) = sum over edges whose reverse is also an edge of K_ij L_ij;
    1'K~1 = sum_E K; 1'L~1 = sum_E L; 1'K~L~1 = sum_l (K into l)(L out of l)."""
    m = e.n
    kv, lv = e.k_val.double(), e.l_val.double()
    has_reverse = EdgeKeys(e.src, e.dst, m).find(e.dst * m + e.src) >= 0
    trace = (kv * lv)[has_reverse].sum()
    k_into = torch.zeros(m, dtype=torch.float64, device=kv.device).index_add_(0, e.dst, kv)
    l_out = torch.zeros(m, dtype=torch.float64, device=kv.device).index_add_(0, e.src, lv)
    cross = (k_into * l_out).sum()
    hsic = trace + kv.sum() * lv.sum() / ((m - 1) * (m - 2)) - 2 * cross / (m - 2)
    return (hsic / (m * (m - 3))).item()


def _self_edges(nb: Neighbours) -> Edges:
    """The mask kNN_X with itself: every listed neighbour is an edge."""
    n, k = nb.indices.shape
    src = torch.arange(n, device=nb.indices.device).repeat_interleave(k)
    vals = nb.values.flatten()
    return Edges(src, nb.indices.flatten(), vals, vals, n)


class _EdgeIndex:
    """B's kNN edges (every listed neighbour), so A's edges can be looked up in them, many
    times over for a null (sorted keys, searched once per lookup)."""

    def __init__(self, nb: Neighbours):
        n, k = nb.indices.shape
        self.n, self.k = n, k
        self.rows = torch.arange(n, device=nb.indices.device).repeat_interleave(k)
        self.keys = EdgeKeys(self.rows, nb.indices.flatten(), n, sort=True)
        self.values = nb.values.flatten()

    def shared(self, na: Neighbours) -> tuple[Edges, torch.Tensor]:
        """Edges of A also in B, row by row (kNN_A(i) ∩ kNN_B(i)), and per-row overlaps."""
        dst = na.indices.flatten()
        found = self.keys.find(self.rows * self.n + dst)
        hit = found >= 0
        l_val = self.values[found[hit]]
        edges = Edges(self.rows[hit], dst[hit], na.values.flatten()[hit], l_val, self.n)
        return edges, hit.view(self.n, self.k).sum(dim=1)


def _ratio(kl: float, kk: float, ll: float) -> float:
    if not (kk > 0 and ll > 0) or math.isnan(kl):
        warnings.warn(f"CKNNA is degenerate (sim_KK={kk:.3g}, sim_LL={ll:.3g}, sim_KL={kl:.3g}): "
                      "reported as NaN", RuntimeWarning, stacklevel=3)
        return float("nan")
    return kl / (math.sqrt(kk * ll) + EPS)


def _check(a: torch.Tensor, b: torch.Tensor, k: int) -> None:
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"features must be 2-D (N, D); got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"A has {a.shape[0]} samples but B has {b.shape[0]}")
    n = a.shape[0]
    if n < 4:
        raise ValueError(f"unbiased HSIC needs N >= 4 samples, got {n}")
    if not 1 <= k <= n - 1:
        raise ValueError(f"k={k} must be in [1, N-1] = [1, {n - 1}]")


@dataclass(frozen=True)
class Scores:
    """One k's result; the sim_* parts are kept so the null can reuse them."""

    k: int
    cknna: float
    mutual_knn: float
    sim_kl: float
    sim_kk: float
    sim_ll: float


def scores_from_neighbours(na: Neighbours, nb: Neighbours, k: int) -> Scores:
    """CKNNA and mutual kNN at k from neighbour lists searched at any k' >= k."""
    na, nb = na.prefix(k), nb.prefix(k)
    shared, overlap = _EdgeIndex(nb).shared(na)
    kl = _hsic_on_edges(shared)
    kk = _hsic_on_edges(_self_edges(na))
    ll = _hsic_on_edges(_self_edges(nb))
    mutual = (overlap.double() / k).mean().item()
    return Scores(k, _ratio(kl, kk, ll), mutual, kl, kk, ll)


TIES = ("shared", "index")
DEGENERATE_RTOL = 1e-9  # self-HSIC below this fraction of its own scale counts as zero


def _check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(f"unknown tie rule {ties!r}; choose from {TIES}")


def all_rows_equal(x: torch.Tensor) -> bool:
    """Every row the same up to a few units of rounding (e.g. one direction at many
    scales, L2-normalised): no neighbour is truly closer than another, so any graph
    would be built from rounding noise."""
    if not x.is_floating_point():
        return bool((x == x[:1]).all())
    spread = (x - x[:1]).abs().max()
    return bool(spread <= 8 * torch.finfo(x.dtype).eps * x.abs().max())


class PairSet:
    """Membership of pair keys row * N + col: a map of one byte per pair when N^2 is at
    most BITMAP_BYTES (25 MB at N = 5000; a byte per pair is faster to index than packed
    bits), sorted unique keys beyond."""

    BITMAP_BYTES = 1 << 26

    def __init__(self, keys: torch.Tensor, n: int):
        self.bitmap = self.sorted = None
        if n * n <= self.BITMAP_BYTES:
            self.bitmap = torch.zeros(n * n, dtype=torch.bool, device=keys.device)
            self.bitmap[keys] = True
        else:
            self.sorted = keys.unique()

    def contains(self, queries: torch.Tensor) -> torch.Tensor:
        if self.bitmap is not None:  # index_select: several times faster than [] here
            return self.bitmap.index_select(0, queries.flatten()).view(queries.shape)
        if len(self.sorted) == 0:
            return torch.zeros_like(queries, dtype=torch.bool)
        pos = torch.searchsorted(self.sorted, queries).clamp_max_(len(self.sorted) - 1)
        return self.sorted[pos] == queries


@dataclass
class Space:
    """One feature matrix, its neighbour list searched once (at the largest k needed) and
    the graphs built from it, so every k, model pair and null draw reuses one search.
    Float64 rows are searched in float32 and their ties decided in float64 (so rows equal
    up to a positive scale, normalised in float64, tie: `harness.states.l2_rows`).

    `groups` (N integer labels) given here are excluded: same-group pairs are never
    neighbours."""

    x: torch.Tensor
    k_search: int
    ties: str = "shared"
    groups: torch.Tensor | None = None
    knn_options: dict = field(default_factory=dict)
    neighbours: Neighbours | None = None
    _graphs: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        _check_ties(self.ties)
        # Float64 rows: searched as a float32 copy (the reference's precision), scored again
        # in float64 from the rows themselves wherever a tie could be decided (tie_graph).
        self.search_x = self.x.float() if self.x.dtype == torch.float64 else self.x
        self.degenerate = all_rows_equal(self.search_x)
        length = self.k_search
        if self.ties == "shared":  # room for the tie zone below the largest k
            length = min(self.x.shape[0] - 1, length + TIE_MARGIN)
        given = self.neighbours
        if given is None or given.k < length:
            given = knn(self.search_x, length, groups=self.groups, **self.knn_options)
        self.neighbours = given

    def graph(self, k: int) -> Graph:
        """The tie graph at k over all samples (cached); the whole list is used, since
        its tail tells where a tie at the k-th place ends."""
        if k not in self._graphs:
            self._graphs[k] = tie_graph(self.x, self.neighbours, k, groups=self.groups,
                                        memo=self.memo)
        return self._graphs[k]

    def self_terms(self, k: int) -> tuple[float, float]:
        """sim(X, X) at k and its scale (cached: every pair and model reuses them)."""
        return self._cached(("self", k), lambda: self_terms(self.graph(k)))

    def edge_keys(self, k: int, sort: bool | None = None) -> EdgeKeys:
        """The graph's edge index (cached), for lookups of other graphs' edges."""
        return self._cached(("keys", k, sort), lambda: edge_keys(self.graph(k), sort))

    def _cached(self, key, make):
        if key not in self._graphs:
            self._graphs[key] = make()
        return self._graphs[key]

    @property
    def memo(self) -> ZoneMemo:
        """Float64 products of listed pairs, shared by every graph of this space."""
        if "memo" not in self._graphs:
            self._graphs["memo"] = ZoneMemo(self.x, self.neighbours)
        return self._graphs["memo"]


def _weighted_hsic(src, dst, k_val, l_val, weight, n) -> float:
    """Unbiased HSIC of M*K and M*L for a weighted mask M (M_ij = weight on edge (i, j)).

    With K~ = M*K, L~ = M*L (zero diagonal): tr(K~L~) = sum over edges whose reverse is an
    edge of M_ij M_ji K_ij L_ij; 1'K~1 = sum M K; 1'L~1 = sum M L;
    1'K~L~1 = sum_l (K~ into l)(L~ out of l)."""
    kw, lw = weight * k_val.double(), weight * l_val.double()
    reverse = EdgeKeys(src, dst, n).find(dst * n + src)
    mutual = (reverse >= 0).nonzero().flatten()  # then index_select: faster than masks
    trace = (kw.index_select(0, mutual) * l_val.index_select(0, mutual).double()
             * weight.index_select(0, reverse.index_select(0, mutual))).sum()
    k_into = torch.zeros(n, dtype=torch.float64, device=kw.device).index_add_(0, dst, kw)
    l_out = torch.zeros(n, dtype=torch.float64, device=kw.device).index_add_(0, src, lw)
    cross = (k_into * l_out).sum()
    hsic = trace + kw.sum() * lw.sum() / ((n - 1) * (n - 2)) - 2 * cross / (n - 2)
    return (hsic / (n * (n - 3))).item()


def _self_scale(g: Graph) -> float:
    """Size of the trace term of a self-HSIC, against which a near-zero value is zero."""
    return ((g.weight * g.val) ** 2).sum().item() / (g.n * (g.n - 3))


def edge_keys(g: Graph, sort: bool | None = None) -> EdgeKeys:
    return EdgeKeys(g.src, g.dst, g.n, sort)


def shared_edges(ga: Graph, gb: Graph, b_keys: EdgeKeys | None = None):
    """Edges in both graphs with M = min(w_A, w_B): (src, dst, K, L, M). `b_keys`:
    `edge_keys(gb)` when already known."""
    n = ga.n
    found = (b_keys or edge_keys(gb)).find(ga.src * n + ga.dst)
    hit = (found >= 0).nonzero().flatten()
    at = found.index_select(0, hit)
    return (ga.src.index_select(0, hit), ga.dst.index_select(0, hit),
            ga.val.index_select(0, hit), gb.val.index_select(0, at),
            torch.minimum(ga.weight.index_select(0, hit), gb.weight.index_select(0, at)))


def self_terms(g: Graph) -> tuple[float, float]:
    """sim(X, X) on a graph, and its scale (for the degeneracy test)."""
    return _weighted_hsic(g.src, g.dst, g.val, g.val, g.weight, g.n), _self_scale(g)


def scores_from_graphs(ga: Graph, gb: Graph, self_a=None, self_b=None, b_keys=None) -> Scores:
    """CKNNA and mutual kNN at k from two tie graphs (self terms and B's edge keys may
    be passed in when already computed)."""
    k, n = ga.k, ga.n
    src, dst, kv, lv, m = shared_edges(ga, gb, b_keys)
    kl = _weighted_hsic(src, dst, kv, lv, m, n)
    kk, kk_scale = self_a or self_terms(ga)
    ll, ll_scale = self_b or self_terms(gb)
    mutual = (m.sum() / (k * n)).item()
    if kk <= DEGENERATE_RTOL * kk_scale or ll <= DEGENERATE_RTOL * ll_scale:
        return Scores(k, _ratio(kl, min(kk, 0.0), min(ll, 0.0)), mutual, kl, kk, ll)
    return Scores(k, _ratio(kl, kk, ll), mutual, kl, kk, ll)


def degenerate_scores(k: int, which: str) -> Scores:
    """NaN scores (with a warning) when a space's rows are all equal."""
    warnings.warn(f"CKNNA is degenerate: every row of {which} is the same (after L2 "
                  "normalisation), so no neighbour is closer than another: reported as NaN",
                  RuntimeWarning, stacklevel=3)
    nan = float("nan")
    return Scores(k, nan, nan, nan, nan, nan)


def space_scores(sa: Space, sb: Space, k: int) -> Scores:
    """Scores at k for two spaces under their tie rule."""
    if sa.degenerate or sb.degenerate:
        return degenerate_scores(k, "A" if sa.degenerate else "B")
    if sa.ties == "index":
        return scores_from_neighbours(sa.neighbours, sb.neighbours, k)
    return scores_from_graphs(sa.graph(k), sb.graph(k), sa.self_terms(k), sb.self_terms(k),
                              sb.edge_keys(k))


def _spaces(feats_a, feats_b, topk, ties, groups, knn_options):
    _check(feats_a, feats_b, topk)
    return (Space(feats_a, topk, ties, groups, knn_options),
            Space(feats_b, topk, ties, groups, knn_options))


def cknna(feats_a: torch.Tensor, feats_b: torch.Tensor, topk: int, *, ties: str = "shared",
          groups: torch.Tensor | None = None, **knn_options) -> float:
    """CKNNA(A, B) with k = topk, without any N x N matrix; equals the reference on
    tie-free data. `groups`: same-group pairs are never neighbours."""
    return space_scores(*_spaces(feats_a, feats_b, topk, ties, groups, knn_options), topk).cknna


def mutual_knn(feats_a: torch.Tensor, feats_b: torch.Tensor, topk: int, *, ties: str = "shared",
               groups: torch.Tensor | None = None, **knn_options) -> float:
    """Mean over samples of |kNN_A(i) ∩ kNN_B(i)| / k (tie weights: sum of min(w_A, w_B))."""
    return space_scores(*_spaces(feats_a, feats_b, topk, ties, groups, knn_options),
                        topk).mutual_knn


def _linear_hsic_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased HSIC of K = XX', L = YY' from D x D products (no N x N matrix)."""
    n = x.shape[0]
    kd = (x * x).sum(1)
    ld = (y * y).sum(1)
    trace = (x.T @ y).square().sum() - (kd * ld).sum()
    k_rows = x @ x.sum(0) - kd
    l_rows = y @ y.sum(0) - ld
    hsic = trace + k_rows.sum() * l_rows.sum() / ((n - 1) * (n - 2)) - 2 * (k_rows * l_rows).sum() / (n - 2)
    return (hsic / (n * (n - 3))).item()


def cka(feats_a: torch.Tensor, feats_b: torch.Tensor, unbiased: bool = True) -> float:
    """Linear CKA; unbiased uses Song et al.'s HSIC estimator (equals CKNNA at k = N-1,
    up to the 1e-6 term), biased the centred-kernel form of Kornblith et al."""
    _check(feats_a, feats_b, 1)
    x, y = feats_a.double(), feats_b.double()
    if unbiased:
        return _cka_unbiased(x, y)
    x, y = x - x.mean(0), y - y.mean(0)
    xy = (x.T @ y).square().sum()
    return (xy / ((x.T @ x).norm() * (y.T @ y).norm())).item()


def _cka_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    kl, kk, ll = _linear_hsic_unbiased(x, y), _linear_hsic_unbiased(x, x), _linear_hsic_unbiased(y, y)
    if not (kk > 0 and ll > 0):
        warnings.warn("unbiased CKA is degenerate: reported as NaN", RuntimeWarning, stacklevel=3)
        return float("nan")
    return kl / math.sqrt(kk * ll)


