"""How much a CKNNA value means: permutation nulls, subsampling intervals and paired
model comparisons, all from neighbour lists searched once (`cknna.Space`).

With `groups` (e.g. episode indices) samples are not treated as independent: a
permutation maps whole groups onto groups of the same size (member r of one group onto
member r of the other, members in sample order), and a subsample draws whole groups.
"""
from __future__ import annotations

import math
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from harness.cknna import graph_kernels
from harness.cknna.core import EPS, Scores, Space, _check, graph_scores, pair_scores, self_terms

# ---------------------------------------------------------------- draws


class GroupPlan:
    """Groups by size, each as a row of its members (sample order), for group shuffles."""

    def __init__(self, groups: torch.Tensor):
        groups = groups.cpu()
        self.n = len(groups)
        _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
        order = torch.argsort(inverse * self.n + torch.arange(self.n))
        starts = torch.cumsum(counts, 0) - counts
        self.n_groups = len(counts)
        self.members = [order[starts[g]:starts[g] + counts[g]] for g in range(self.n_groups)]
        self.by_size = {}
        for size in counts.unique().tolist():
            ids = (counts == size).nonzero().flatten()
            self.by_size[size] = torch.stack([self.members[g] for g in ids.tolist()])

    def permutation(self, gen: torch.Generator) -> torch.Tensor:
        """p with A[p] pairing each group of B with a random same-size group of A."""
        perm = torch.empty(self.n, dtype=torch.long)
        for size in sorted(self.by_size):
            rows = self.by_size[size]
            perm[rows] = rows[torch.randperm(len(rows), generator=gen)]
        return perm

    def subset(self, gen: torch.Generator, fraction: float) -> torch.Tensor:
        """All members of round(fraction * groups) random groups, sorted."""
        chosen = torch.randperm(self.n_groups, generator=gen)[:int(round(fraction * self.n_groups))]
        return torch.cat([self.members[g] for g in chosen.tolist()]).sort().values


def permutations(n: int, draws: int, seed: int, groups: torch.Tensor | None = None):
    """The null's permutations: randperm(N) from a generator seeded `seed`, or group shuffles."""
    gen = torch.Generator().manual_seed(seed)
    plan = GroupPlan(groups) if groups is not None else None
    for _ in range(draws):
        yield plan.permutation(gen) if plan else torch.randperm(n, generator=gen)


