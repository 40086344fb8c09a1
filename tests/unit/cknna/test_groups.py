"""Per-sample groups (episodes of the real Bridge sample list) and paired model comparisons."""
import json
import math
from pathlib import Path

import pytest
import torch

from harness import cknna as C
from harness.cknna import significance as S
from tests.dense_reference import dense_shared_scores

pytestmark = pytest.mark.unit

REAL = Path(__file__).resolve().parents[2] / "data" / "bridge_cknna_metadata.json"


def unit_rows(x):
    return torch.nn.functional.normalize(x, dim=1)


@pytest.fixture(scope="module")
def episodes():
    """The seed's real episode index of each of its 5000 samples (copied verbatim)."""
    return torch.tensor(json.loads(REAL.read_text())["episode_indices"])


def test_the_real_sample_list_is_as_described(episodes):
    _, counts = torch.unique(episodes, return_counts=True)
    assert len(episodes) == 5000 and len(counts) == 2386 and counts.max() == 10
    shared = counts[counts > 1].sum().item() / 5000
    assert shared == pytest.approx(0.81, abs=0.01)


def test_group_permutations_move_whole_groups_onto_same_size_groups(episodes):
    gen = torch.Generator().manual_seed(0)
    plan = S.GroupPlan(episodes)
    perm = plan.permutation(gen)
    assert torch.equal(perm.sort().values, torch.arange(5000))
    moved = 0
    for members in plan.members:
        images = episodes[perm[members]]
        assert (images == images[0]).all()  # one whole group of A for each group of B
        assert (episodes == images[0]).sum() == len(members)
        # member r goes to member r (sample order within each group is kept)
        assert torch.equal(perm[members], perm[members].sort().values)
        moved += int(images[0] != episodes[members[0]])
    assert moved > 2000


def test_group_subsets_are_unions_of_whole_groups(episodes):
    subsets = S.subsets(5000, 3, 0.5, seed=1, groups=episodes)
    for subset in subsets:
        inside = episodes[subset].unique()
        assert len(inside) == round(0.5 * 2386)
        assert len(subset) == int(torch.isin(episodes, inside).sum())
        assert torch.equal(subset, subset.sort().values)


def episode_only_alignment(episodes, n=600, seed=0, noise=0.3):
    """A and B share nothing but the episode: each episode has its own random code in A
    and an independent one in B; frames are their episode's code plus noise."""
    ep = episodes[:n]
    g = torch.Generator().manual_seed(seed)
    ids = torch.unique(ep, return_inverse=True)[1]
    m = int(ids.max()) + 1
    a = torch.randn(m, 32, generator=g)[ids] + noise * torch.randn(n, 32, generator=g)
    b = torch.randn(m, 7, generator=g)[ids] + noise * torch.randn(n, 7, generator=g)
    return unit_rows(a), unit_rows(b), ep


def test_excluding_same_episode_neighbours_brings_cknna_to_chance(episodes):
    a, b, ep = episode_only_alignment(episodes)
    naive = S.align(a, b, [5, 10], permutations=100)
    plain = S.align(a, b, [5, 10], permutations=100, groups=ep)
    excluded = S.align(a, b, [5, 10], permutations=100, groups=ep, exclude_same_group=True)
    for k in (5, 10):
        # High, and "significant" under a null that treats frames as independent ...
        assert plain[k]["cknna"] > 0.3 and naive[k]["permutation"]["p_value"] < 0.01
        # ... but shuffling whole episodes keeps the same-episode pairs: not significant.
        assert plain[k]["permutation"]["p_value"] > 0.01
        null = excluded[k]["permutation"]
        assert null["groups_respected"]
        assert abs(excluded[k]["cknna"] - null["null_mean"]) < 3 * null["null_std"]
        assert excluded[k]["cknna"] < 0.05 and null["p_value"] > 0.01


def test_excluded_pairs_leave_every_term_dense_check(episodes):
    a, b, ep = episode_only_alignment(episodes, n=60, seed=3)
    for k in (3, 8):
        want_cknna, want_mutual = dense_shared_scores(a, b, k, groups=ep)
        assert C.cknna(a, b, k, groups=ep) == pytest.approx(want_cknna, abs=1e-6)
        assert C.mutual_knn(a, b, k, groups=ep) == pytest.approx(want_mutual, abs=1e-12)
    graph = C.Space(a, 8, groups=ep).graph(8)
    assert not (ep[graph.src] == ep[graph.dst]).any()


