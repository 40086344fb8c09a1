"""Issue 11: the fast paths give bit-for-bit the numbers of the straightforward engine
issue 12 left (kept verbatim in tests/issue12_engine) for the same seed: permutation
nulls, subsample draws, comparisons, pairwise, ties, groups."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import cknna as C
from harness import knn as K
from harness import results as R
from harness import significance as S
from tests.issue12_engine import cknna as old_cknna
from tests.issue12_engine import results as old_results
from tests.issue12_engine import significance as old_significance

pytestmark = pytest.mark.unit


def unit_rows(x):
    return torch.nn.functional.normalize(x, dim=1)


def data(seed, n=120, ties=False):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, 7, generator=g)
    if ties:  # duplicate states and duplicate model rows, partly overlapping
        b = b[torch.randint(0, n // 4, (n,), generator=g)]
    models = {}
    for name, w in (("m1", 2.0), ("m2", 0.7), ("m3", 0.0)):
        a = torch.cat([w * b, torch.randn(n, 40, generator=g)], 1)
        if ties:
            a[n // 2:] = a[:n - n // 2][torch.randperm(n - n // 2, generator=g)]
        models[name] = unit_rows(a)
    groups = torch.arange(n) // 4
    return unit_rows(b), models, groups


# What issue 18 added or redefined, left out of the bit-for-bit comparison: the chance
# keys beside the null (same draws), the BH correction, and the intervals (now for the
# full-sample value, from subsets of two sizes; the f-sized subsets' values are compared).
NEW_KEYS = {"chance", "excess", "p_adjusted", "above_chance", "multiple_testing", "samples"}


def core(x):
    """x without issue 18's additions; subsample records reduced to their draws."""
    if isinstance(x, dict):
        out = {}
        for key, v in x.items():
            if key in NEW_KEYS or any(str(key).startswith(f"{n}_k") for n in NEW_KEYS):
                continue
            if key in ("subsample", "comparisons", "tie_rule") or key == "subsample_values":
                continue
            out[key] = core(v)
        return out
    if isinstance(x, list):
        return [core(v) for v in x]
    return x


@pytest.fixture(autouse=True)
def same_tie_tolerance(monkeypatch):
    """The old engine under issue 18's tie tolerance (a definition, not a speed change)."""
    from tests.issue12_engine import knn as old_knn
    monkeypatch.setattr(old_knn, "TIE_RTOL", K.TIE_RTOL)


def same(x, y, path="") -> None:
    """Exact equality, NaN equal to NaN, through dicts, lists and tensors."""
    if isinstance(x, dict):
        assert set(x) == set(y), path
        for key in x:
            same(x[key], y[key], f"{path}.{key}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), path
        for i, (a, b) in enumerate(zip(x, y)):
            same(a, b, f"{path}[{i}]")
    elif isinstance(x, torch.Tensor):
        assert torch.equal(x.nan_to_num(7.5), y.nan_to_num(7.5)), path
    elif isinstance(x, float) and math.isnan(x):
        assert isinstance(y, float) and math.isnan(y), path
    else:
        assert x == y, f"{path}: {x!r} != {y!r}"


@pytest.mark.parametrize("ties", ["shared", "index"])
@pytest.mark.parametrize("seed,tied,grouped,exclude", [
    (0, False, False, False), (1, True, False, False), (2, True, True, False),
    (3, True, True, True), (4, False, True, True)])
def test_align_matches_the_issue_12_engine_bit_for_bit(seed, tied, grouped, exclude, ties):
    b, models, groups = data(seed, ties=tied)
    options = dict(permutations=40, subsample_draws=12, subsample_fraction=0.7, seed=seed,
                   ties=ties, groups=groups if grouped else None, exclude_same_group=exclude,
                   keep_draws=True)
    for a in models.values():
        new = S.align(a, b, [3, 5, 10], **options)
        old = old_significance.align(a, b, [3, 5, 10], **options)
        same(core(new), core(old))
        for k in (3, 5, 10):  # the f-sized subsets are the old ones, with the same values
            same(new[k]["subsample_values"][:12], old[k]["subsample_values"])


@pytest.mark.parametrize("pair_map", [True, False])
@pytest.mark.parametrize("seed,tied,grouped", [(5, False, False), (6, True, True)])
def test_the_whole_results_json_matches_the_issue_12_engine(seed, tied, grouped, pair_map,
                                                             monkeypatch):
    """Both ways of finding edges (the shared pair map, sorted keys beyond its size)."""
    if not pair_map:
        monkeypatch.setattr(C, "MAP_ELEMENTS", 0)
    b, models, groups = data(seed, n=100, ties=tied)
    settings = R.Settings(ks=[3, 5, 10], permutations=30, subsample_draws=10,
                          subsample_fraction=0.75, seed=seed, pairwise=True, compare=True,
                          groups=groups if grouped else None, side_by_side=grouped)
    paths = {name: (f"/x/{name}/feats_A.pt", a) for name, a in models.items()}
    new = R.compute(paths, b, "/x/b.pt", settings, {})
    old = old_results.compute(paths, b, "/x/b.pt", old_results.Settings(**vars(settings)), {})
    for res in (new, old):
        res["_meta"].pop("timestamp")
    same(core(new), core(old))


@pytest.mark.parametrize("batch_elements", [1, 5000, 1 << 22])
@pytest.mark.parametrize("tied", [False, True])
def test_batched_null_matches_one_permutation_at_a_time(batch_elements, tied, monkeypatch):
    monkeypatch.setattr(S, "NULL_BATCH_ELEMENTS", batch_elements)
    b, models, groups = data(7, n=400, ties=tied)
    for k in (5, 20):
        sa, sb = S.Space(models["m1"], k), S.Space(b, k)
        observed = S.space_scores(sa, sb, k)
        old_a, old_b = old_cknna.Space(models["m1"], k), old_cknna.Space(b, k)
        for g in (None, groups):
            same(S.null_draws(sa, sb, observed, 25, seed=3, groups=g),
                 old_significance.null_draws(old_a, old_b, observed, 25, seed=3, groups=g))


def test_edge_lookup_without_a_bitmap_agrees(monkeypatch):
    b, models, _ = data(8, n=200)
    sa, sb = S.Space(models["m2"], 10), S.Space(b, 10)
    observed = S.space_scores(sa, sb, 10)
    with_bitmap = S.null_draws(sa, sb, observed, 20, seed=1)
    monkeypatch.setattr(C.PairSet, "BITMAP_BYTES", 0)
    monkeypatch.setattr(C, "MAP_ELEMENTS", 0)
    sb_sorted = S.Space(b, 10)
    same(S.null_draws(sa, sb_sorted, observed, 20, seed=1), with_bitmap)


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 8), cols=st.integers(1, 12), seed=st.integers(0, 2 ** 31 - 1),
       spread=st.sampled_from([0.0, 1e-9, 1e-7, 1.0]))
