"""The compiled fast paths against the dense float64 definition (tests/dense_reference.py):
every value `significance.align` reports (CKNNA, mutual kNN, sim terms, null mean / std,
subset values and their interval) and `compare`'s paired differences and intervals agree
within 1e-10, and the p-values' counts are equal; on tie-free, tie-heavy, grouped and
excluded-group data, on float64 rows (as `harness run` normalises them: searched as a
float32 copy, scored in float64) and on float32 rows. Summation order is free, the
definition is not."""
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.cknna import graph_kernels as G
from harness.study import results as R
from harness.cknna import significance as S
from harness.cknna import Space
from tests.dense_reference import dense_study

pytestmark = pytest.mark.unit
TOL = 1e-10


def unit_rows(x, dtype=torch.float64):
    """Rows normalised as `states.l2_rows` does (float64), or kept in float32."""
    x = x.double()
    return (x / x.norm(dim=1, keepdim=True)).to(dtype)


def check_count(p_value, null, observed, permutations):
    """The p-value's count #{draws >= observed} against the dense draws: exactly equal on
    every draw the dense sums put clearly above or below the observed value. A draw within
    1e-9 (relative) of it equals it in exact arithmetic (tie-heavy data: a shuffle that
    maps tied rows onto each other, or two prototypes swapped): there any float64 sum,
    the dense one's too, lands a few ulps either side, so the count is only bounded."""
    count = round(p_value * (1 + permutations)) - 1
    tied = (null - observed).abs() <= 1e-9 * abs(observed)
    above = int(((null >= observed) & ~tied).sum())
    assert p_value == (1 + count) / (1 + permutations)
    assert above <= count <= above + int(tied.sum()), (count, above, int(tied.sum()))
    return int(tied.sum())


