"""Do the intervals cover what they claim? On data with known structure (episodes of 5
frames sharing a latent state, N = 1000), over 200 independent data sets: the 95%
interval of the full-sample CKNNA, and of the paired difference of two exchangeable
models, contain the value's mean over data sets about 95% of the time: neither too narrow
nor, as the former sqrt(f / (1 - f)) scaling, too wide. A few minutes: marked slow."""
import pytest
import torch

from harness import cknna as C
from harness.cknna import significance as S
from harness.data.states import l2_rows

pytestmark = [pytest.mark.unit, pytest.mark.slow]

N_EPISODES, FRAMES, K, DRAWS, FRACTION, REPLICATES = 200, 5, 10, 25, 0.5, 200


def data_set(seed):
    """States and two models that see the same latent through a fixed map plus their own
    noise (exchangeable: their expected CKNNA is the same)."""
    g = torch.Generator().manual_seed(seed)
    fixed = torch.Generator().manual_seed(12345)
    wa, wb = torch.randn(3, 16, generator=fixed), torch.randn(3, 6, generator=fixed)
    n = N_EPISODES * FRAMES
    z = torch.randn(N_EPISODES, 3, generator=g).repeat_interleave(FRAMES, 0)
    z = z + 0.3 * torch.randn(n, 3, generator=g)
    models = [l2_rows(torch.tanh(z @ wa) + 0.8 * torch.randn(n, 16, generator=g)) for _ in range(2)]
    states = l2_rows(z @ wb + 0.3 * torch.randn(n, 6, generator=g))
    return models, states, torch.arange(N_EPISODES).repeat_interleave(FRAMES)


def intervals(seed):
    """(value, its interval, difference, its interval) for one data set."""
    (a1, a2), b, groups = data_set(seed)
    n = b.shape[0]
    length = S.long_list_length(K, FRACTION / 2, n)
    s1, s2, sb = (C.Space(x, length) for x in (a1, a2, b))
    draws = S.two_size_subsets(n, DRAWS, FRACTION, seed, groups)
    t1, t2 = S.subsample_table([s1, s2], sb, [K], draws)
    v1, v2 = C.space_scores(s1, sb, K).cknna, C.space_scores(s2, sb, K).cknna
    one = S.interval_record(t1[K][0], 0, fraction=FRACTION, level=0.95, seed=seed,
                            sizes=[len(d) for d in draws], groups=True, observed=v1)
    [pair] = S.compare(["1", "2"], {"1": {K: v1}, "2": {K: v2}},
                       {"1": {K: t1[K][0]}, "2": {K: t2[K][0]}}, [K], fraction=FRACTION)["k10"]
    return v1, (one["low"], one["high"]), v1 - v2, pair["interval"]


def test_intervals_cover_about_95_percent_of_data_sets():
    runs = [intervals(seed) for seed in range(REPLICATES)]
    truth = sum(r[0] for r in runs) / REPLICATES
    truth_diff = 0.0  # exchangeable models: the expected difference is 0
    cover = sum(lo <= truth <= hi for _, (lo, hi), _, _ in runs) / REPLICATES
    cover_diff = sum(lo <= truth_diff <= hi for _, _, _, (lo, hi) in runs) / REPLICATES
    # 200 replicates: binomial sd about 1.5 points at 95%
    assert 0.90 <= cover <= 0.99, cover
    assert 0.90 <= cover_diff <= 0.99, cover_diff
