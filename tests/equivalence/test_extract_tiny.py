"""The run loop over a tiny real-architecture model: merged file == per-sample pooling,
and two gloo ranks produce exactly the single-process file."""
from __future__ import annotations

import json

import pytest
import torch

from harness.extractors import tiny
from harness.extractors.hf_vlm import HfVlmExtractor
from harness.extractors.engine.features import extract
from harness.extractors.engine.pooling import masked_mean
from tests.fake_extractor import distributed_worker, image_samples

FAMILY = "paligemma2"  # the SpatialVLA architecture; exists in every supported release


def test_extract_equals_per_sample_pooling(tmp_path):
    ex = HfVlmExtractor(f"tiny:{FAMILY}", padding_side="left", layers=[1]).load()
    data = image_samples(7)
    extract(ex, data, tmp_path, batch_size=3, shard_size=4, progress=False,
            dataset_fingerprint="fp-test")
    feats = torch.load(tmp_path / "feats_A.pt", weights_only=True)
    assert feats.shape == (7, tiny.HIDDEN) and feats.dtype == torch.float32
    for i, sample in enumerate(data):
        hidden = ex.forward(ex.build_inputs([sample]))
        torch.testing.assert_close(feats[i], masked_mean(hidden.layers["last"], hidden.mask)[0],
                                   rtol=0, atol=1e-5)
    layer1 = torch.load(tmp_path / "feats_A_layer1.pt", weights_only=True)
    assert layer1.shape == feats.shape and not torch.allclose(layer1, feats)
    meta = json.loads((tmp_path / "extraction_metadata.json").read_text())
    assert meta["model"] == f"tiny:{FAMILY}" and meta["dataset_fingerprint"] == "fp-test"
    assert meta["padding_side"] == "left" and meta["attn_implementation"] == "eager"
    assert meta["class"] == "PaliGemmaForConditionalGeneration" and meta["layers"] == [1]


def test_two_gloo_ranks_equal_single_process(tmp_path):
    mp = pytest.importorskip("torch.multiprocessing")
    single = extract(HfVlmExtractor(f"tiny:{FAMILY}").load(), image_samples(9), tmp_path / "one",
                     batch_size=2, shard_size=2, progress=False)["last"]
    mp.spawn(distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "two"),
                                       f"tiny:{FAMILY}", 9, 2, 2), nprocs=2, join=True)
    assert torch.equal(torch.load(tmp_path / "two" / "feats_A.pt", weights_only=True), single)
