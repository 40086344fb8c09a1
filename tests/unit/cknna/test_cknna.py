"""The O(N k) engine against the dense formula, known answers, and the metric's properties."""
import math
import warnings

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from harness.cknna import core as C
from harness.cknna import significance as S
from harness.cknna.knn import knn
from tests.dense_reference import (dense_biased_cka, dense_cknna, dense_mutual_knn,
                                   dense_shared_scores,
                                   dense_unbiased_cka, hsic_unbiased)


def unit_rows(x):
    return torch.nn.functional.normalize(x, dim=1)


def related_pair(seed, n, da, db, noise=0.7):
    """A random, B a noisy projection of A: related, tie-free almost surely."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, da, generator=g)
    b = a @ torch.randn(da, db, generator=g) + noise * torch.randn(n, db, generator=g)
    return unit_rows(a), unit_rows(b)


CASES = [(seed, n, da, db, k) for seed, (n, da, db, k) in enumerate([
    (4, 3, 2, 1), (4, 3, 2, 3), (10, 5, 3, 2), (37, 16, 7, 5), (60, 8, 7, 10), (120, 32, 7, 20),
    (200, 64, 3, 10), (80, 12, 12, 79), (25, 40, 7, 24), (150, 6, 2, 1)])]


@pytest.mark.parametrize("seed,n,da,db,k", CASES)
def test_engine_equals_dense_formula(seed, n, da, db, k):
    a, b = related_pair(seed, n, da, db)
    assert C.cknna(a, b, k) == pytest.approx(dense_cknna(a, b, k), abs=1e-6)
    assert C.mutual_knn(a, b, k) == pytest.approx(dense_mutual_knn(a, b, k), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_one_search_serves_every_k(seed):
    a, b = related_pair(seed, 90, 10, 7)
    results = S.align(a, b, [3, 7, 20])
    for k in (3, 7, 20):
        assert results[k]["cknna"] == pytest.approx(dense_cknna(a, b, k), abs=1e-6)
        assert results[k]["mutual_knn"] == pytest.approx(dense_mutual_knn(a, b, k), abs=1e-12)


@pytest.mark.parametrize("seed,n", [(0, 30), (1, 64), (2, 101)])
def test_k_n_minus_1_is_unbiased_cka_with_the_reference_eps(seed, n):
    a, b = related_pair(seed, n, 9, 5)
    a64, b64 = a.double(), b.double()
    K, L = a64 @ a64.T, b64 @ b64.T
    kl, kk, ll = hsic_unbiased(K, L), hsic_unbiased(K, K), hsic_unbiased(L, L)
    expected = (kl / (torch.sqrt(kk * ll) + 1e-6)).item()
    assert C.cknna(a, b, n - 1) == pytest.approx(expected, abs=1e-7)
    assert C.cknna(a, b, n - 1) == pytest.approx(dense_unbiased_cka(a, b), rel=1e-3)


@pytest.mark.parametrize("seed", range(4))
def test_linear_cka_equals_dense(seed):
    a, b = related_pair(seed, 70, 12, 7)
    assert C.cka(a, b, unbiased=True) == pytest.approx(dense_unbiased_cka(a, b), abs=1e-10)
    assert C.cka(a, b, unbiased=False) == pytest.approx(dense_biased_cka(a, b), abs=1e-10)


# ------------------------------------------------------------ known relationships


def self_hsic_ratio(a, k):
    """sim_KK / (sim_KK + 1e-6): CKNNA's exact value when B's kernel equals A's."""
    a64 = a.double()
    K = a64 @ a64.T
    Kh = K.clone().fill_diagonal_(float("-inf"))
    mask = torch.zeros_like(K).scatter_(1, Kh.topk(k, dim=1).indices, 1.0)
    kk = hsic_unbiased(mask * K, mask * K).item()
    return kk / (kk + 1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_rotated_copy_scores_its_exact_ceiling(seed):
    g = torch.Generator().manual_seed(100 + seed)
    a = unit_rows(torch.randn(80, 16, generator=g))
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    b = a @ q  # B = A Q: same kernel, so sim_KL = sim_KK = sim_LL
    for k in (1, 5, 10):
        assert C.cknna(a, b, k) == pytest.approx(self_hsic_ratio(a, k), abs=1e-6)
        assert C.mutual_knn(a, b, k) == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_independent_states_score_near_their_null(seed):
    g = torch.Generator().manual_seed(200 + seed)
    a = unit_rows(torch.randn(300, 20, generator=g))
    b = unit_rows(torch.randn(300, 7, generator=g))
    result = S.permutation_test(a, b, 10, n_permutations=200, seed=seed)
    assert abs(result["z_score"]) < 4
    assert result["p_value"] > 1 / 201


def test_rotated_copy_beats_every_permutation():
    a, _ = related_pair(5, 150, 12, 7)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(1)))
    result = S.permutation_test(a, a @ q, 10, n_permutations=300, seed=3)
    assert result["p_value"] == pytest.approx(1 / 301)
    assert result["z_score"] > 10