def subsets(n: int, draws: int, fraction: float, seed: int,
            groups: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The subsampling's sorted subsets: round(fraction * N) samples from randperm(N), or
    round(fraction * groups) whole groups. The same seed gives every model the same ones."""
    gen = torch.Generator().manual_seed(seed)
    plan = GroupPlan(groups) if groups is not None else None
    m = int(round(fraction * n))
    return [plan.subset(gen, fraction) if plan else torch.randperm(n, generator=gen)[:m].sort().values
            for _ in range(draws)]


# ---------------------------------------------------------------- permutation null


def _denominator(observed: Scores) -> float:
    if observed.sim_kk > 0 and observed.sim_ll > 0:
        return math.sqrt(observed.sim_kk * observed.sim_ll) + EPS
    return float("nan")


def null_draws(sa: Space, sb: Space, observed: Scores, n_permutations: int, seed: int = 0,
               groups: torch.Tensor | None = None) -> torch.Tensor:
    """CKNNA(A[p], B) for the permutations p of `permutations(N, draws, seed, groups)`.

    A[p]'s graph is A's relabelled, no new search; sim(K,K) and sim(L,L) do not change
    under a shuffle, only sim(K, L) is redone (`shared_null`)."""
    return shared_null(sa, sb, {observed.k: observed}, n_permutations, seed, groups)[observed.k]


NULL_BATCH_BYTES = 1 << 23  # permutations handed to the kernel at once (int64 each)
# Every model of a study draws the same permutations (same N, count, seed and groups):
# made once and kept (in the smallest integer type) when they fit in this many bytes.
NULL_KEEP_BYTES = 1 << 26
_kept_permutations: dict = {}


def permutation_batches(n: int, draws: int, seed: int, groups: torch.Tensor | None, batch: int):
    """`permutations(n, draws, seed, groups)` as int64 arrays of up to `batch` rows; read
    back, not drawn again, when the last call kept the same ones."""
    key = (n, draws, seed, None if groups is None else groups.cpu().numpy().tobytes())
    kept = _kept_permutations.get(key)
    if kept is None:
        dtype = graph_kernels.index_type(n)
        keep = draws * n * np.dtype(dtype).itemsize <= NULL_KEEP_BYTES
        made = np.empty((draws if keep else 0, n), dtype)
        gen = permutations(n, draws, seed, groups)
        for done in range(0, draws, batch):
            perms = torch.stack([next(gen) for _ in range(min(batch, draws - done))]).numpy()
            if keep:
                made[done:done + len(perms)] = perms
            yield perms
        if keep:
            _kept_permutations.clear()  # one study's draws at a time
            _kept_permutations[key] = made
        return
    for done in range(0, draws, batch):
        yield kept[done:done + batch].astype(np.int64)


def shared_null(sa: Space, sb: Space, observed: dict[int, Scores], n_permutations: int,
                seed: int = 0, groups: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """`null_draws` for every k in `observed` at once: per batch of permutations one
    kernel pass (`graph_kernels.hsic`) over B's edges against A's relabelled, summed
    exactly as the observed value is (an identity permutation gives its bits). NaN
    draws when a space's rows are all one row (no graph exists)."""
    ks = tuple(sorted(observed))
    if sa.degenerate or sb.degenerate:
        return {k: torch.full((n_permutations,), float("nan"), dtype=torch.float64) for k in ks}
    n = sb.x.shape[0]
    ga, gb = sa.graphs(ks), sb.graphs(ks)
    nulls = {k: torch.empty(n_permutations, dtype=torch.float64) for k in ks}
    batch = max(1, NULL_BATCH_BYTES // (8 * n))
    done = 0
    for perms in permutation_batches(n, n_permutations, seed, groups, batch):
        values, _ = graph_kernels.hsic(ga, gb, ks, perms)
        for q, k in enumerate(ks):
            nulls[k][done:done + len(perms)] = torch.from_numpy(values[:, q]) / _denominator(observed[k])
        done += len(perms)
    return nulls


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


def permutation_null(sa: Space, sb: Space, observed: Scores, n_permutations: int,
                     seed: int = 0, groups: torch.Tensor | None = None,
                     null: torch.Tensor | None = None) -> dict:
    """Summary of `null_draws` (or of `null` when already drawn); p-value =
    (1 + #{null >= observed}) / (1 + draws)."""
    if null is None:
        null = null_draws(sa, sb, observed, n_permutations, seed, groups)
    out = summarise_null(observed.cknna, null, seed)
    out["groups_respected"] = groups is not None
    # The chance level beside the value (harness.cknna.chance adds the adjusted p-value).
    out["chance"], out["excess"] = out["null_mean"], out["cknna_minus_null_mean"]
    return out


def permutation_test(feats_a: torch.Tensor, feats_b: torch.Tensor, topk: int,
                     n_permutations: int = 1000, seed: int = 0, ties: str = "shared",
                     groups: torch.Tensor | None = None) -> dict:
    """Observed CKNNA and its permutation null (see `permutation_null`)."""
    _check(feats_a, feats_b, topk)
    sa, sb = Space(feats_a, topk, ties), Space(feats_b, topk, ties)
    observed = pair_scores(sa, sb, (topk,))[topk]
    return {"observed": observed.cknna,
            **permutation_null(sa, sb, observed, n_permutations, seed, groups)}


# ---------------------------------------------------------------- subsampling


def long_list_length(k: int, fraction: float, n: int) -> int:
    """List length that keeps >= k survivors per row for most subsamples of `fraction`."""
    return min(n - 1, int(math.ceil(3 * k / fraction)) + 8)


# A subset of m of N samples finds its k-th member near list position k N / m; products
# up to this multiple of that place are computed before the subsets (the rest as met).
SUBSET_DEPTH_MARGIN = 1.25


def subsample_table(spaces_a: list[Space], sb: Space, ks: list[int],
                    draws: list[torch.Tensor]) -> list[dict[int, tuple[torch.Tensor, int]]]:
    """For every model and k: CKNNA on each subset in `draws` and the rows searched again.

    Subset by subset, B's graphs (every k in one edge list) and self terms are built once
    for all models, and each model's graphs once for all k."""
    ks = tuple(sorted(set(int(k) for k in ks)))
    nan = float("nan")

    local = threading.local()

    def one_subset(subset):  # compiled kernels without the GIL: subsets run side by side
        scratch = getattr(local, "scratch", None)
        if scratch is None:  # one per pool thread, kept from subset to subset
            scratch = local.scratch = graph_kernels.SlabScratch()
        gb = rb = self_b = None
        if not sb.degenerate:
            gb, rb = sb.subset_graphs(subset, ks, scratch, "B")
            self_b = self_terms(gb, ks)
        out = []
        for sa in spaces_a:
            if sa.degenerate or sb.degenerate:
                out.append(({k: Scores(k, nan, nan, nan, nan, nan) for k in ks}, {k: 0 for k in ks}))
                continue
            ga, ra = sa.subset_graphs(subset, ks, scratch, "A")
            out.append((graph_scores(ga, gb, ks, self_b=self_b),
                        {k: ra[k] + (rb[k] if rb else 0) for k in ks}))
        return out

    if draws:  # the lists' first positions, where subsets find their neighbours, in one pass
        depth = math.ceil(SUBSET_DEPTH_MARGIN * ks[-1] * sb.x.shape[0] / min(map(len, draws)))
        for space in (sb, *spaces_a):  # made once here, not by racing threads
            if not space.degenerate:
                space.host.rpos
                space.host.fill_products(depth)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with ThreadPoolExecutor(graph_kernels.threads()) as pool:
            per_subset = list(pool.map(one_subset, draws))
    for space in (sb, *spaces_a):  # only subsets read them: not kept for the rest of the run
        if not space.degenerate:
            space.host.forget_reverse_positions()
    values = [{k: [s[i][0][k].cknna for s in per_subset] for k in ks} for i in range(len(spaces_a))]
    redone = [{k: sum(s[i][1][k] for s in per_subset) for k in ks} for i in range(len(spaces_a))]
    return [{k: (torch.tensor(values[i][k], dtype=torch.float64), redone[i][k]) for k in ks}
            for i in range(len(spaces_a))]


def subsample_values(sa: Space, sb: Space, k: int, draws: list[torch.Tensor]):
    """CKNNA on each subset in `draws`, and how many rows needed a new search."""
    return subsample_table([sa], sb, [k], draws)[0][k]


def _check_fraction(n: int, fraction: float, k: int) -> None:
    m = int(round(fraction * n))
    if not (0 < fraction < 1) or m < 4 or k > m - 1:
        raise ValueError(f"fraction={fraction} leaves {m} samples: need >= 4 and > k={k}")


def subsample_draws(feats_a: torch.Tensor, feats_b: torch.Tensor, topk: int, *,
                    n_draws: int, fraction: float, seed: int = 0, ties: str = "shared",
                    groups: torch.Tensor | None = None):
    """CKNNA on `n_draws` random subsets (see `subsets`), and rows searched again."""
    _check(feats_a, feats_b, topk)
    n = feats_a.shape[0]
    _check_fraction(n, fraction, topk)
    length = long_list_length(topk, fraction, n)
    sa, sb = Space(feats_a, length, ties), Space(feats_b, length, ties)
    return subsample_values(sa, sb, topk, subsets(n, n_draws, fraction, seed, groups))


def summarise_draws(vals: torch.Tensor, level: float) -> tuple[float, float]:
    """Percentile interval of the finite draws."""
    finite = vals[~vals.isnan()]
    alpha = (1 - level) / 2
    if not len(finite):
        return float("nan"), float("nan")
    lo, hi = torch.quantile(finite, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return lo, hi


def interval_record(vals: torch.Tensor, redone: int, *, fraction: float, level: float, seed: int,
                    sizes: list[int], groups: bool, observed: float = float("nan")) -> dict:
    """The JSON record of a subsampling interval. `vals`: CKNNA over `two_size_subsets`
    (the f subsets, then the f/2 ones). low/high: the interval for the full-sample value
    `observed` (`rate_interval`); `at_subset_size`: percentiles of CKNNA at f N itself."""
    n_draws = len(vals) // 2
    small, large = split_draws(vals, n_draws)
    finite = large[~large.isnan()]
    lo, hi = summarise_draws(large, level)
    iv = rate_interval(observed, small, large, fraction / 2, fraction, level)
    return {"n_draws": n_draws, "fraction": fraction,
            "subsample_size": round(sum(sizes[:n_draws]) / n_draws) if n_draws else 0,
            "level": level, "seed": seed, "method": INTERVAL_METHOD,
            "low": iv["low"], "high": iv["high"], "sd": iv["sd"], "rate_beta": iv["rate_beta"],
            "at_subset_size": {"low": lo, "high": hi,
                               "mean": finite.mean().item() if len(finite) else float("nan"),
                               "std": finite.std().item() if len(finite) > 1 else float("nan")},
            "nan_draws": int(vals.isnan().sum()), "rows_searched_again": redone,
            "whole_groups": groups}


def subsample_interval(feats_a: torch.Tensor, feats_b: torch.Tensor, topk: int, *,
                       n_draws: int = 200, fraction: float = 0.5, level: float = 0.95,
                       seed: int = 0, ties: str = "shared",
                       groups: torch.Tensor | None = None) -> dict:
    """Interval for the full-sample CKNNA from subsets of fraction f and f/2 (see
    `rate_interval`), reusing long neighbour lists instead of new Gram products."""
    n = feats_a.shape[0]
    _check(feats_a, feats_b, topk)
    _check_fraction(n, fraction / 2, topk)
    draws = two_size_subsets(n, n_draws, fraction, seed, groups)
    length = long_list_length(topk, fraction / 2, n)
    sa, sb = Space(feats_a, length, ties), Space(feats_b, length, ties)
    vals, redone = subsample_values(sa, sb, topk, draws)
    observed = pair_scores(sa, sb, (topk,))[topk].cknna
    return interval_record(vals, redone, fraction=fraction, level=level, seed=seed,
                           sizes=[len(s) for s in draws], groups=groups is not None,
                           observed=observed)


# ---------------------------------------------------------------- intervals for the full value

# The rate exponent beta of sd(CKNNA at n) ~ n^-beta lies between 1/2 (an ordinary
# statistic) and 1 (a degenerate U-statistic, e.g. HSIC near independence).
RATE_BOUNDS = (0.5, 1.0)


def _sub_variance_ratio(beta: float, f_small: float, f_large: float) -> float:
    """Var of subset values at f_small over that at f_large, when Var(CKNNA at m) =
    c m^(-2 beta) and a subset's value varies around the full one by the difference."""
    return (f_small ** (-2 * beta) - 1) / (f_large ** (-2 * beta) - 1)


def estimate_rate(small: torch.Tensor, large: torch.Tensor, f_small: float,
                  f_large: float) -> float:
    """beta from the spread of subset values at two sizes (Bertail, Politis & Romano 1999),
    within RATE_BOUNDS; the ratio grows with beta, so bisection finds it."""
    small, large = small[~small.isnan()], large[~large.isnan()]
    if len(small) < 2 or len(large) < 2 or not large.var() > 0:
        return RATE_BOUNDS[0]
    ratio = (small.var() / large.var()).item()
    lo, hi = RATE_BOUNDS
    if ratio <= _sub_variance_ratio(lo, f_small, f_large):
        return lo
    if ratio >= _sub_variance_ratio(hi, f_small, f_large):
        return hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _sub_variance_ratio(mid, f_small, f_large) < ratio else (lo, mid)
    return (lo + hi) / 2


def rate_interval(observed: float, small: torch.Tensor, large: torch.Tensor, f_small: float,
                  f_large: float, level: float = 0.95) -> dict:
    """Interval for a full-sample value (or a paired difference) from its values on
    subsets of two sizes f_small N < f_large N drawn without replacement.

    Subsampling with the rate correction of Politis & Romano: a subset of m = f N varies
    around the full value with Var = sd_N^2 (f^(-2 beta) - 1) when sd_n ~ n^-beta, so
    sd_N = sd(subset values at f) / sqrt(f^(-2 beta) - 1). beta is estimated from the two
    sizes (`estimate_rate`). The interval is observed +- z sd_N: centred on the value
    shown, since CKNNA's mean moves with the sample size."""
    beta = estimate_rate(small, large, f_small, f_large)
    finite = large[~large.isnan()]
    if len(finite) < 2 or math.isnan(observed):
        return {"low": float("nan"), "high": float("nan"), "sd": float("nan"), "rate_beta": beta}
    sd = finite.std().item() / math.sqrt(f_large ** (-2 * beta) - 1)
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + level / 2)).item()
    return {"low": observed - z * sd, "high": observed + z * sd, "sd": sd, "rate_beta": beta}


INTERVAL_METHOD = ("subsampling without replacement at fractions f and f/2 of the "
                   "samples (whole groups when grouped), rate n^-beta estimated from the two "
                   "(Politis & Romano; Bertail et al. 1999), normal interval around the "
                   "full-sample value")


def fraction_for(n: int, k: int, preferred: float = 0.5) -> float:
    """`preferred`, or the smallest larger fraction whose f/2 subsets still hold k + 2
    samples (small studies); at most 0.9."""
    need = (k + 2.5) * 2 / n
    return min(0.9, max(preferred, math.ceil(need * 100) / 100))


def split_draws(values: torch.Tensor, n_draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values on the f/2 subsets, values on the f subsets) of a table made over
    `two_size_subsets` (the f subsets first)."""
    return values[n_draws:], values[:n_draws]


def two_size_subsets(n: int, draws: int, fraction: float, seed: int,
                     groups: torch.Tensor | None = None) -> list[torch.Tensor]:
    """`draws` subsets of fraction f (seeded `seed`, the same as before), then `draws` of
    f/2 (seeded seed + 1): every model gets the same ones."""
    return (subsets(n, draws, fraction, seed, groups)
            + subsets(n, draws, fraction / 2, seed + 1, groups))


# ---------------------------------------------------------------- paired comparisons


def compare(labels: list[str], observed: dict[str, dict[int, float]],
            draws: dict[str, dict[int, torch.Tensor]], ks: list[int], *, fraction: float,
            level: float = 0.95, seed: int = 0, groups: bool = False) -> dict:
    """For every pair of models and every k: CKNNA_a - CKNNA_b with a paired interval
    from the SAME subsets for both (`draws`: values over `two_size_subsets`, a's minus
    b's subset by subset; a difference whose interval excludes 0 is a ranking the data
    support)."""
    out = {}
    for k in ks:
        rows = []
        for i, a in enumerate(labels):
            for b in labels[i + 1:]:
                diff = draws[a][k] - draws[b][k]
                value = observed[a][k] - observed[b][k]
                n_draws = len(diff) // 2
                small, large = split_draws(diff, n_draws)
                iv = rate_interval(value, small, large, fraction / 2, fraction, level)
                lo, hi = iv["low"], iv["high"]
                finite = large[~large.isnan()]
                rows.append({"a": a, "b": b, "difference": value, "interval": [lo, hi],
                             "level": level, "excludes_zero": bool(lo > 0 or hi < 0),
                             "sd": iv["sd"], "rate_beta": iv["rate_beta"],
                             "method": INTERVAL_METHOD,
                             "subset_difference_mean": finite.mean().item() if len(finite) else float("nan"),
                             "subset_difference_std": finite.std().item() if len(finite) > 1 else float("nan"),
                             "n_draws": n_draws, "fraction": fraction, "seed": seed,
                             "whole_groups": groups})
        out[f"k{k}"] = rows
    return out


# ---------------------------------------------------------------- one-pass driver


def align(feats_a: torch.Tensor, feats_b: torch.Tensor, ks, *, permutations: int = 0,
          subsample_draws: int = 0, subsample_fraction: float = 0.5, seed: int = 0,
          ties: str = "shared", groups: torch.Tensor | None = None,
          exclude_same_group: bool = False, space_a: Space | None = None,
          space_b: Space | None = None, keep_draws: bool = False,
          precomputed: dict | None = None, **knn_options) -> dict[int, dict]:
    """Every k's CKNNA and mutual kNN (and optional null / interval) from one kNN search
    per matrix at the largest length needed. Spaces already built (`space_a/_b`) are
    reused, so many models share B's search and a pairwise matrix A's.

    `groups` make permutations and subsets respect groups; with `exclude_same_group`
    same-group pairs are never neighbours either. `keep_draws` keeps each k's subsample
    values (a tensor, under "subsample_values") for paired comparisons; `precomputed`
    ({k: (values, rows searched again)}, from `subsample_table` over many models at once)
    replaces computing them here."""
    ks = sorted(set(int(k) for k in ks))
    skip_subsample = precomputed is not None
    n = feats_a.shape[0]
    for k in ks:
        _check(feats_a, feats_b, k)
    k_search = ks[-1]
    if subsample_draws:
        _check_fraction(n, subsample_fraction / 2, ks[-1])
        k_search = max(k_search, long_list_length(ks[-1], subsample_fraction / 2, n))
    excluded = groups if exclude_same_group else None

    def space(x, given):
        if given is not None and given.k_search >= k_search and given.ties == ties:
            return given
        return Space(x, k_search, ties, excluded, knn_options)

    sa, sb = space(feats_a, space_a), space(feats_b, space_b)
    draws = (two_size_subsets(n, subsample_draws, subsample_fraction, seed, groups)
             if subsample_draws else [])
    table = subsample_table([sa], sb, ks, draws)[0] if subsample_draws and not skip_subsample else {}
    scores = pair_scores(sa, sb, ks)
    nulls = shared_null(sa, sb, scores, permutations, seed, groups) if permutations else {}
    results = {}
    for k in ks:
        s = scores[k]
        row = {"cknna": s.cknna, "mutual_knn": s.mutual_knn,
               "sim_kl": s.sim_kl, "sim_kk": s.sim_kk, "sim_ll": s.sim_ll}
        if ties == "shared" and not (sa.degenerate or sb.degenerate):
            row["tied_rows_A"] = sa.tied_rows(k)
            row["tied_rows_B"] = sb.tied_rows(k)
        if permutations:
            row["permutation"] = permutation_null(sa, sb, s, permutations, seed, groups,
                                                  nulls.get(k))
        if subsample_draws:
            vals, redone = table[k] if k in table else precomputed[k]
            row["subsample"] = interval_record(vals, redone, fraction=subsample_fraction,
                                               level=0.95, seed=seed,
                                               sizes=[len(d) for d in draws],
                                               groups=groups is not None, observed=s.cknna)
            if keep_draws:
                row["subsample_values"] = vals
        results[k] = row
    return results
