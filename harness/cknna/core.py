"""CKNNA, mutual kNN and linear CKA, computed from neighbour lists in O(N k).

The reference (platonic-rep `metrics.py`, copied as the seed's `compute_cknna.py`) builds
N x N kernels and masks and does three N^3 products per k. Every term it needs lives on
the edges of the kNN mask, so here each term is a sum over edges, computed by the
compiled kernels of `harness.cknna.graph_kernels` (`hsic`).
Argument order matters: CKNNA(A, B) != CKNNA(B, A). Inputs are used as given; the
reference callers L2-normalise rows first (the CLI does too).

Sums run in float64. A result whose self-similarity terms are not positive (or vanish
against their own scale), or whose features are all one row, is NaN with a warning (the
reference would return a meaningless number or NaN).

Ties: by default (`ties="shared"`) the neighbour graphs are `knn.tie_graph`s, where
neighbours tied at the k-th place share the remaining slots; M = min(w_A, w_B) edge by
edge, so CKNNA and mutual kNN depend on similarities only and a joint reordering of the
samples leaves them unchanged. `ties="index"` is the earlier rule (lower index wins).
Significance (null, subsampling, comparisons) lives in `harness.cknna.significance`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from harness.cknna import graph_kernels
from harness.cknna.knn import TIE_MARGIN, Graph, HostLists, Neighbours, graph_at, knn, knn_among

EPS = 1e-6  # the reference's denominator term; part of its value


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
    """CKNNA and mutual kNN at k from neighbour lists (searched at any k' >= k) and their
    own values: the index rule without re-scoring (float64 lists give float64 results)."""
    ga, gb = (graph_kernels.from_lists(x.indices.cpu().numpy(), x.values.cpu().double().numpy(), (k,))
              for x in (na, nb))
    return graph_scores(ga, gb, (k,))[k]


TIES = ("shared", "index")
DEGENERATE_RTOL = 1e-9  # self-HSIC below this fraction of its own scale counts as zero


def _check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(f"unknown tie rule {ties!r}; choose from {TIES}")


EQUAL_ROWS_BLOCK = 256  # rows compared with the first at once by `all_rows_equal`


def all_rows_equal(x: torch.Tensor) -> bool:
    """Every row the same up to a few units of rounding (e.g. one direction at many
    scales, L2-normalised): no neighbour is truly closer than another, so any graph
    would be built from rounding noise."""
    if not x.is_floating_point():
        return bool((x == x[:1]).all())
    low, high = torch.aminmax(x)  # one pass, no copy of x
    bound = 8 * torch.finfo(x.dtype).eps * torch.maximum(-low, high)
    for start in range(0, x.shape[0], EQUAL_ROWS_BLOCK):  # most data differ in the first block
        if not (x[start:start + EQUAL_ROWS_BLOCK] - x[:1]).abs().max() <= bound:  # NaN: no
            return False
    return True


@dataclass
class Space:
    """One feature matrix, its neighbour list searched once (at the largest k needed) and
    the graphs built from it, so every k, model pair and null draw reuses one search.
    Float64 rows are searched in float32 and their ties decided in float64 (so rows equal
    up to a positive scale, normalised in float64, tie: `harness.data.states.l2_rows`).

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
        search_x = self.search_x
        self.degenerate = all_rows_equal(search_x)
        length = self.k_search
        if self.ties == "shared":  # room for the tie zone below the largest k
            length = min(self.x.shape[0] - 1, length + TIE_MARGIN)
        given = self.neighbours
        if given is None or given.k < length:
            given = knn(search_x, length, groups=self.groups, **self.knn_options)
        self.neighbours = given

    @property
    def search_x(self) -> torch.Tensor:
        """The rows as searched: a float32 copy of float64 rows, made when asked (not kept:
        after the search only the index rule's subsets need it)."""
        return self.x.float() if self.x.dtype == torch.float64 else self.x

    @property
    def host(self) -> HostLists:
        """The lists and features on the host, with the float64 products computed so far."""
        if "host" not in self._graphs:
            self._graphs["host"] = HostLists(self.x, self.neighbours)
        return self._graphs["host"]

    def graphs(self, ks) -> graph_kernels.UnionGraph:
        """The graphs at every k in ks over all samples (cached; asking for another k
        rebuilds once for all k asked so far, so every k and pair shares one edge list)."""
        have = self._graphs.get("union")
        if have is None or not set(ks) <= set(have.ks):
            known = set(have.ks) if have is not None else set()
            ks = tuple(sorted(known | set(int(k) for k in ks)))
            have = self._graphs["union"] = (self.host.tie_graphs(ks, groups=self.groups)
                                            if self.ties == "shared" else self.host.list_graphs(ks))
            self._graphs.pop("self", None)
        return have

    def graph(self, k: int) -> Graph:
        """The graph at k over all samples, as tensors."""
        return graph_at(self.graphs((k,)), k)

    def tied_rows(self, k: int) -> int:
        g = self.graphs((k,))
        return int(g.crossing[g.at(k)])

    def self_terms(self, ks) -> dict[int, tuple[float, float]]:
        """sim(X, X) at each k and its scale (cached: every pair and model reuses them)."""
        g = self.graphs(ks)
        cache = self._graphs.setdefault("self", {})
        missing = [k for k in ks if k not in cache]
        if missing:
            cache.update(self_terms(g, missing))
        return {k: cache[k] for k in ks}

    def subset_graphs(self, subset: torch.Tensor, ks, scratch: graph_kernels.SlabScratch | None = None,
                      name: str = ""):
        """The graphs at every k within `subset` (sorted sample indices; node numbers are
        positions in it), and per k the rows whose list held too few subset members (scored
        again against every member). With a thread's `scratch`, a tie-rule graph comes in
        its reusable slabs under `name` where every row fits (`graph_kernels.slab`)."""
        if self.ties == "shared":
            if scratch is not None:
                g = self.host.slab(ks, subset, scratch, name, groups=self.groups)
                if g is not None:
                    return g, {k: 0 for k in g.ks}
            g = self.host.tie_graphs(ks, members=subset, groups=self.groups)
            return g, {k: int(g.short[g.at(k)]) for k in g.ks}
        search_x = self._graphs.setdefault("search_x", self.search_x)  # kept for the next subset
        lists, redone = subsample_neighbours(search_x, self.neighbours, subset, max(ks), self.groups)
        return self.host.list_graphs(ks, lists, subset), {k: redone for k in ks}


def subsample_neighbours(x: torch.Tensor, long: Neighbours, subset: torch.Tensor,
                         k: int, groups: torch.Tensor | None = None) -> tuple[Neighbours, int]:
    """Index rule: top-k within `subset` (local indices) from the long lists; rows whose
    long list keeps fewer than k members of the subset are searched again exactly."""
    n = long.indices.shape[0]
    local = torch.full((n,), -1, dtype=torch.long, device=long.indices.device)
    local[subset] = torch.arange(len(subset), device=local.device)
    idx, val = long.indices[subset], long.values[subset]
    member = (local[idx] >= 0) & (val > float("-inf"))
    rank = member.cumsum(dim=1)
    take = member & (rank <= k)
    enough = take.sum(dim=1) == k
    out_i = torch.empty(len(subset), k, dtype=torch.long, device=idx.device)
    out_v = torch.empty(len(subset), k, dtype=val.dtype, device=val.device)
    out_i[enough] = local[idx[enough][take[enough]]].view(-1, k)
    out_v[enough] = val[enough][take[enough]].view(-1, k)
    short = (~enough).nonzero().flatten()
    if len(short):
        redo = knn_among(x, subset[short], subset, k, groups)
        out_i[short], out_v[short] = redo.indices, redo.values
    return Neighbours(out_i, out_v, long.exact), len(short)


def self_terms(g: graph_kernels.UnionGraph, ks) -> dict[int, tuple[float, float]]:
    """sim(X, X) on a graph at each k, and its scale (for the degeneracy test)."""
    values, _ = graph_kernels.hsic(g, g, ks)
    return {k: (float(v), g.self_scale(k)) for k, v in zip(ks, values)}


def graph_scores(ga: graph_kernels.UnionGraph, gb: graph_kernels.UnionGraph, ks,
                 self_a: dict | None = None, self_b: dict | None = None) -> dict[int, Scores]:
    """CKNNA and mutual kNN at each k from two graphs (self terms may be passed in)."""
    kl, m = graph_kernels.hsic(ga, gb, ks)
    self_a = self_a or self_terms(ga, ks)
    self_b = self_b or self_terms(gb, ks)
    return {k: _scores(k, float(kl[q]), float(m[q]) / (k * ga.n), *self_a[k], *self_b[k])
            for q, k in enumerate(ks)}


def _scores(k, kl, mutual, kk, kk_scale, ll, ll_scale) -> Scores:
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
    return pair_scores(sa, sb, (k,))[k]


def pair_scores(sa: Space, sb: Space, ks) -> dict[int, Scores]:
    """Scores at every k in ks for two spaces, from their cached graphs and self terms."""
    ks = tuple(sorted(set(int(k) for k in ks)))
    if sa.degenerate or sb.degenerate:
        return {k: degenerate_scores(k, "A" if sa.degenerate else "B") for k in ks}
    return graph_scores(sa.graphs(ks), sb.graphs(ks), ks, sa.self_terms(ks), sb.self_terms(ks))


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