def test_group_subsample_draws_are_the_definition_on_the_subsets(episodes):
    a, b, ep = episode_only_alignment(episodes, n=80, seed=1)
    subsets = S.subsets(80, 4, 0.6, seed=5, groups=ep)
    sa = C.Space(a, 40, groups=ep)
    sb = C.Space(b, 40, groups=ep)
    values, _ = S.subsample_values(sa, sb, 4, subsets)
    for value, subset in zip(values, subsets):
        want = dense_shared_scores(a[subset], b[subset], 4, groups=ep[subset])[0]
        assert value.item() == pytest.approx(want, abs=1e-6)


# ------------------------------------------------------------ paired comparisons


def three_models(seed, n=240):
    """m1, m2: one process (state + independent noise of one size); m3 clearly weaker."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, 7, generator=g)
    m1 = torch.cat([b, 1.5 * torch.randn(n, 9, generator=g)], 1)
    m2 = torch.cat([b, 1.5 * torch.randn(n, 9, generator=g)], 1)
    m3 = torch.cat([0.5 * b, 1.5 * torch.randn(n, 9, generator=g)], 1)
    return unit_rows(b), {"m1": unit_rows(m1), "m2": unit_rows(m2), "m3": unit_rows(m3)}


def compared(seed, draws=60, fraction=0.5):
    b, models = three_models(seed)
    observed, values = {}, {}
    for label, a in models.items():
        r = S.align(a, b, [10], subsample_draws=draws, subsample_fraction=fraction, seed=seed,
                    keep_draws=True)
        observed[label], values[label] = {10: r[10]["cknna"]}, {10: r[10]["subsample_values"]}
    return {(c["a"], c["b"]): c for c in S.compare(list(models), observed, values, [10],
                                                     fraction=fraction, seed=seed)["k10"]}


@pytest.mark.parametrize("seed", range(3))
def test_compare_separates_a_better_model_and_not_two_of_one_process(seed):
    rows = compared(seed)
    for better in ("m1", "m2"):
        row = rows[(better, "m3")]
        assert row["interval"][0] > 0 and row["excludes_zero"]
        assert row["interval"][0] <= row["difference"] <= row["interval"][1]
    same = rows[("m1", "m2")]
    assert same["interval"][0] < 0 < same["interval"][1] and not same["excludes_zero"]
    assert same["level"] == 0.95 and same["n_draws"] == 60


def test_paired_interval_uses_the_same_subsets_for_both_models():
    b, models = three_models(0, n=120)
    subsets = S.subsets(120, 5, 0.5, seed=2)
    sb = C.Space(b, 40)
    diff = (S.subsample_values(C.Space(models["m1"], 40), sb, 10, subsets)[0]
            - S.subsample_values(C.Space(models["m3"], 40), sb, 10, subsets)[0])
    for d, subset in zip(diff, subsets):
        want = (dense_shared_scores(models["m1"][subset], b[subset], 10)[0]
                - dense_shared_scores(models["m3"][subset], b[subset], 10)[0])
        assert d.item() == pytest.approx(want, abs=1e-6)


def test_rate_interval_scales_the_subset_spread_to_the_full_sample():
    """sd(full) = sd(subsets of f) / sqrt(f^(-2 beta) - 1), beta from the spread ratio of
    the two sizes: 1/2 for an ordinary statistic, 1 for a degenerate one."""
    large = torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    for beta, ratio in ((0.5, 6.0), (1.0, (0.4 ** -2 - 1) / (0.8 ** -2 - 1)), (0.75, None)):
        if ratio is None:
            ratio = (0.4 ** -1.5 - 1) / (0.8 ** -1.5 - 1)
        small = large * math.sqrt(ratio)
        iv = S.rate_interval(10.0, small, large, 0.4, 0.8, level=0.95)
        assert iv["rate_beta"] == pytest.approx(beta, abs=1e-6)
        sd = large.std().item() / math.sqrt(0.8 ** (-2 * beta) - 1)
        assert iv["sd"] == pytest.approx(sd)
        assert (iv["low"], iv["high"]) == pytest.approx((10 - 1.959964 * sd, 10 + 1.959964 * sd))
    # beyond the bounds the rate is clamped (1/2 gives the widest interval)
    assert S.rate_interval(0.0, large, large, 0.4, 0.8)["rate_beta"] == 0.5
    assert S.rate_interval(0.0, 100 * large, large, 0.4, 0.8)["rate_beta"] == 1.0
    assert math.isnan(S.rate_interval(float("nan"), large, large, 0.4, 0.8)["low"])
