"""CKNNA, mutual kNN and linear CKA, computed from neighbour lists in O(N k).

The reference (platonic-rep `metrics.py`, copied as the seed's `compute_cknna.py`) builds
N x N kernels and masks and does three N^3 products per k. Every term it needs lives on
the edges of the kNN mask, so here each term is a sum over edges (see `_hsic_on_edges`).
Argument order matters: CKNNA(A, B) != CKNNA(B, A). Inputs are used as given; the
reference callers L2-normalise rows first (the CLI does too).

Sums run in float64. A result whose self-similarity terms are not positive is NaN with
a warning (the reference would return a meaningless number or NaN).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from harness.knn import Neighbours, knn, knn_among

EPS = 1e-6  # the reference's denominator term; part of its value


@dataclass(frozen=True)
class Edges:
    """A kNN mask as an edge list: sample src[e] has neighbour dst[e]; kernel values on it."""

    src: torch.Tensor
    dst: torch.Tensor
    k_val: torch.Tensor
    l_val: torch.Tensor
    n: int


def _contains(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """queries ∈ keys, by binary search (torch.isin can fall back to an O(n m) scan)."""
    if len(keys) == 0:
        return torch.zeros_like(queries, dtype=torch.bool)
    ordered = keys.sort().values
    pos = torch.searchsorted(ordered, queries).clamp_max_(len(ordered) - 1)
    return ordered[pos] == queries


def _hsic_on_edges(e: Edges) -> float:
    """Unbiased HSIC (Song et al. 2012, eq. 5) of M*K and M*L, M the edge mask.

    tr(K~L~) = sum over edges whose reverse is also an edge of K_ij L_ij;
    1'K~1 = sum_E K; 1'L~1 = sum_E L; 1'K~L~1 = sum_l (K into l)(L out of l)."""
    m = e.n
    kv, lv = e.k_val.double(), e.l_val.double()
    has_reverse = _contains(e.src * m + e.dst, e.dst * m + e.src)
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
    """B's kNN edges as sorted keys row*N + col, so A's edges can be looked up in them."""

    def __init__(self, nb: Neighbours):
        n, k = nb.indices.shape
        self.n, self.k = n, k
        self.rows = torch.arange(n, device=nb.indices.device).repeat_interleave(k)
        keys = self.rows * n + nb.indices.flatten()
        self.order = keys.argsort()
        self.sorted_keys = keys[self.order]
        self.values = nb.values.flatten()

    def shared(self, na: Neighbours) -> tuple[Edges, torch.Tensor]:
        """Edges of A also in B, row by row (kNN_A(i) ∩ kNN_B(i)), and per-row overlaps."""
        dst = na.indices.flatten()
        keys = self.rows * self.n + dst
        pos = torch.searchsorted(self.sorted_keys, keys).clamp_max_(len(keys) - 1)
        hit = self.sorted_keys[pos] == keys
        l_val = self.values[self.order[pos[hit]]]
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


def cknna(feats_a: torch.Tensor, feats_b: torch.Tensor, topk: int, **knn_options) -> float:
    """The reference CKNNA(A, B) with k = topk, without any N x N matrix."""
    _check(feats_a, feats_b, topk)
    return scores_from_neighbours(knn(feats_a, topk, **knn_options),
                                  knn(feats_b, topk, **knn_options), topk).cknna


def mutual_knn(feats_a: torch.Tensor, feats_b: torch.Tensor, topk: int, **knn_options) -> float:
    """Mean over samples of |kNN_A(i) ∩ kNN_B(i)| / k, self excluded."""
    _check(feats_a, feats_b, topk)
    return scores_from_neighbours(knn(feats_a, topk, **knn_options),
                                  knn(feats_b, topk, **knn_options), topk).mutual_knn


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


# ---------------------------------------------------------------- significance


def _permuted(nb: Neighbours, perm: torch.Tensor, inverse: torch.Tensor) -> Neighbours:
    """Neighbour lists of X[perm] from those of X: relabel, no new search."""
    return Neighbours(inverse[nb.indices[perm]], nb.values[perm], nb.exact)