def data(seed, n=72, ties=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, 7, generator=g)
    if ties:  # duplicate states and duplicate model rows, partly overlapping
        b = b[torch.randint(0, n // 4, (n,), generator=g)]
    models = {}
    for name, w in (("m1", 2.0), ("m2", 0.7)):
        a = torch.cat([w * b, torch.randn(n, 24, generator=g)], 1)
        if ties:
            a[n // 2:] = a[:n - n // 2][torch.randperm(n - n // 2, generator=g)]
        models[name] = unit_rows(a, dtype)
    groups = torch.arange(n) // 4
    return unit_rows(b, dtype), models, groups


def exclusion(groups):
    return groups.unsqueeze(0) == groups.unsqueeze(1)


def check_against_dense(a, b, ks, *, ties="shared", grouped=False, exclude=False, seed=0,
                        permutations=30, draws=8, fraction=0.75, groups=None,
                        exact_counts=False):
    n = a.shape[0]
    g = groups if grouped else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = S.align(a, b, ks, permutations=permutations, subsample_draws=draws,
                      subsample_fraction=fraction, seed=seed, ties=ties, groups=g,
                      exclude_same_group=exclude, keep_draws=True)
    perms = list(S.permutations(n, permutations, seed, g))
    subsets = S.two_size_subsets(n, draws, fraction, seed, g)
    want = dense_study(a, b, ks, perms, subsets, exclude=exclusion(groups) if exclude else None,
                       index_rule=ties == "index")
    for k in ks:
        row, ref = got[k], want[k]
        for key in ("cknna", "mutual_knn", "sim_kl", "sim_kk", "sim_ll"):
            assert row[key] == pytest.approx(ref[key], abs=TOL), (k, key)
        p = row["permutation"]
        assert p["null_mean"] == pytest.approx(ref["null"].mean().item(), abs=TOL)
        assert p["null_std"] == pytest.approx(ref["null"].std().item(), abs=TOL)
        tied = check_count(p["p_value"], ref["null"], ref["cknna"], permutations)
        assert not (exact_counts and tied), k  # tie-free data: every count is exact
        # rtol too: on tiny tie-heavy subsets sim_KK can be near its degeneracy threshold,
        # and CKNNA >> 1 then carries the cancellation of its denominator (relative).
        got_v, want_v = row["subsample_values"], ref["subsets"]
        assert torch.allclose(got_v, want_v, rtol=TOL, atol=TOL, equal_nan=True), \
            (got_v - want_v).abs().max().item()
        small, large = S.split_draws(ref["subsets"], draws)
        iv = S.rate_interval(ref["cknna"], small, large, fraction / 2, fraction)
        for key in ("low", "high", "sd", "rate_beta"):  # relative too: the rate's estimate
            # scales up subset values' last digits where tiny subsets give CKNNA >> 1
            assert row["subsample"][key] == pytest.approx(iv[key], rel=TOL, abs=TOL,
                                                          nan_ok=True), key
        lo, hi = S.summarise_draws(large, 0.95)
        assert row["subsample"]["at_subset_size"]["low"] == pytest.approx(lo, abs=TOL)
        assert row["subsample"]["at_subset_size"]["high"] == pytest.approx(hi, abs=TOL)
    return got, want


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed,tied,grouped,exclude", [
    (0, False, False, False), (1, True, False, False), (2, True, True, False),
    (3, True, True, True), (4, False, True, True)])
def test_align_agrees_with_the_dense_definition(seed, tied, grouped, exclude, dtype):
    b, models, groups = data(seed, ties=tied, dtype=dtype)
    for a in models.values():
        check_against_dense(a, b, [3, 5, 10], grouped=grouped, exclude=exclude, seed=seed,
                            groups=groups, exact_counts=not tied)


@pytest.mark.parametrize("grouped", [False, True])
def test_the_index_rule_agrees_with_plain_top_k_masks(grouped):
    b, models, groups = data(5)  # tie-free: the lists' order is the similarities'
    check_against_dense(models["m1"], b, [3, 7], ties="index", grouped=grouped, groups=groups)


def test_paired_differences_and_intervals_agree_with_the_dense_definition():
    b, models, groups = data(6, ties=True)
    ks, fraction = [3, 6], 0.7
    observed, fast, dense = {}, {}, {}
    for name, a in models.items():
        got, want = check_against_dense(a, b, ks, grouped=True, groups=groups, seed=6,
                                        fraction=fraction, draws=10, permutations=5)
        observed[name] = {k: got[k]["cknna"] for k in ks}
        fast[name] = {k: got[k]["subsample_values"] for k in ks}
        dense[name] = {k: want[k]["subsets"] for k in ks}
    ours = S.compare(list(models), observed, fast, ks, fraction=fraction, groups=True)
    theirs = S.compare(list(models), observed, dense, ks, fraction=fraction, groups=True)
    for k in ks:
        for x, y in zip(ours[f"k{k}"], theirs[f"k{k}"]):
            assert x["interval"] == pytest.approx(y["interval"], abs=TOL)
            assert x["sd"] == pytest.approx(y["sd"], abs=TOL)
            assert x["subset_difference_mean"] == pytest.approx(y["subset_difference_mean"], abs=TOL)
            assert x["subset_difference_std"] == pytest.approx(y["subset_difference_std"], abs=TOL)


def test_the_whole_results_json_agrees_with_the_dense_definition():
    """`results.compute` (what `harness cknna` runs: subsets for all models at once,
    pairwise, compare) gives the dense values."""
    b, models, groups = data(7, n=60, ties=True)
    settings = R.Settings(ks=[3, 5], permutations=20, subsample_draws=6, subsample_fraction=0.75,
                          seed=7, pairwise=True, compare=True, groups=groups,
                          exclude_same_group=True)
    paths = {name: (f"/x/{name}/feats_A.pt", a) for name, a in models.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = R.compute(paths, b, "/x/b.pt", settings, {})
    perms = list(S.permutations(60, 20, 7, groups))
    subsets = S.two_size_subsets(60, 6, 0.75, 7, groups)
    for name, a in models.items():
        want = dense_study(a, b, [3, 5], perms, subsets, exclude=exclusion(groups))
        for k in (3, 5):
            entry = res["models"][name]
            assert entry[f"cknna_k{k}"] == pytest.approx(want[k]["cknna"], abs=TOL)
            check_count(entry[f"p_value_k{k}"], want[k]["null"], want[k]["cknna"], 20)
            sub = entry["details"][f"k{k}"]["subsample"]
            large = S.split_draws(want[k]["subsets"], 6)[1]
            assert sub["at_subset_size"]["mean"] == pytest.approx(large.mean().item(), abs=TOL)
            iv = S.rate_interval(want[k]["cknna"], *S.split_draws(want[k]["subsets"], 6), 0.375, 0.75)
            assert (sub["low"], sub["high"]) == pytest.approx((iv["low"], iv["high"]), abs=TOL)
    pair = dense_study(models["m1"], models["m2"], [5], exclude=exclusion(groups))[5]["cknna"]
    assert res["pairwise"]["cknna_k5"][0][1] == pytest.approx(pair, abs=TOL)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), n=st.integers(24, 48), prototypes=st.integers(2, 12),
       k=st.integers(1, 6), grouped=st.booleans(), exclude=st.booleans())
