"""The Pi0 extractor against the REAL LeRobot 0.4.x `PI0Policy` / `PI0Pytorch`, built tiny
with random weights (no checkpoint, no hub), through the extractor's LeRobot code path
(`--pi0_code lerobot`: the installed package's `PI0Policy.from_pretrained`,
`_preprocess_images`, `embed_prefix`, `_prepare_attention_masks_4d`,
`PaliGemmaWithExpertModel.forward(inputs_embeds=[prefix, None])`).

Needs lerobot 0.4.x, which cannot share the main venv (it pins torch < 2.11 and
transformers < 5): `.ci/run` builds a venv from `.ci/lerobot-0.4.txt` and runs this file
there with HARNESS_REQUIRE_LEROBOT=1, which turns the skip into a failure. The shims it
needs are in tests/lerobot04_shims.py (test code only; why each exists is written there).
"""
from __future__ import annotations

import pytest
import torch

from tests.lerobot04_shims import require_lerobot04, tiny_pi0_sizes

modeling_pi0 = require_lerobot04("lerobot.policies.pi0.modeling_pi0")

from harness.extractors import tiny  # noqa: E402
from harness.extractors.pi0_lerobot import Pi0LeRobotExtractor  # noqa: E402
from harness.extractors.engine.features import extract  # noqa: E402
from tests.random_samples import random_samples  # noqa: E402

CAMERAS = ("observation.images.image_0", "observation.images.wrist")  # wrist: never fed
RESOLUTION = 56  # 56 / 14 = 4 x 4 = 16 image tokens per camera
MAX_LENGTH = 32  # longer than every test prompt: every row has language padding


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random-weight tiny PI0Policy saved by LeRobot itself, plus a local tokenizer."""
    from lerobot.configs.types import FeatureType, PolicyFeature

    directory = tmp_path_factory.mktemp("lerobot04_pi0")
    with tiny_pi0_sizes():
        config = modeling_pi0.PI0Config(
            dtype="float32", device="cpu", image_resolution=(RESOLUTION, RESOLUTION),
            chunk_size=4, n_action_steps=4, max_state_dim=8, max_action_dim=8,
            tokenizer_max_length=MAX_LENGTH)
        config.input_features = {key: PolicyFeature(type=FeatureType.VISUAL,
                                                    shape=(3, RESOLUTION, RESOLUTION))
                                 for key in CAMERAS}
        torch.manual_seed(0)
        modeling_pi0.PI0Policy(config).save_pretrained(directory)
    tiny.tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def extractor(checkpoint):
    with tiny_pi0_sizes():  # from_pretrained rebuilds the model from config.json
        return Pi0LeRobotExtractor(str(checkpoint), code="lerobot").load()


def reference_prefix(policy, images01: torch.Tensor, tokens, masks):
    """The prefix forward written out from LeRobot 0.4.4's `sample_actions`, calling the
    policy's own methods: (post-final-norm prefix output, prefix pad mask)."""
    model = policy.model
    images, img_masks = policy._preprocess_images({CAMERAS[0]: images01})
    embs, pad_masks, att_masks = model.embed_prefix(images, img_masks, tokens, masks)
    att_2d = modeling_pi0.make_att_2d_masks(pad_masks, att_masks)
    positions = torch.cumsum(pad_masks, dim=1) - 1
    pwe = model.paligemma_with_expert
    pwe.paligemma.language_model.config._attn_implementation = "eager"  # as sample_actions
    with torch.inference_mode():
        (prefix_out, _), _ = pwe.forward(attention_mask=model._prepare_attention_masks_4d(att_2d),
                                         position_ids=positions, past_key_values=None,
                                         inputs_embeds=[embs, None], use_cache=False)
    return prefix_out, pad_masks


def test_the_extractor_runs_the_installed_lerobot(extractor):
    assert type(extractor.policy).__module__ == "lerobot.policies.pi0.modeling_pi0"
    assert extractor.api_source == "lerobot:lerobot.policies.pi0.modeling_pi0"
    assert extractor.api == "new"
    assert extractor.norm_path == "paligemma.model.language_model.norm"
    # LeRobot 0.4.4's own from_pretrained(strict=True) of its own save reports the tied
    # embed_tokens (saved once, as lm_head) missing and prints "Could not remap"; the
    # weights are still copied (load_state_dict copies before it raises). The audit is
    # what shows every weight came from the file, value for value (else load() raised).
    audit = extractor.audit
    assert audit["files"] == ["model.safetensors"] and audit["values_checked"]
    assert audit["keys_in_model"] - audit["keys_in_file"] == 1  # the tied embedding


def test_final_norm_features_equal_lerobots_prefix_output(extractor):
    # As built (and as the reference below leaves it otherwise): transformers' default
    # attention. sample_actions switches it to eager; the extractor must do the same.
    lm_config = extractor.policy.model.paligemma_with_expert.paligemma.language_model.config
    lm_config._attn_implementation = "sdpa"
    batch = random_samples(3)
    inputs = extractor.build_inputs(batch)
    hidden = extractor.forward(inputs)
    prefix_out, pad_masks = reference_prefix(extractor.policy, inputs["images"],
                                             inputs["lang_tokens"], inputs["lang_masks"])
    assert torch.equal(hidden.layers["last"], prefix_out)
    assert torch.equal(hidden.mask, pad_masks)
    assert extractor.provenance()["attn_implementation"] == "eager"
    n_image = 2 * (RESOLUTION // 14) ** 2
    assert not pad_masks[:, n_image // 2:n_image].any()  # the absent camera is masked out
    assert not pad_masks[:, n_image:].all()  # and so is language padding


def test_pooled_features_match_a_float64_masked_mean(extractor, tmp_path):
    batch = random_samples(3)
    extract(extractor, batch, tmp_path, batch_size=3, progress=False)
    feats = torch.load(tmp_path / "feats_A.pt", weights_only=True)
    inputs = extractor.build_inputs(batch)
    prefix_out, pad_masks = reference_prefix(extractor.policy, inputs["images"],
                                             inputs["lang_tokens"], inputs["lang_masks"])
    ref = torch.stack([prefix_out[i, pad_masks[i]].double().mean(0) for i in range(len(batch))])
    assert (feats.double() - ref).abs().max().item() < 1e-6


def test_padding_cannot_leak(extractor):
    inputs = extractor.build_inputs(random_samples(3))
    pad = ~inputs["lang_masks"]
    assert pad.any()
    other = dict(inputs, lang_tokens=torch.where(pad, torch.randint(5, 90, pad.shape),
                                                 inputs["lang_tokens"]))
    a, b = extractor.forward(inputs), extractor.forward(other)
    assert not torch.equal(a.layers["last"], b.layers["last"])  # the pad positions changed ...
    keep = a.mask.unsqueeze(-1)
    assert torch.equal(torch.where(keep, a.layers["last"], 0), torch.where(keep, b.layers["last"], 0))
