"""SpatialVLA extractor on its stand-in (tiny PaliGemma2 + SpatialVLA-style processor):
the real code path, each trap of docs/facts.md §3, pooling masks and batch invariance."""
from __future__ import annotations

import pytest
import torch

from harness.errors import HarnessError
from harness.extractors import spatialvla, standins
from harness.extractors.spatialvla import SpatialVLAExtractor, check_transformers_version
from harness.extractors.engine.pooling import masked_mean
from tests.random_samples import TASKS, random_samples

def samples(n=len(TASKS), seed=0):
    return random_samples(n, seed)


def extractor(attn=None, dtype="float32", **kw):
    model, processor = standins.tiny_spatialvla()
    if attn is not None:  # relabel: Gemma2 in transformers 5 refuses to build with sdpa
        standins._set_attn(model, attn)
    return SpatialVLAExtractor("tiny", dtype=dtype, model=model, processor=processor, **kw).load()


def pooled(ex, batch):
    h = ex.forward(ex.build_inputs(batch))
    return masked_mean(h.layers["last"], h.mask)


def test_shapes_and_left_padded_mask():
    ex = extractor()
    inputs = ex.build_inputs(samples())
    h = ex.forward(inputs)
    lengths = [standins.N_IMAGE_TOKENS + 1 + len(t) + 1 for t in TASKS]  # img, bos, task, \n
    assert h.layers["last"].shape == (4, max(lengths), standins.HIDDEN)
    assert h.mask.dtype == torch.bool
    assert h.mask.sum(1).tolist() == lengths
    assert h.mask[:, -1].all()  # left padding: every row ends with a real token
    assert not h.mask[1, 0]


def test_processor_gets_do_normalize_false_and_bridge_unnorm_key():
    ex = extractor()
    ex.build_inputs(samples(2))
    call = ex.processor.calls[-1]
    assert call["do_normalize"] is False
    assert call["unnorm_key"] == "bridge_orig/1.0.0"


def test_double_normalisation_would_change_features():
    """Why do_normalize=False matters: the model normalises pixels itself."""
    ex = extractor()
    batch = samples(2)
    inputs = ex.build_inputs(batch)
    wrong = ex.processor(images=[b[1] for b in batch], text=[b[2] for b in batch],
                         unnorm_key=ex.unnorm_key, do_normalize=True, return_tensors="pt")
    assert not torch.allclose(inputs["pixel_values"], wrong["pixel_values"])
    assert inputs["pixel_values"].min() >= 0  # un-normalised pixels live in [0, 1]


def test_intrinsic_reaches_the_model():
    ex = extractor()
    inputs = ex.build_inputs(samples(3))
    ex.forward(inputs)
    expected = torch.tensor(ex.processor.statistics["bridge_orig/1.0.0"]["intrinsic"])
    assert torch.equal(ex.model.last_intrinsic, expected.expand(3, 3, 3))


def test_forward_asks_for_hidden_states_without_cache(monkeypatch):
    ex = extractor()
    seen = {}
    original = ex.model.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(ex.model, "forward", spy)
    ex.forward(ex.build_inputs(samples(1)))
    assert seen["use_cache"] is False and seen["output_hidden_states"] is True


def test_last_layer_is_final_norm_output():
    ex = extractor()
    inputs = ex.build_inputs(samples(2))
    got = {}
    norm = standins.language_model(ex.model.paligemma).norm
    handle = norm.register_forward_hook(lambda m, i, o: got.setdefault("norm", o.detach().clone()))
    try:
        h = ex.forward(inputs)
    finally:
        handle.remove()
    assert "norm" in got
    torch.testing.assert_close(h.layers["last"], got["norm"], rtol=0, atol=0)


def test_eager_attention_recorded_and_enforced():
    assert extractor().provenance()["attn_implementation"] == "eager"
    for other in ("sdpa", "flash_attention_2"):
        with pytest.raises(HarnessError, match="eager"):
            extractor(attn=other)


def test_batch_invariance():
    ex = extractor()
    batch = samples()
    together = pooled(ex, batch)
    for i, sample in enumerate(batch):
        alone = pooled(ex, [sample])
        torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=1e-5)