# ------------------------------------------------------------ properties (docs/facts.md §2)


@st.composite
def pairs(draw):
    n = draw(st.integers(8, 60))
    return (draw(st.integers(0, 10_000)), n, draw(st.integers(2, 12)), draw(st.integers(2, 8)),
            draw(st.integers(1, n - 1)))


@given(pairs())
def test_invariant_to_orthogonal_maps(case):
    seed, n, da, db, k = case
    a, b = related_pair(seed, n, da, db)
    g = torch.Generator().manual_seed(seed + 1)
    qa, _ = torch.linalg.qr(torch.randn(da, da, generator=g, dtype=torch.float64))
    qb, _ = torch.linalg.qr(torch.randn(db, db, generator=g, dtype=torch.float64))
    a64, b64 = a.double(), b.double()
    assert C.cknna(a64 @ qa, b64 @ qb, k) == pytest.approx(C.cknna(a64, b64, k), abs=1e-9)


@given(pairs())
def test_invariant_to_joint_sample_permutation(case):
    seed, n, da, db, k = case
    a, b = related_pair(seed, n, da, db)
    a, b = a.double(), b.double()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    assert C.cknna(a[perm], b[perm], k) == pytest.approx(C.cknna(a, b, k), abs=1e-9)


@given(pairs())
def test_argument_order_matches_the_reference_both_ways(case):
    seed, n, da, db, k = case
    a, b = related_pair(seed, n, da, db)
    # the definition: ties within the input's precision share their slots (README); on
    # random data hypothesis finds k-th places that close (n=35, k=32), where plain top-k
    # (dense_cknna, the seed's) would hang on rounding
    assert C.cknna(b, a, k) == pytest.approx(dense_shared_scores(b, a, k)[0], abs=1e-6)


def test_cknna_is_not_symmetric():
    a, b = related_pair(11, 60, 10, 4)
    forward, backward = C.cknna(a, b, 5), C.cknna(b, a, 5)
    assert forward == pytest.approx(dense_cknna(a, b, 5), abs=1e-6)
    assert backward == pytest.approx(dense_cknna(b, a, 5), abs=1e-6)
    assert abs(forward - backward) > 1e-6  # well above float error (~1e-8)


@given(pairs(), st.floats(0.01, 100))
@example(case=(0, 59, 2, 2, 1), scale=1.0)  # a k-th place split by 3e-7 (see below)
def test_scale_changes_only_the_eps_term(case, scale):
    seed, n, da, db, k = case
    a, b = related_pair(seed, n, da, db)
    a64, b64 = a.double(), b.double()
    na, nb, nsa = knn(a64, k), knn(b64, k), knn(scale * a64, k)
    base, scaled = C.scores_from_neighbours(na, nb, k), C.scores_from_neighbours(nsa, nb, k)
    # With the 1e-6 removed, the ratio is exactly scale-free.
    assert scaled.sim_kl / math.sqrt(scaled.sim_kk * scaled.sim_ll) == pytest.approx(
        base.sim_kl / math.sqrt(base.sim_kk * base.sim_ll), rel=1e-9, abs=1e-12)
    # `scores_from_neighbours` is the index rule: its dense reference is plain float64
    # top-k (dense_cknna), not the shared-tie rule, which splits k-th places closer than
    # float32 precision (hypothesis finds such rows: n=59, k=1, first two 3e-7 apart)
    assert scaled.cknna == pytest.approx(dense_cknna(scale * a64, b64, k), abs=1e-6)


# ------------------------------------------------------------ significance


def test_null_draws_are_cknna_of_shuffled_samples():
    a, b = related_pair(7, 40, 8, 5)
    k = 5
    sa, sb = C.Space(a, k), C.Space(b, k)
    draws = S.null_draws(sa, sb, C.space_scores(sa, sb, k), 6, seed=9)
    gen = torch.Generator().manual_seed(9)
    for value in draws:
        perm = torch.randperm(40, generator=gen)
        assert value.item() == pytest.approx(dense_cknna(a[perm], b, k), abs=1e-6)


def test_permutation_summary_counts_with_plus_one():
    null = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    s = S.summarise_null(0.25, null, seed=0)
    assert s["p_value"] == pytest.approx((1 + 2) / 5)
    assert s["null_mean"] == pytest.approx(0.25)
    assert s["cknna_minus_null_mean"] == pytest.approx(0.0)


