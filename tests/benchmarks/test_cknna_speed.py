"""The seed's CKNNA stage for one model (k = 5, 10, 20 + mutual kNN): engine vs the dense
reference vs the A A^T product alone, timed in one run. N defaults to the real 5000;
HARNESS_BENCH_N makes it smaller (CI). Timings are reported, never asserted."""
import os

import pytest
import torch

from harness.cknna import significance as C
from tests.dense_reference import dense_cknna, dense_mutual_knn

N = int(os.environ.get("HARNESS_BENCH_N", 5000))
KS = (5, 10, 20)


@pytest.fixture(scope="module")
def feats():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(N, 2304, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(N, 7, generator=g), dim=1)
    return a, b


def engine_stage(a, b):
    return C.align(a, b, KS)


def dense_stage(a, b):
    return {k: (dense_cknna(a, b, k, torch.float32), dense_mutual_knn(a, b, k, torch.float32))
            for k in KS}


@pytest.mark.benchmark(group="cknna-stage")
def test_engine_stage(benchmark, feats):
    result = benchmark.pedantic(engine_stage, args=feats, rounds=3, iterations=1)
    assert set(result) == set(KS)


@pytest.mark.benchmark(group="cknna-stage")
def test_dense_reference_stage(benchmark, feats):
    result = benchmark.pedantic(dense_stage, args=feats, rounds=1, iterations=1)
    fast = C.align(*feats, KS)
    for k in KS:  # the two stages agree on what they time
        assert result[k][0] == pytest.approx(fast[k]["cknna"], abs=1e-4)


@pytest.mark.benchmark(group="cknna-stage")
def test_gram_product_floor(benchmark, feats):
    a, _ = feats
    benchmark.pedantic(lambda: a @ a.T, rounds=3, iterations=1)