def test_tie_heavy_draws_agree_with_the_dense_definition(seed, n, prototypes, k, grouped, exclude):
    """Rows copied from a few prototypes (ties everywhere), random groups."""
    g = torch.Generator().manual_seed(seed)
    a = unit_rows(torch.randn(prototypes, 5, generator=g))[torch.randint(0, prototypes, (n,), generator=g)]
    b = unit_rows(torch.randn(prototypes, 3, generator=g))[torch.randint(0, prototypes, (n,), generator=g)]
    groups = torch.randint(0, max(2, n // 3), (n,), generator=g)
    grouped = grouped or exclude  # `align` excludes the groups it draws by
    ex = exclusion(groups)
    if exclude and int((~ex).sum(1).min()) - 1 < k + 1:
        return  # too few candidates outside a row's group for k (refused elsewhere)
    k = min(k, int(0.375 * n) - 1)  # the f/2 = 0.375 subsets hold more than k samples
    try:
        check_against_dense(a, b, [k], grouped=grouped, exclude=exclude, seed=seed % 1000,
                            permutations=10, draws=3, groups=groups)
    except ValueError as err:  # a subset left a row with fewer than k candidates, or an
        assert "fewer than k" in str(err) or "N >= 4" in str(err)  # f/2 subset under 4


@pytest.mark.parametrize("batch_bytes", [1, 8 * 72 * 3, 1 << 26])
def test_null_batches_give_the_same_bits(batch_bytes, monkeypatch):
    b, models, groups = data(8, ties=True)
    sa, sb = Space(models["m1"], 10), Space(b, 10)
    observed = S.pair_scores(sa, sb, [4, 10])
    whole = S.shared_null(sa, sb, observed, 25, seed=3, groups=groups)
    monkeypatch.setattr(S, "NULL_BATCH_BYTES", batch_bytes)
    batched = S.shared_null(sa, sb, observed, 25, seed=3, groups=groups)
    for k in (4, 10):
        assert torch.equal(whole[k], batched[k])
        # One k alone sums exactly as every k together (other k's edges add exact zeros).
        assert torch.equal(S.null_draws(sa, sb, observed[k], 25, seed=3, groups=groups), whole[k])


def test_filled_products_are_each_pairs_bits_and_groups_cover_every_row():
    """`fill_products` stores at every listed place below the depth the bits `products`
    gives for that pair (as a graph would), and beyond it only a pair's other listing."""
    _, models, groups = data(11, ties=True)
    host = Space(models["m1"], 40, groups=groups).host  # excluded pairs: -inf list tails
    depth = 15
    host.fill_products(depth)
    known = ~np.isnan(host.memo)
    listed = host.values > -np.inf
    assert (known[:, :depth] == listed[:, :depth]).all() and not (known & ~listed).any()
    rows, places = np.nonzero(known)
    pairs = G.products(host.x, rows, host.indices[rows, places])
    assert (host.memo[rows, places] == pairs).all()
    assert (host.rpos[rows, places][places >= depth] < depth).all()
    assert (host.rpos[rows, places][places >= depth] >= 0).all()
    order, starts = G._neighbourhoods(host.indices, host.values, G.GROUP_ROWS)
    assert sorted(order.tolist()) == list(range(72))
    assert 0 < np.diff(starts).min() and np.diff(starts).max() <= G.GROUP_ROWS


def test_kept_permutations_are_the_drawn_ones(monkeypatch):
    """Models after the first read the null's permutations back instead of drawing them
    again: the same rows, in batches, as int64; not kept when over NULL_KEEP_BYTES."""
    groups = torch.arange(60) // 4
    expected = torch.stack(list(S.permutations(60, 7, 5, groups))).numpy()
    for keep in (1 << 26, 0):
        monkeypatch.setattr(S, "NULL_KEEP_BYTES", keep)
        S._kept_permutations.clear()
        for _ in range(2):  # drawn, then (when kept) read back
            got = list(S.permutation_batches(60, 7, 5, groups, batch=3))
            assert [len(p) for p in got] == [3, 3, 1]
            got = np.concatenate(got)
            assert got.dtype == np.int64 and (got == expected).all()
        assert bool(S._kept_permutations) == bool(keep)
    other = np.concatenate(list(S.permutation_batches(60, 7, 6, groups, batch=3)))
    assert not (other == expected).all()  # another seed is not read back


def test_an_identity_permutation_gives_the_observed_bits():
    """So a shuffle that changes nothing counts as reaching the observed value, as in the
    dense definition, where it is the same computation."""
    b, models, _ = data(9, ties=True)
    sa, sb = Space(models["m2"], 10), Space(b, 10)
    ga, gb = sa.graphs((3, 10)), sb.graphs((3, 10))
    kl, m = G.hsic(ga, gb, (3, 10))
    perms = torch.stack([torch.arange(72), torch.randperm(72)]).numpy()
    many, many_m = G.hsic(ga, gb, (3, 10), perms)
    assert (many[0] == kl).all() and (many_m[0] == m).all()
    observed = S.pair_scores(sa, sb, [3, 10])
    assert S.summarise_null(observed[3].cknna, torch.tensor([observed[3].cknna] * 2), 0)["p_value"] == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_norms_and_products_are_float64_to_rounding(dtype):
    """The kernels' dot (summed in a compiler-chosen vector order) against torch's float64
    products, for float32 rows (widened exactly) and float64 rows."""
    x = torch.randn(40, 301, dtype=dtype, generator=torch.Generator().manual_seed(2))
    wide = x.double()
    norms = G.row_norms(x.numpy())
    assert abs(norms - wide.norm(dim=1).numpy()).max() <= 1e-13
    rows, cols = np.repeat(np.arange(40), 40), np.tile(np.arange(40), 40)
    got = G.products(x.numpy(), rows, cols).reshape(40, 40)
    assert abs(got - (wide @ wide.T).numpy()).max() <= 1e-12
    assert (got == got.T).all()  # one pair, either order: the same bits


def test_a_graph_with_itself_sums_as_the_marked_pass_does():
    """`hsic(g, g)` takes `_self` (no marks): the bits of `_one` under the identity, for
    union and slab graphs with ties and mutual edges."""
    b, models, _ = data(9, ties=True)
    space = Space(models["m2"], 40)
    subset = torch.arange(0, 72, 2)
    graphs = [space.graphs((3, 10)), space.host.slab((3, 10), subset, G.SlabScratch(), "A")]
    assert graphs[1] is not None
    for g in graphs:
        marked = G._one((3, 10), np.arange(g.n), *G._arrays(g, (3, 10)), *G._arrays(g, (3, 10)))
        got = G.hsic(g, g, (3, 10))
        assert (got[0] == marked[0]).all() and (got[1] == marked[1]).all()
        assert (got[0] != 0).all()


def test_subsets_in_threads_give_the_values_of_one_thread(monkeypatch):
    b, models, groups = data(10, ties=True)
    spaces = [Space(a, 40, groups=groups) for a in models.values()]
    sb = Space(b, 40, groups=groups)
    draws = S.subsets(72, 12, 0.75, 1, groups)
    threaded = S.subsample_table(spaces, sb, [3, 6], draws)
    monkeypatch.setattr(G, "threads", lambda: 1)
    single = S.subsample_table([Space(a, 40, groups=groups) for a in models.values()],
                               Space(b, 40, groups=groups), [3, 6], draws)
    for x, y in zip(threaded, single):
        for k in (3, 6):
            assert torch.equal(x[k][0], y[k][0]) and x[k][1] == y[k][1]


def _edges(g, r):
    """Row r's edges as sorted (neighbour, weights..., value) tuples, any graph layout."""
    start, end = (a[r] for a in g.rows())
    return sorted((int(g.dst[e]), *g.w[e].tolist(), float(g.val[e])) for e in range(start, end))


def test_slab_graphs_are_the_general_graphs_and_wide_ties_take_the_general_path():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(60, 6, generator=gen, dtype=torch.float64)
    x = unit_rows(torch.cat([base, base[:20]]))  # 20 rows twice: ties of two at many places
    space, states = Space(x, 30), Space(unit_rows(torch.randn(80, 3, generator=gen)), 30)
    subset = torch.randperm(80, generator=gen)[:50].sort().values
    scratch = G.SlabScratch()
    slab = space.host.slab((3, 6), subset, scratch, "A")
    slab_b = states.host.slab((3, 6), subset, scratch, "B")
    full = space.host.tie_graphs((3, 6), members=subset)
    full_b = states.host.tie_graphs((3, 6), members=subset)
    assert slab is not None and slab_b is not None
    assert sum(full.crossing) > 0  # the ties did reach the k-th place somewhere
    assert all(_edges(slab, r) == _edges(full, r) for r in range(len(subset)))
    assert slab.crossing.tolist() == full.crossing.tolist()
    for k in (3, 6):
        assert slab.self_scale(k) == pytest.approx(full.self_scale(k), rel=1e-12)
    for ga, gb, fa, fb in ((slab, slab_b, full, full_b), (slab, slab, full, full)):
        got, want = G.hsic(ga, gb, (3, 6)), G.hsic(fa, fb, (3, 6))
        assert abs(got[0] - want[0]).max() <= 1e-15 and (got[1] == want[1]).all()
    # Three prototypes, 20 copies each: a row's tie (19 others) is wider than its slab.
    wide = unit_rows(torch.randn(3, 5, generator=gen).repeat(20, 1))
    assert Space(wide, 30).host.slab((3,), subset[subset < 60], scratch, "A") is None
