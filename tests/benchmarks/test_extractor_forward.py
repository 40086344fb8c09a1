"""One forward pass per model-family extractor (batch of 8), timed.

Stand-ins on CPU by default; with CUDA and HARNESS_<FAMILY>_CKPT set, the real checkpoint
in bf16 (CUDA is synchronised inside the timed call). Timings are reported, never asserted.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image

from harness.commands.extract import build_extractor

BATCH = 8
ENV = {"spatialvla": "HARNESS_SPATIALVLA_CKPT", "pi0_lerobot": "HARNESS_PI0_CKPT",
       "starvla": "HARNESS_STARVLA_CKPT"}
DEFAULTS = dict(batch_size=BATCH, dtype="auto", layers="last", limit=None, resume=False,
                revision=None, unnorm_key="bridge_orig/1.0.0", image_key=None,
                seed_tokenization=False, allow_missing_keys=[], allow_unexpected_keys=[],
                pi0_code="auto", cot_prompt=None, image_size=224)


def _samples(n=BATCH):
    rng = np.random.default_rng(0)
    tasks = ["put the spoon on the towel", "open the drawer", "", "pick up the carrot"]
    return [(i, Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)),
             tasks[i % len(tasks)]) for i in range(n)]


@pytest.fixture(params=sorted(ENV), scope="module")
def loaded(request):
    family = request.param
    real = torch.cuda.is_available() and os.environ.get(ENV[family])
    args = argparse.Namespace(**DEFAULTS, family=family, ckpt=real or "tiny",
                              device="cuda" if real else "cpu")
    with build_extractor(args) as extractor:
        yield family, extractor, extractor.build_inputs(_samples())


def test_forward(benchmark, loaded):
    family, extractor, inputs = loaded
    cuda = next(iter(inputs.values())).is_cuda

    def once():
        out = extractor.forward(inputs)
        if cuda:
            torch.cuda.synchronize()
        return out

    benchmark.group = "extractor-forward"
    benchmark.extra_info.update(family=family, batch=BATCH,
                                stand_in=not cuda, device="cuda" if cuda else "cpu")
    out = benchmark.pedantic(once, rounds=5, iterations=1, warmup_rounds=1)
    assert out.layers["last"].shape[0] == BATCH