def test_count_at_least_is_the_float64_comparison(rows, cols, seed, spread):
    """The float32 comparison against a rounded-up bound counts exactly what comparing
    float64 copies counts, for bounds at, between and beside float32 values."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, cols, generator=g)
    values[torch.rand(rows, cols, generator=g) < 0.2] = float("-inf")
    bound = values[:, torch.randint(0, cols, (1,), generator=g)].squeeze(1).double()
    bound = bound + spread * torch.randn(rows, generator=g, dtype=torch.float64)
    expected = (values.double() >= bound.unsqueeze(1)).sum(1)
    assert torch.equal(K._count_at_least(values, bound), expected)


@settings(max_examples=200, deadline=None)
@given(rows=st.integers(1, 8), cols=st.integers(1, 12), seed=st.integers(0, 2 ** 31 - 1))
def test_finite_first_is_the_stable_descending_argsort_of_restricted_lists(rows, cols, seed):
    """Restricted lists (descending, with -inf for dropped entries, ties included)."""
    g = torch.Generator().manual_seed(seed)
    values = (torch.randn(rows, cols, generator=g) * 2).round().sort(1, descending=True).values
    values[torch.rand(rows, cols, generator=g) < 0.3] = float("-inf")
    assert torch.equal(S._finite_first(values),
                       values.argsort(dim=1, descending=True, stable=True))


@pytest.mark.parametrize("slack,margin", [(0, 1.0), (0, 3.0), (2, 3.0), (16, 1.5)])
@pytest.mark.parametrize("tied", [False, True])
def test_short_restricted_lists_give_the_whole_lists_graphs(slack, margin, tied, monkeypatch):
    """Subset graphs from each row's leading restricted entries (falling back to whole lists
    where a zone reaches their end or a row runs short) are the issue 12 engine's."""
    monkeypatch.setattr(S, "RESTRICT_SLACK", slack)
    monkeypatch.setattr(S, "READ_MARGIN", margin)
    b, models, groups = data(9, n=160, ties=tied)
    options = dict(subsample_draws=15, subsample_fraction=0.75, seed=2, keep_draws=True)
    for g in (None, groups):
        for a in models.values():
            new = S.align(a, b, [1, 4, 9], groups=g, **options)
            old = old_significance.align(a, b, [1, 4, 9], groups=g, **options)
            same(core(new), core(old))
            for k in (1, 4, 9):
                same(new[k]["subsample_values"][:15], old[k]["subsample_values"])
