"""The smolvla extractor against the REAL LeRobot 0.4.4 `SmolVLAPolicy`, built tiny with
random weights from a local SmolVLM config + tokenizer (no hub): features == the policy's
own prefix output, the state token kept out by default (leakage test), modality masks,
the action expert's norm, and the release's dtype policy.

Runs in the LeRobot venv (`.ci/run`, HARNESS_REQUIRE_LEROBOT=1); shims in
tests/lerobot04_shims.py (the SmolVLM processor is replaced by its tokenizer: item 4).
"""
from __future__ import annotations

import pytest
import torch

from tests.lerobot04_shims import require_lerobot04, smolvlm_tokenizer_only_processor

modeling = require_lerobot04("lerobot.policies.smolvla.modeling_smolvla")

from harness.extractors import tiny  # noqa: E402
from harness.extractors.smolvla import SmolVLAExtractor, release_dtype_policy  # noqa: E402
from harness.extractors.engine.features import extract  # noqa: E402
from tests.random_samples import random_samples  # noqa: E402

IMAGE_KEY = "observation.images.image_0"
VLM_LAYERS, CUT = 4, 2  # the VLM config has 4 layers; the policy keeps 2
IMAGE, PATCH, SCALE = 32, 8, 2  # (32/8)^2 = 16 patches -> 4 image tokens after the shuffle
N_IMAGE = (IMAGE // PATCH) ** 2 // SCALE ** 2
MAX_LENGTH = 32  # longer than every test prompt: every row is padded


def smolvlm_dir(directory, save_weights: bool):
    """A tiny SmolVLM: config, tokenizer with SmolVLM's extra special tokens, and (for
    load_vlm_weights=True) random weights."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    tok = tiny.tokenizer("right")
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>",
                                                          "<global-img>", "<image>"]})
    tok.extra_special_tokens = {"fake_image_token": "<fake_token_around_image>",
                                "global_image_token": "<global-img>", "image_token": "<image>"}
    tok.save_pretrained(directory)
    config = SmolVLMConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=VLM_LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=IMAGE, patch_size=PATCH),
        scale_factor=SCALE, image_token_id=tok.convert_tokens_to_ids("<image>"))
    config.save_pretrained(directory)
    if save_weights:
        torch.manual_seed(1)
        SmolVLMForConditionalGeneration(config).save_pretrained(directory)
    return directory


def policy_config(vlm_dir, load_vlm_weights: bool):
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig

    config = SmolVLAConfig(
        vlm_model_name=str(vlm_dir), load_vlm_weights=load_vlm_weights, num_vlm_layers=CUT,
        resize_imgs_with_padding=(IMAGE, IMAGE), chunk_size=4, n_action_steps=4,
        max_state_dim=8, max_action_dim=8, num_steps=3, device="cpu",
        tokenizer_max_length=MAX_LENGTH, pad_language_to="max_length", prefix_length=0)
    config.input_features = {
        IMAGE_KEY: PolicyFeature(type=FeatureType.VISUAL, shape=(3, IMAGE, IMAGE)),
        "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(7,))}
    config.output_features = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(7,))}
    return config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random-weight tiny SmolVLAPolicy saved by LeRobot itself (float32 throughout)."""
    vlm_dir = smolvlm_dir(tmp_path_factory.mktemp("smolvlm"), save_weights=False)
    directory = tmp_path_factory.mktemp("smolvla")
    with smolvlm_tokenizer_only_processor():
        torch.manual_seed(0)
        modeling.SmolVLAPolicy(policy_config(vlm_dir, False)).save_pretrained(directory)
    return directory


def load(path, **kw):
    with smolvlm_tokenizer_only_processor():
        return SmolVLAExtractor(str(path), **kw).load()


@pytest.fixture(scope="module")
def extractor(checkpoint):
    return load(checkpoint)


def states_for(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 7, generator=torch.Generator().manual_seed(seed))


def reference_prefix(policy, images01, tokens, masks, state):
    """LeRobot 0.4.4 `sample_actions`' prefix forward, with the policy's own methods."""
    model = policy.model
    images, img_masks = policy.prepare_images({IMAGE_KEY: images01})
    state = policy.prepare_state({"observation.state": state})
    embs, pad_masks, att_masks = model.embed_prefix(images, img_masks, tokens, masks, state=state)
    with torch.inference_mode():
        (prefix_out, _), _ = model.vlm_with_expert.forward(
            attention_mask=modeling.make_att_2d_masks(pad_masks, att_masks),
            position_ids=torch.cumsum(pad_masks, dim=1) - 1, past_key_values=None,
            inputs_embeds=[embs, None], use_cache=policy.config.use_cache, fill_kv_cache=True)
    return prefix_out, pad_masks


def test_the_extractor_runs_the_installed_lerobot_with_the_cut_language_model(extractor):
    assert type(extractor.policy).__module__ == modeling.__name__
    record = extractor.provenance()
    assert record["language_layers_run"] == CUT  # cut from VLM_LAYERS
    assert extractor.policy.model.vlm_with_expert.vlm.config.text_config.num_hidden_layers == VLM_LAYERS
    assert extractor.audit["values_checked"]
    assert record["state_in_input"] is False


def test_recorded_attention_is_what_the_modules_run(extractor):
    """The cut language model runs LeRobot's own eager attention; SigLIP runs what its
    config says. The record names both when they differ."""
    vwe = extractor.policy.model.vlm_with_expert
    assert vwe.get_attention_interface().__name__ == "eager_attention_forward"
    vision = vwe.vlm.model.vision_model.config._attn_implementation
    want = "eager" if vision == "eager" else f"language eager, vision {vision}"
    assert extractor.provenance()["attn_implementation"] == want


def test_release_dtype_policy_is_the_declared_one():
    """The SPEC's policy (what the contract suite loads the stand-in under) is the
    loader's rule at the release's 16 expert layers, cross-attention in every odd one."""
    from harness.extractors.smolvla import DTYPE_POLICY, dtype_policy, cross_attention_layers
    release = modeling.SmolVLAConfig()
    layers = cross_attention_layers(release, release.num_vlm_layers)
    assert layers == list(range(1, 16, 2))
    assert dtype_policy(layers) == DTYPE_POLICY


def test_features_equal_lerobots_prefix_output_and_skip_the_state_token(extractor):
    batch = random_samples(3)
    extractor.set_states(states_for(3, 0), [s[0] for s in batch])
    inputs = extractor.build_inputs(batch)
    hidden = extractor.forward(inputs)
    prefix_out, pad_masks = reference_prefix(extractor.policy, inputs["images"],
                                             inputs["lang_tokens"], inputs["lang_masks"],
                                             states_for(3, 0))
    assert torch.equal(hidden.layers["last"], prefix_out)
    state_pos = N_IMAGE + MAX_LENGTH  # image block, language (padded to max), then the state
    assert prefix_out.shape[1] == state_pos + 1
    expected = pad_masks.clone()
    expected[:, state_pos] = False
    assert torch.equal(hidden.mask, expected)
    assert pad_masks[:, state_pos].all() and not pad_masks[:, N_IMAGE:state_pos].all()


def test_features_equal_the_prefix_inside_sample_actions(extractor):
    """The VLM's final norm fires once in `sample_actions` (the prefill; the denoising
    steps run the expert only): that output is what the extractor returns."""
    from harness.extractors.engine.hooks import capture
    batch = random_samples(2)
    inputs = extractor.build_inputs(batch)
    ours = extractor.forward(inputs).layers["last"]
    policy = extractor.policy
    images, img_masks = policy.prepare_images({IMAGE_KEY: inputs["images"]})
    with torch.inference_mode(), capture(policy.model.vlm_with_expert,
                                         ["vlm.model.text_model.norm"]) as hooked:
        policy.model.sample_actions(images, img_masks, inputs["lang_tokens"], inputs["lang_masks"],
                                    policy.prepare_state({"observation.state": inputs["state"]}))
    assert hooked.calls == 1
    assert torch.equal(hooked.output, ours)


def _feats(extractor, batch, states, out_dir):
    extractor.set_states(states, [s[0] for s in batch])
    extract(extractor, batch, out_dir, batch_size=2, progress=False)
    return torch.load(out_dir / "feats_A.pt", weights_only=True)


def test_state_leakage(checkpoint, tmp_path):
    batch = random_samples(4)
    blind = load(checkpoint)
    a = _feats(blind, batch, states_for(4, 0), tmp_path / "a")
    b = _feats(blind, batch, states_for(4, 1), tmp_path / "b")
    assert torch.equal(a, b)  # the state entered the prefix, yet no pooled token saw it
    seeing = load(checkpoint, state_in_input=True)
    c = _feats(seeing, batch, states_for(4, 0), tmp_path / "c")
    d = _feats(seeing, batch, states_for(4, 1), tmp_path / "d")
    assert not torch.equal(c, d)
    assert seeing.provenance()["state_in_input"] is True


def test_modality_masks_select_the_image_block_and_the_task(extractor):
    batch = random_samples(3)
    inputs = extractor.build_inputs(batch)
    hidden = extractor.forward(inputs)
    masks = extractor.modality_masks(inputs, [s[2] for s in batch], hidden)
    assert masks.image[:, :N_IMAGE].all() and not masks.image[:, N_IMAGE:].any()
    for row, (_, _, task) in enumerate(batch):
        assert not masks.text[row, :N_IMAGE].any() and not masks.text[row, -1]  # nor the state
        picked = inputs["lang_tokens"][row][masks.text[row, N_IMAGE:N_IMAGE + MAX_LENGTH]]
        if task:  # the task's tokens exactly: not its "\n", padding or the state
            assert masks.text_fallback[row] is None
            assert picked.tolist() == tiny.tokenizer().encode(task, add_special_tokens=False)
        else:  # an empty task falls back to the prompt's valid tokens (its "\n"), said so
            assert masks.text_fallback[row] is not None and picked.tolist() == \
                tiny.tokenizer().encode("\n", add_special_tokens=False)


def test_action_features_read_the_expert_norm_at_the_last_step(extractor):
    batch = random_samples(3)
    inputs = extractor.build_inputs(batch)
    feats = extractor.action_features(inputs)
    assert feats.shape == (3, extractor.policy.model.vlm_with_expert.expert_hidden_size)
    alone = extractor.action_features(extractor.build_inputs(batch[1:2]))
    assert torch.allclose(alone[0], feats[1], atol=1e-5)  # noise seeded per sample


def test_release_dtype_policy_matches_lerobots_loader(tmp_path):
    """With load_vlm_weights=True LeRobot loads the VLM in bfloat16, the rest float32;
    `release_dtype_policy` on a float32-built policy gives every parameter that dtype."""
    vlm_dir = smolvlm_dir(tmp_path / "vlm", save_weights=True)
    with smolvlm_tokenizer_only_processor():
        torch.manual_seed(0)
        loaded = modeling.SmolVLAPolicy(policy_config(vlm_dir, True))
        built = modeling.SmolVLAPolicy(policy_config(vlm_dir, False))
    built.config.load_vlm_weights = True
    release_dtype_policy(built)
    want = {n: p.dtype for n, p in loaded.named_parameters()}
    assert {n: p.dtype for n, p in built.named_parameters()} == want
    assert want["model.vlm_with_expert.vlm.model.text_model.norm.weight"] == torch.bfloat16
    assert want["model.state_proj.weight"] == torch.float32


def test_features_equal_the_prefix_output_under_the_release_dtypes(tmp_path):
    """A policy handed to the extractor with dtype None gets the release's dtypes, and
    the bfloat16 prefix still equals LeRobot's own prefix output."""
    vlm_dir = smolvlm_dir(tmp_path / "vlm", save_weights=False)
    with smolvlm_tokenizer_only_processor():
        torch.manual_seed(0)
        policy = modeling.SmolVLAPolicy(policy_config(vlm_dir, False))
    policy.config.load_vlm_weights = True
    tokenizer = policy.model.vlm_with_expert.processor.tokenizer
    ex = SmolVLAExtractor("built", policy=policy, tokenizer=tokenizer, dtype=None,
                          make_att_2d_masks=modeling.make_att_2d_masks).load()
    batch = random_samples(3)
    inputs = ex.build_inputs(batch)
    hidden = ex.forward(inputs)
    prefix_out, _ = reference_prefix(policy, inputs["images"], inputs["lang_tokens"],
                                     inputs["lang_masks"], inputs["state"])
    assert hidden.layers["last"].dtype == torch.bfloat16
    assert torch.equal(hidden.layers["last"], prefix_out)
    assert ex.provenance()["parameter_dtypes"]["state_proj"] == ["float32"]


def test_layer_sweep_reads_the_cut_language_model(checkpoint):
    ex = load(checkpoint, layers="all")
    hidden = ex.forward(ex.build_inputs(random_samples(2)))
    assert sorted(hidden.layers, key=str) == sorted(["last", *map(str, range(CUT + 1))], key=str)
    assert torch.equal(hidden.layers[str(CUT)], hidden.layers["last"])
    assert not torch.equal(hidden.layers["0"], hidden.layers["1"])
