"""The whole study's metric stage (5 models, k = 5, 10, 20, mutual kNN, pairwise, 1000
permutations, --compare with 200 paired subsets) as one `harness cknna` call, against the
seed-style dense computation of one model in the same run (benchmarks/study_stage.py).
N defaults to the real 5000; HARNESS_BENCH_N makes it smaller (CI), and below 5000 the
permutations and subsets shrink in proportion so that the quick run stays quick. The
ratio and peak extra memory are printed; timings are never asserted."""
import os

import pytest

pytestmark = pytest.mark.benchmark

N = int(os.environ.get("HARNESS_BENCH_N", 5000))


@pytest.mark.benchmark(group="study-stage")
def test_study_stage_against_dense_one_model(benchmark):
    from benchmarks import study_stage as stage
    scale = min(1.0, N / 5000)
    settings = {"n": N, "permutations": max(10, round(1000 * scale)),
                "draws": max(10, round(200 * scale))}
    result = benchmark.pedantic(stage.run, kwargs=settings, rounds=1, iterations=1)
    print(f"\nN={N}, {settings['permutations']} permutations, {settings['draws']} subsets: whole study stage {result['stage_s']:.2f} s, dense one model "
          f"{result['dense_one_model_s']:.2f} s, ratio {result['speedup_vs_dense_one_model']:.2f}x, "
          f"peak extra {result['stage_extra_mb']:.0f} MB")
    assert result["stage_s"] > 0 and result["dense_one_model_s"] > 0
