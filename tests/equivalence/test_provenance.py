"""Provenance is built once in the extractor base: every family's stand-in records dtype
spelled one way, keeps its own pooling mask text beside the run loop's `pooling`, and the
attention implementation is read from the modules that ran, not from the request."""
from __future__ import annotations

import contextlib
import json
from argparse import Namespace

import pytest

from harness.commands.extract import build_extractor
from harness.extractors import tiny
from harness.extractors.hf_vlm import HfVlmExtractor
from harness.extractors.engine.registry import families
from harness.extractors.engine.features import extract
from tests.random_samples import random_samples

STAND_INS = [(spec.name, ckpt) for spec in families().values() for _, ckpt, _ in spec.demo]


def _args(family: str, ckpt: str, dtype: str = "auto") -> Namespace:
    return Namespace(family=family, ckpt=ckpt, device="cpu", dtype=dtype, layers="last",
                     revision=None)


@pytest.mark.parametrize("family,ckpt", STAND_INS)
def test_every_family_records_dtype_one_way(family, ckpt, tmp_path):
    if ckpt.startswith("tiny:qwen") and tiny.unavailable(ckpt[5:]):
        pytest.skip(tiny.unavailable(ckpt[5:]))
    with build_extractor(_args(family, ckpt)) as ex:
        prov = ex.provenance()
        assert prov["dtype"] == "float32" and prov["family"]
        extract(ex, random_samples(3), tmp_path, batch_size=2, progress=False)
    meta = json.loads((tmp_path / "extraction_metadata.json").read_text())
    assert meta["pooling"] == "mean"  # the run loop's pooling ...
    own = {k: v for k, v in prov.items() if k.startswith("pooling")}
    assert own and all(meta[k] == v for k, v in own.items())  # ... beside the family's own


def test_attention_is_read_from_the_modules_that_ran():
    ex = HfVlmExtractor("tiny:gemma", attn_implementation="eager").load()
    assert ex.provenance()["attn_implementation"] == "eager"
    for module in ex.model.modules():  # what a silent fallback would do
        cfg = getattr(module, "config", None)
        if cfg is not None:
            with contextlib.suppress(AttributeError, ValueError):
                cfg._attn_implementation = "sdpa"
    assert ex.attn == "eager"  # the request is unchanged ...
    assert ex.provenance()["attn_implementation"] == "sdpa"  # ... the record follows the model
