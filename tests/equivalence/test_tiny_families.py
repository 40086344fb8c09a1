"""Every family, tiny random weights, fp32 CPU: the extraction point and pooling are sound.

- the final-norm hook fires and equals `hidden_states[-1]` (in transformers 5 they are
  one object, so values *and* firing are checked, never identity);
- hooks change no output;
- a sample's pooled feature is the same alone and in a padded batch (both sides);
- the content of pad positions changes no pooled feature.
"""
from __future__ import annotations

import pytest
import torch

from harness.extractors import tiny
from harness.extractors.hf_vlm import HfVlmExtractor
from harness.extractors.engine.registry import final_norm_paths
from harness.extractors.engine.hooks import capture

FINAL_NORM_PATHS = final_norm_paths()
from harness.extractors.engine.pooling import masked_mean
from tests.fake_extractor import image_samples

ATOL = 1e-5


def family_param(family):
    reason = tiny.unavailable(family)
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(family, marks=marks, id=family)


FAMILIES = [family_param(f) for f in tiny.FAMILIES]


def loaded(family, side="right", **kw):
    return HfVlmExtractor(f"tiny:{family}", padding_side=side, **kw).load()


def pooled(extractor, samples):
    hidden = extractor.forward(extractor.build_inputs(samples))
    return masked_mean(hidden.layers["last"], hidden.mask)


def run_model(extractor, inputs):
    with torch.no_grad():
        return extractor.model(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_final_norm_hook_fires_and_equals_last_hidden_state(family):
    ex = loaded(family)
    inputs = ex.build_inputs(image_samples(3))
    with capture(ex.model, FINAL_NORM_PATHS[family]) as hooked:
        out = run_model(ex, inputs)
    assert hooked.calls == 1
    last = out.hidden_states[-1]
    assert hooked.output.shape == last.shape
    torch.testing.assert_close(hooked.output, last, rtol=0, atol=0)
    # and it is not some other layer: the pre-norm state differs
    assert not torch.allclose(out.hidden_states[-2], last, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_leave_outputs_unchanged(family):
    ex = loaded(family)
    inputs = ex.build_inputs(image_samples(3))
    plain = run_model(ex, inputs)
    with capture(ex.model, FINAL_NORM_PATHS[family]):
        hooked = run_model(ex, inputs)
    assert torch.equal(plain.logits, hooked.logits)
    for a, b in zip(plain.hidden_states, hooked.hidden_states):
        assert torch.equal(a, b)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pooled_feature_same_alone_and_in_padded_batch(family, side):
    ex = loaded(family, side)
    samples = image_samples(6)  # task lengths 1..6 words: the short ones get padded
    batch_inputs = ex.build_inputs(samples)
    assert not batch_inputs["attention_mask"][0].all(), "sample 0 should be padded in the batch"
    hidden = ex.forward(batch_inputs)
    batched = masked_mean(hidden.layers["last"], hidden.mask)
    alone = torch.cat([pooled(ex, [s]) for s in samples])
    torch.testing.assert_close(batched, alone, rtol=0, atol=ATOL)
    # teeth: averaging the padded row without its mask would not pass
    assert not torch.allclose(hidden.layers["last"][0].mean(0), alone[0], atol=100 * ATOL)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pad_content_changes_no_pooled_feature(family, side):
    ex = loaded(family, side)
    inputs = ex.build_inputs(image_samples(5))
    pads = inputs["attention_mask"] == 0
    assert pads.any()
    before = ex.forward(inputs)
    changed = dict(inputs, input_ids=torch.where(pads, 600 + torch.arange(pads.shape[1]),
                                                 inputs["input_ids"]))
    after = ex.forward(changed)
    torch.testing.assert_close(masked_mean(after.layers["last"], after.mask),
                               masked_mean(before.layers["last"], before.mask), rtol=0, atol=ATOL)
    # the pad positions themselves did change, so the check above had something to resist
    assert not torch.allclose(after.layers["last"][pads], before.layers["last"][pads])


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_sweep_returns_every_hidden_state(family):
    ex = loaded(family, layers="all")
    hidden = ex.forward(ex.build_inputs(image_samples(2)))
    assert sorted(hidden.layers) == ["0", "1", "2", "last"]  # embeddings + 2 layers
    assert torch.equal(hidden.layers["2"], hidden.layers["last"])
    assert not torch.equal(hidden.layers["1"], hidden.layers["last"])


@pytest.mark.parametrize("family", [family_param(f) for f in ("paligemma", "qwen2_5_vl")])
def test_image_and_text_token_pooling_partition_the_prompt(family):
    samples = image_samples(3)
    full = loaded(family, "left")
    inputs = full.build_inputs(samples)
    is_image = (inputs["input_ids"] == tiny.IMAGE_TOKEN) & inputs["attention_mask"].bool()
    n_image = is_image.sum(1, keepdim=True).float()
    n_all = inputs["attention_mask"].sum(1, keepdim=True).float()
    image = pooled(loaded(family, "left", tokens="image"), samples)
    text = pooled(loaded(family, "left", tokens="text"), samples)
    everything = pooled(full, samples)
    # the two partial means, weighted by their token counts, rebuild the full mean
    torch.testing.assert_close((image * n_image + text * (n_all - n_image)) / n_all, everything,
                               rtol=0, atol=ATOL)
    assert n_image.min() == full.processor.n_image_tokens
    assert not torch.allclose(image, text, atol=1e-3)


def test_unknown_family_and_bad_layers_are_clear_errors():
    from harness.errors import HarnessError
    with pytest.raises(HarnessError, match="unknown tiny family 'llama'"):
        HfVlmExtractor("tiny:llama").load()
    with pytest.raises(HarnessError, match="layers must be"):
        HfVlmExtractor("tiny:gemma", layers="middle")
    ex = HfVlmExtractor("tiny:gemma", layers=[7]).load()
    with pytest.raises(HarnessError, match="layer 7 out of range: the model has 3 hidden states"):
        ex.forward(ex.build_inputs(image_samples(1)))