def null_draws(na: Neighbours, nb: Neighbours, observed: Scores, n_permutations: int,
               seed: int = 0) -> torch.Tensor:
    """CKNNA(A[p], B) for p = randperm(N) drawn in turn from a generator seeded `seed`.

    CKNNA(A[p], B) = CKNNA(A, B[p^-1]): A's lists are relabelled (no new search) and B's
    sorted edge index is built once. sim(K,K) and sim(L,L) do not change under a shuffle;
    only sim(K, L) is redone."""
    k = observed.k
    na, nb = na.prefix(k), nb.prefix(k)
    n = na.indices.shape[0]
    b_index = _EdgeIndex(nb)
    gen = torch.Generator().manual_seed(seed)
    null = torch.empty(n_permutations, dtype=torch.float64)
    denom = math.sqrt(observed.sim_kk * observed.sim_ll) + EPS if (
        observed.sim_kk > 0 and observed.sim_ll > 0) else float("nan")
    for d in range(n_permutations):
        perm = torch.randperm(n, generator=gen).to(na.indices.device)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(n, device=perm.device)
        shared, _ = b_index.shared(_permuted(na, perm, inverse))
        null[d] = _hsic_on_edges(shared) / denom
    return null


def permutation_null(na: Neighbours, nb: Neighbours, observed: Scores, n_permutations: int,
                     seed: int = 0) -> dict:
    """Summary of `null_draws`; p-value = (1 + #{null >= observed}) / (1 + draws)."""
    return summarise_null(observed.cknna, null_draws(na, nb, observed, n_permutations, seed), seed)


def summarise_null(observed: float, null: torch.Tensor, seed: int) -> dict:
    mean, std = null.mean().item(), null.std().item()
    exceed = int((null >= observed).sum())
    return {
        "n_permutations": len(null),
        "seed": seed,
        "null_mean": mean,
        "null_std": std,
        "p_value": (1 + exceed) / (1 + len(null)),
        # Excess over what shuffled (unrelated) states score: chance is not zero.
        "cknna_minus_null_mean": observed - mean,
        "z_score": (observed - mean) / std if std > 0 else float("nan"),
    }


def permutation_test(feats_a: torch.Tensor, feats_b: torch.Tensor, topk: int,
                     n_permutations: int = 1000, seed: int = 0) -> dict:
    """Observed CKNNA and its permutation null (see `permutation_null`)."""
    _check(feats_a, feats_b, topk)
    na, nb = knn(feats_a, topk), knn(feats_b, topk)
    observed = scores_from_neighbours(na, nb, topk)
    return {"observed": observed.cknna, **permutation_null(na, nb, observed, n_permutations, seed)}


def long_list_length(k: int, fraction: float, n: int) -> int:
    """List length that keeps >= k survivors per row for most subsamples of `fraction`."""
    return min(n - 1, int(math.ceil(3 * k / fraction)) + 8)


def _subsample_neighbours(x: torch.Tensor, long: Neighbours, subset: torch.Tensor,
                          k: int) -> tuple[Neighbours, int]:
    """Top-k within `subset` (local indices), from the long lists; rows whose long list
    keeps fewer than k members of the subset are searched again exactly."""
    n = long.indices.shape[0]
    local = torch.full((n,), -1, dtype=torch.long, device=long.indices.device)
    local[subset] = torch.arange(len(subset), device=local.device)
    idx, val = long.indices[subset], long.values[subset]
    member = local[idx] >= 0
    rank = member.cumsum(dim=1)
    take = member & (rank <= k)
    enough = take.sum(dim=1) == k
    out_i = torch.empty(len(subset), k, dtype=torch.long, device=idx.device)
    out_v = torch.empty(len(subset), k, dtype=val.dtype, device=val.device)
    out_i[enough] = local[idx[enough][take[enough]]].view(-1, k)
    out_v[enough] = val[enough][take[enough]].view(-1, k)
    short = (~enough).nonzero().flatten()
    if len(short):
        redo = knn_among(x, subset[short], subset, k)
        out_i[short], out_v[short] = redo.indices, redo.values
    return Neighbours(out_i, out_v, long.exact), len(short)


