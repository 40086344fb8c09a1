"""Forward + masked-mean pool throughput per tiny family at batch 1, 8 and 32 (CPU).

Samples/s is stored in each case's `extra_info`; the batched/unbatched ratio is
samples_per_s(batch B) / samples_per_s(batch 1). Reported, never asserted.
Run: python -m pytest -m benchmark tests/benchmarks/test_forward_throughput.py
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from harness.extractors import tiny
from harness.extractors.hf_vlm import HfVlmExtractor
from harness.extractors.engine.pooling import masked_mean

BATCHES = (1, 8, 32)
TASKS = ["put the spoon on the towel", "open the drawer", "", "pick up the carrot and place it"]


def _samples(n):
    rng = np.random.default_rng(0)
    return [(i, Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)),
             TASKS[i % len(TASKS)]) for i in range(n)]


@pytest.fixture(scope="module", params=tiny.FAMILIES)
def extractor(request):
    reason = tiny.unavailable(request.param)
    if reason:
        pytest.skip(reason)
    return HfVlmExtractor(f"tiny:{request.param}", padding_side="left").load()


@pytest.mark.parametrize("batch", BATCHES)
def test_forward_pool_throughput(benchmark, extractor, batch):
    samples = _samples(batch)

    def step():
        hidden = extractor.forward(extractor.build_inputs(samples))
        return masked_mean(hidden.layers["last"], hidden.mask)

    feats = benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    assert feats.shape == (batch, tiny.HIDDEN)
    benchmark.group = f"forward+pool {extractor.family}"
    benchmark.extra_info.update(family=extractor.family, batch=batch)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["samples_per_s"] = batch / stats.stats.median