def test_permutation_test_is_seeded():
    a, b = related_pair(3, 60, 8, 5)
    assert S.permutation_test(a, b, 5, 50, seed=1) == S.permutation_test(a, b, 5, 50, seed=1)
    assert S.permutation_test(a, b, 5, 50, seed=1) != S.permutation_test(a, b, 5, 50, seed=2)


def test_subsample_draws_are_cknna_of_the_subsets():
    a, b = related_pair(8, 50, 8, 5)
    values, _ = S.subsample_draws(a, b, 4, n_draws=5, fraction=0.6, seed=2)
    gen = torch.Generator().manual_seed(2)
    for value in values:
        subset = torch.randperm(50, generator=gen)[:30].sort().values
        assert value.item() == pytest.approx(dense_cknna(a[subset], b[subset], 4), abs=1e-6)


def test_short_lists_fall_back_to_an_exact_search():
    a, _ = related_pair(4, 60, 6, 3)
    short = knn(a, 6)  # far too short for 5 neighbours within a 25% subset
    subset = torch.randperm(60, generator=torch.Generator().manual_seed(0))[:15].sort().values
    got, redone = C.subsample_neighbours(a, short, subset, 5)
    want = knn(a[subset], 5)
    assert redone > 0
    assert torch.equal(got.indices, want.indices)
    assert torch.allclose(got.values, want.values)


def test_interval_is_for_the_full_sample_value():
    a, b = related_pair(1, 120, 10, 5)
    ci = S.subsample_interval(a, b, 10, n_draws=40, fraction=0.8, seed=0)
    assert ci["low"] < C.cknna(a, b, 10) < ci["high"]
    at_m = ci["at_subset_size"]  # the subsets' own percentiles, kept apart
    assert at_m["low"] <= at_m["mean"] <= at_m["high"]
    assert ci["subsample_size"] == 96 and ci["nan_draws"] == 0


# ------------------------------------------------------------ bad input and degenerate results


@pytest.mark.parametrize("n,k", [(3, 1), (10, 0), (10, 10), (10, -1)])
def test_rejects_bad_n_and_k(n, k):
    a, b = related_pair(0, max(n, 1), 4, 3)
    with pytest.raises(ValueError, match="N >= 4|k="):
        C.cknna(a, b, k)


def test_rejects_mismatched_samples_and_shapes():
    a, b = related_pair(0, 10, 4, 3)
    with pytest.raises(ValueError, match="samples"):
        C.cknna(a, b[:9], 2)
    with pytest.raises(ValueError, match="2-D"):
        C.cknna(a.flatten(), b, 2)


def test_degenerate_self_similarity_is_nan_with_a_warning():
    with pytest.warns(RuntimeWarning, match="degenerate"):
        assert math.isnan(C._ratio(0.1, -0.2, 0.3))
    with pytest.warns(RuntimeWarning, match="degenerate"):
        assert math.isnan(C._ratio(0.1, 0.0, 0.3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert C._ratio(0.1, 0.2, 0.3) == pytest.approx(0.1 / (math.sqrt(0.06) + 1e-6))


# ------------------------------------------------------------ what the metric is NOT (docs/facts.md §2)


def small_pair(seed, n=6, da=2, db=2):
    g = torch.Generator().manual_seed(seed)
    return unit_rows(torch.randn(n, da, generator=g)), unit_rows(torch.randn(n, db, generator=g))


@pytest.mark.parametrize("seed,low,high", [(5, 1.0, math.inf), (9, -math.inf, 0.0)])
def test_not_bounded_to_the_unit_interval_on_tiny_data(seed, low, high):
    a, b = small_pair(seed)
    value = C.cknna(a, b, 1)
    assert value == pytest.approx(dense_cknna(a, b, 1), abs=1e-6)
    assert low < value < high


@pytest.mark.parametrize("seed", range(3))
def test_not_translation_invariant_below_n_minus_1(seed):
    a, b = related_pair(seed, 40, 6, 4)
    shifted = a + 0.5
    assert C.cknna(shifted, b, 5) == pytest.approx(dense_cknna(shifted, b, 5), abs=1e-6)
    assert abs(C.cknna(shifted, b, 5) - C.cknna(a, b, 5)) > 1e-4


def test_all_rows_equal_looks_past_the_first_block_and_is_not_fooled_by_nan():
    from harness.cknna.core import EQUAL_ROWS_BLOCK, all_rows_equal
    direction = torch.randn(1, 5, dtype=torch.float64)
    rows = (direction * torch.rand(3 * EQUAL_ROWS_BLOCK, 1, dtype=torch.float64) + direction)
    rows = rows / rows.norm(dim=1, keepdim=True)  # one direction at many scales
    assert all_rows_equal(rows)
    late = rows.clone()
    late[-1, 0] += 1e-3  # one row differs, far past the first block
    assert not all_rows_equal(late)
    late[-1, 0] = float("nan")
    assert not all_rows_equal(late)