def test_mask_positions_equal_model_default_for_one_sample():
    """Mask-derived positions change nothing for an unpadded row (the seed ran batch 1)."""
    a = pooled(extractor(positions="mask"), samples(1))
    b = pooled(extractor(positions="model"), samples(1))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_pad_content_never_reaches_features():
    ex = extractor()
    inputs = ex.build_inputs(samples(2))
    h1 = ex.forward(inputs)
    pads = ~inputs["attention_mask"].bool()
    assert pads.any()
    inputs["input_ids"] = inputs["input_ids"].masked_fill(pads, 7)
    h2 = ex.forward(inputs)
    torch.testing.assert_close(masked_mean(h1.layers["last"], h1.mask),
                               masked_mean(h2.layers["last"], h2.mask), atol=1e-6, rtol=0)


def test_layer_sweep_keys():
    h = extractor(layers=[0, -2]).forward(extractor().build_inputs(samples(1)))
    assert set(h.layers) == {"last", "0", "1"}  # 2 decoder layers: 3 hidden states


@pytest.mark.parametrize("version", ["4.47.0", "4.47.1", "4.48.3"])
def test_version_gate_accepts(version):
    assert check_transformers_version(version) == version


@pytest.mark.parametrize("version", ["4.46.3", "4.49.0", "4.53.3", "5.23.0"])
def test_version_gate_refuses_with_instructions(version):
    with pytest.raises(HarnessError) as err:
        check_transformers_version(version)
    assert ">=4.47.0,<4.49.0" in str(err.value) and version in str(err.value)


def test_real_load_refused_before_touching_weights(monkeypatch):
    import transformers
    monkeypatch.setattr(spatialvla, "installed_transformers", lambda: "5.23.0")

    def boom(*a, **k):
        raise AssertionError("from_pretrained called despite the version gate")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", boom)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", boom)
    with pytest.raises(HarnessError, match="4.47.0"):
        SpatialVLAExtractor(device="cpu").load()


def test_real_load_path_arguments(monkeypatch):
    """The real branch asks for remote code, eager attention and the requested dtype."""
    import transformers
    model, processor = standins.tiny_spatialvla()
    for p in model.parameters():  # as from_pretrained(torch_dtype=bf16) leaves it:
        p.data = p.data.to(torch.bfloat16)  # bf16 weights, float32 rotary buffers
    calls = {}

    def fake(kind, obj):
        def from_pretrained(ckpt, **kwargs):
            calls[kind] = (ckpt, kwargs)
            return obj
        return from_pretrained

    monkeypatch.setattr(spatialvla, "check_transformers_version", lambda: "4.48.3")
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fake("model", model))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", fake("processor", processor))
    ex = SpatialVLAExtractor(dtype="bfloat16", revision="abc").load()
    ckpt, kw = calls["model"]
    assert ckpt == "IPEC-COMMUNITY/spatialvla-4b-224-sft-bridge"
    assert kw["trust_remote_code"] is True and kw["attn_implementation"] == "eager"
    assert kw["torch_dtype"] == torch.bfloat16 and kw["revision"] == "abc"
    assert calls["processor"][1]["trust_remote_code"] is True
    assert next(ex.model.parameters()).dtype == torch.bfloat16
    rotary = {n: b.dtype for n, b in ex.model.named_buffers() if n.endswith("inv_freq")}
    assert rotary and set(rotary.values()) == {torch.float32}  # not cast after loading
    prov = ex.provenance()
    assert prov["attn_implementation"] == "eager" and prov["dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype,as_seed", [("float32", False), ("bfloat16", True)])
def test_the_record_names_only_the_dtype_that_ran(dtype, as_seed):
    """The record's dtype is the weights', and whether the run matches the seed's (bf16,
    eager) is read from the model, never stated as a constant."""
    prov = extractor(dtype=dtype).provenance()
    assert prov["dtype"] == dtype and prov["attn_implementation"] == "eager"
    assert prov["runs_as_the_seed_did"] is as_seed
    assert "bf16" not in prov["seed_path"] and "bfloat16" not in prov["seed_path"]
