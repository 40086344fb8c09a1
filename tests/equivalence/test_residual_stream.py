"""Every layer of Pi0: the residual stream captured by pre-hooks on each layer's
input norm (plus the final norm's output) equals transformers' own `hidden_states`,
on models that return both; and Pi0's per-layer features are those hidden states."""
from __future__ import annotations

import pytest
import torch

from harness.errors import HarnessError
from harness.extractors import standins, tiny
from harness.extractors.pi0_lerobot import Pi0LeRobotExtractor
from harness.extractors.engine.hooks import HookError
from harness.extractors.engine.residual_stream import capture_residual_stream, layer_indices
from tests.fake_extractor import image_samples
from tests.random_samples import random_samples

DECODERS = {"gemma": "model", "gemma2": "model", "paligemma": None, "paligemma2": None}


def decoder_of(model, family):
    if family.startswith("paligemma"):
        return standins.language_model(model)
    return model.model


@pytest.mark.parametrize("family", [f for f in DECODERS if not tiny.unavailable(f)])
def test_hooks_equal_hidden_states_bit_for_bit(family):
    model, processor = tiny.build(family)
    samples = image_samples(3)
    kwargs = dict(text=[s[2] for s in samples], padding=True, return_tensors="pt")
    if processor.kind != "text":
        kwargs["images"] = [s[1] for s in samples]
    inputs = dict(processor(**kwargs))
    with torch.no_grad(), capture_residual_stream(decoder_of(model, family)) as stream:
        out = model(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)
    captured = stream.hidden_states()
    assert len(captured) == len(out.hidden_states) == tiny.LAYERS + 1
    for i, (mine, theirs) in enumerate(zip(captured, out.hidden_states)):
        assert torch.equal(mine, theirs), f"hidden_states[{i}] differs"
    # and the indices really are different points of the stream
    assert not torch.allclose(captured[0], captured[1])


def test_hooks_see_a_decoder_run_by_hand():
    """The old Pi0 API calls each layer's sub-modules itself (input norm first); the
    pre-hook must capture the residual entering each layer there too."""
    model, _ = tiny.build("gemma")
    decoder = model.model
    x = torch.randn(2, 5, tiny.HIDDEN)
    residuals = []
    with torch.no_grad(), capture_residual_stream(decoder) as stream:
        h = x
        for layer in decoder.layers:  # a toy hand loop: norm, MLP, residual
            residuals.append(h)
            h = h + layer.mlp(layer.input_layernorm(h))
        final = decoder.norm(h)
    captured = stream.hidden_states()
    for mine, want in zip(captured, residuals + [final]):
        assert torch.equal(mine, want)


def test_a_layer_norm_called_twice_is_an_error():
    model, _ = tiny.build("gemma")
    decoder = model.model
    x = torch.randn(1, 3, tiny.HIDDEN)
    with torch.no_grad(), capture_residual_stream(decoder) as stream:
        decoder.layers[0].input_layernorm(x)
        decoder.layers[0].input_layernorm(x)
    with pytest.raises(HookError, match="expected once each"):
        stream.hidden_states()


def test_layer_indices():
    assert layer_indices("last", 3) == []
    assert layer_indices("all", 3) == [0, 1, 2]
    assert layer_indices([0, -1], 3) == [0, 2]
    with pytest.raises(HarnessError, match="out of range"):
        layer_indices([3], 3)


@pytest.mark.parametrize("new_api", [False, True], ids=["old-api", "lerobot-0.6"])
def test_pi0_layers_equal_the_language_model_hidden_states(new_api, tmp_path):
    """Pi0's per-layer features (hooks) against hidden_states of the same prefix fed to
    its language model with output_hidden_states=True."""
    ckpt = standins.save_tiny_pi0_checkpoint(tmp_path, new_api=new_api)
    ex = Pi0LeRobotExtractor(str(ckpt), layers="all").load()
    inputs = ex.build_inputs(random_samples())
    hidden = ex.forward(inputs)
    assert sorted(hidden.layers) == ["0", "1", "2", "last"]
    # the reference: the same prefix through the decoder, asking for hidden_states
    policy = ex.policy
    model = policy.model
    prepare = getattr(policy, "prepare_images", None) or policy._preprocess_images
    images, img_masks = prepare({ex.image_key: inputs["images"]})
    embs, pad, att = model.embed_prefix(images, img_masks, inputs["lang_tokens"],
                                        inputs["lang_masks"])
    att_2d = standins.make_att_2d_masks(pad, att)
    mask = torch.where(att_2d[:, None], 0.0, torch.finfo(embs.dtype).min)
    lm = standins.language_model(model.paligemma_with_expert.paligemma)
    with torch.no_grad():
        ref = lm(inputs_embeds=embs, attention_mask=mask, position_ids=torch.cumsum(pad, 1) - 1,
                 use_cache=False, output_hidden_states=True).hidden_states
    for i in range(3):  # LeRobot 0.6's final norm returns (normed, gate)
        want = ref[i][0] if isinstance(ref[i], tuple) else ref[i]
        assert torch.equal(hidden.layers[str(i)], want), f"layer {i}"
    assert torch.equal(hidden.layers["last"], hidden.layers["2"])


def test_pi0_last_only_is_unchanged_by_the_sweep(tmp_path):
    ckpt = standins.save_tiny_pi0_checkpoint(tmp_path)
    samples = random_samples()
    last = Pi0LeRobotExtractor(str(ckpt)).load()
    swept = Pi0LeRobotExtractor(str(ckpt), layers="all").load()
    a = last.forward(last.build_inputs(samples))
    b = swept.forward(swept.build_inputs(samples))
    assert list(a.layers) == ["last"]
    assert torch.equal(a.layers["last"], b.layers["last"])
    assert "layers" not in last.describe()  # a plain run's shard identity is as before