def subsample_draws(feats_a: torch.Tensor, feats_b: torch.Tensor, topk: int, *,
                    n_draws: int, fraction: float, seed: int = 0,
                    long_a: Neighbours | None = None, long_b: Neighbours | None = None):
    """CKNNA on `n_draws` random subsets of round(fraction * N) samples (sorted subsets of
    randperm(N) from a generator seeded `seed`), and how many rows needed a new search."""
    _check(feats_a, feats_b, topk)
    n = feats_a.shape[0]
    m = int(round(fraction * n))
    if not (0 < fraction < 1) or m < 4 or topk > m - 1:
        raise ValueError(f"fraction={fraction} leaves {m} samples: need >= 4 and > k={topk}")
    length = long_list_length(topk, fraction, n)
    long_a = long_a if long_a is not None and long_a.k >= length else knn(feats_a, length)
    long_b = long_b if long_b is not None and long_b.k >= length else knn(feats_b, length)
    gen = torch.Generator().manual_seed(seed)
    values, redone = [], 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(n_draws):
            subset = torch.randperm(n, generator=gen)[:m].sort().values.to(feats_a.device)
            sa, ra = _subsample_neighbours(feats_a, long_a, subset, topk)
            sb, rb = _subsample_neighbours(feats_b, long_b, subset, topk)
            redone += ra + rb
            values.append(scores_from_neighbours(sa, sb, topk).cknna)
    return torch.tensor(values, dtype=torch.float64), redone


def subsample_interval(feats_a: torch.Tensor, feats_b: torch.Tensor, topk: int, *,
                       n_draws: int = 200, fraction: float = 0.8, level: float = 0.95,
                       seed: int = 0, long_a: Neighbours | None = None,
                       long_b: Neighbours | None = None) -> dict:
    """Percentile interval of CKNNA over random subsets of fraction * N samples.

    It describes the spread of CKNNA at the smaller size m = fraction * N (kNN graphs
    depend on N), reusing long neighbour lists instead of new Gram products."""
    vals, redone = subsample_draws(feats_a, feats_b, topk, n_draws=n_draws, fraction=fraction,
                                   seed=seed, long_a=long_a, long_b=long_b)
    finite = vals[~vals.isnan()]
    alpha = (1 - level) / 2
    lo, hi = (torch.quantile(finite, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
              if len(finite) else (float("nan"), float("nan")))
    return {"n_draws": n_draws, "fraction": fraction,
            "subsample_size": int(round(fraction * feats_a.shape[0])), "level": level,
            "seed": seed, "low": lo, "high": hi,
            "mean": finite.mean().item() if len(finite) else float("nan"),
            "std": finite.std().item() if len(finite) > 1 else float("nan"),
            "nan_draws": int(vals.isnan().sum()), "rows_searched_again": redone}


# ---------------------------------------------------------------- one-pass driver


def align(feats_a: torch.Tensor, feats_b: torch.Tensor, ks, *, permutations: int = 0,
          subsample_draws: int = 0, subsample_fraction: float = 0.8, seed: int = 0,
          neighbours_a: Neighbours | None = None, neighbours_b: Neighbours | None = None,
          **knn_options) -> dict[int, dict]:
    """Every k's CKNNA and mutual kNN (and optional null / interval) from one kNN search
    per matrix at max(ks). Lists already searched (`neighbours_a/_b`) are reused, so
    many models can share B's search and a pairwise matrix A's."""
    ks = sorted(set(int(k) for k in ks))
    for k in ks:
        _check(feats_a, feats_b, k)
    k_search = ks[-1]
    if subsample_draws:
        k_search = max(k_search, long_list_length(ks[-1], subsample_fraction, feats_a.shape[0]))
    def search(x, given):
        return given if given is not None and given.k >= k_search else knn(x, k_search, **knn_options)

    na, nb = search(feats_a, neighbours_a), search(feats_b, neighbours_b)
    results = {}
    for k in ks:
        s = scores_from_neighbours(na, nb, k)
        row = {"cknna": s.cknna, "mutual_knn": s.mutual_knn,
               "sim_kl": s.sim_kl, "sim_kk": s.sim_kk, "sim_ll": s.sim_ll}
        if permutations:
            row["permutation"] = permutation_null(na, nb, s, permutations, seed)
        if subsample_draws:
            row["subsample"] = subsample_interval(
                feats_a, feats_b, k, n_draws=subsample_draws, fraction=subsample_fraction,
                seed=seed, long_a=na, long_b=nb)
        results[k] = row
    return results
