"""The pi05 and pi0_fast extractors against the REAL LeRobot 0.4.4 `PI05Policy` and
`PI0FastPolicy`, built tiny with random weights (no hub): features == the policy's own
prefix output, the prompt == the policy's processor's prompt (state_in_input) or the same
template without the state (default), the state-leakage rule, modality masks, the dtype
policy, and Pi0.5's --action_repr refusal on stock transformers.

Runs in the LeRobot venv (`.ci/run`, HARNESS_REQUIRE_LEROBOT=1); shims in
tests/lerobot04_shims.py (tiny sizes: item 3).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.lerobot04_shims import require_lerobot04, tiny_pi0_sizes

require_lerobot04("lerobot.policies.pi05.modeling_pi05")

from harness.errors import HarnessError  # noqa: E402
from harness.extractors import pi05 as pi05_family  # noqa: E402
from harness.extractors.pi0_fast import Pi0FastExtractor  # noqa: E402
from harness.extractors.pi05 import Pi05Extractor, release_dtype_policy  # noqa: E402
from harness.extractors.standins import char_tokenizer  # noqa: E402
from harness.extractors.engine.features import extract  # noqa: E402
from tests.random_samples import random_samples  # noqa: E402

IMAGE_KEY = "observation.images.image_0"
# Pi0.5 sizes SigLIP from image_resolution (56 / 14 -> 16 image tokens); Pi0-FAST does not
# (its SigLIP keeps 224 px, 256 tokens), so its resolution must be 224.
RESOLUTION = {"pi05": 56, "pi0_fast": 224}


def n_image(family):
    return (RESOLUTION[family] // 14) ** 2


MAX_LENGTH = 96  # holds "Task: <task>, State: <8 bins>;\nAction: "
FAMILIES = {
    "pi05": ("lerobot.policies.pi05", "PI05Config", "PI05Policy", Pi05Extractor),
    "pi0_fast": ("lerobot.policies.pi0_fast", "PI0FastConfig", "PI0FastPolicy", Pi0FastExtractor),
}


def modules(family):
    package = FAMILIES[family][0]
    name = package.rsplit(".", 1)[1]
    return (importlib.import_module(f"{package}.modeling_{name}"),
            importlib.import_module(f"{package}.configuration_{name}"),
            importlib.import_module(f"{package}.processor_{name}"))


def build_policy(family, tokenizer_dir, dtype="float32"):
    from lerobot.configs.types import FeatureType, PolicyFeature
    modeling, configuration, _ = modules(family)
    side = RESOLUTION[family]
    kw = dict(dtype=dtype, device="cpu", image_resolution=(side, side),
              chunk_size=4, n_action_steps=4, max_state_dim=8, max_action_dim=8,
              tokenizer_max_length=MAX_LENGTH)
    if family == "pi0_fast":  # local tokenizers instead of the hub's (the FAST action
        kw.update(text_tokenizer_name=str(tokenizer_dir),  # tokenizer is never used in a
                  action_tokenizer_name=str(tokenizer_dir))  # prefill)
    config = getattr(configuration, FAMILIES[family][1])(**kw)
    config.input_features = {
        IMAGE_KEY: PolicyFeature(type=FeatureType.VISUAL, shape=(3, side, side)),
        "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(8,))}
    config.output_features = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(7,))}
    with tiny_pi0_sizes(modeling):
        torch.manual_seed(0)
        return getattr(modeling, FAMILIES[family][2])(config)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A local tokenizer; its config.json lets Pi0-FAST's `AutoProcessor.from_pretrained`
    (the FAST action tokenizer, unused by a prefill) resolve it to the tokenizer too."""
    directory = tmp_path_factory.mktemp("tokenizer")
    char_tokenizer("right").save_pretrained(directory)
    (directory / "config.json").write_text('{"model_type": "gemma"}')
    return directory


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def checkpoint(family, tokenizer_dir, tmp_path_factory):
    """A random-weight tiny policy saved by LeRobot itself, with a tokenizer beside it."""
    directory = tmp_path_factory.mktemp(family)
    build_policy(family, tokenizer_dir).save_pretrained(directory)
    char_tokenizer("right").save_pretrained(directory)
    return directory


def load(family, path, **kw):
    modeling, _, _ = modules(family)
    with tiny_pi0_sizes(modeling):  # from_pretrained rebuilds the model from config.json
        return FAMILIES[family][3](str(path), **kw).load()


@pytest.fixture(scope="module")
def extractor(family, checkpoint):
    return load(family, checkpoint)


def states_for(n, seed):
    return torch.rand(n, 7, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def reference_prefix(family, policy, inputs):
    """The prefill written out from LeRobot 0.4.4's `sample_actions` (Pi0.5) /
    `sample_actions_fast` (Pi0-FAST; its tokens already carry the appended BOS)."""
    model = policy.model
    pwe = model.paligemma_with_expert
    images, img_masks = policy._preprocess_images({IMAGE_KEY: inputs["images"]})
    tokens, masks = inputs["lang_tokens"], inputs["lang_masks"]
    with torch.inference_mode():
        if family == "pi05":
            embs, pad, att = model.embed_prefix(images, img_masks, tokens, masks)
            modeling, _, _ = modules(family)
            att_4d = model._prepare_attention_masks_4d(modeling.make_att_2d_masks(pad, att))
            pwe.paligemma.language_model.config._attn_implementation = "eager"
            (out, _), _ = pwe.forward(attention_mask=att_4d, position_ids=torch.cumsum(pad, 1) - 1,
                                      past_key_values=None, inputs_embeds=[embs, None],
                                      use_cache=True)
        else:
            embs, pad, att_2d, _, _ = model.embed_prefix_fast(images, img_masks, tokens, masks)
            (out, _), _ = pwe.forward(
                attention_mask=model._prepare_attention_masks_4d(att_2d, dtype=embs.dtype),
                position_ids=torch.cumsum(pad, 1) - 1, past_key_values=None,
                inputs_embeds=[embs, None], use_cache=True, adarms_cond=[None, None])
    return out, pad


def test_the_extractor_runs_the_installed_lerobot(family, extractor):
    assert type(extractor.policy).__name__ == FAMILIES[family][2]
    assert extractor.api_source.startswith("lerobot:lerobot.policies.")
    assert extractor.norm_path == "paligemma.model.language_model.norm"
    assert extractor.audit["values_checked"]
    assert extractor.provenance()["state_in_input"] is False


def test_recorded_attention_is_what_lerobot_runs(family, extractor):
    """Pi0.5's sample_actions switches the prefix to eager; Pi0-FAST's sample_actions_fast
    keeps what PaliGemmaForConditionalGeneration(config) chose (sdpa): the extractor must
    not change it, and records what the language model's config holds."""
    from harness.extractors.pi0_lerobot import lm_config
    ran = lm_config(extractor.policy.model.paligemma_with_expert)._attn_implementation
    assert ran == ("eager" if family == "pi05" else "sdpa")
    assert extractor.provenance()["attn_implementation"] == ran


def test_features_equal_lerobots_prefix_output(family, extractor):
    batch = random_samples(3)
    inputs = extractor.build_inputs(batch)
    hidden = extractor.forward(inputs)
    prefix_out, pad = reference_prefix(family, extractor.policy, inputs)
    assert torch.equal(hidden.layers["last"], prefix_out)
    assert torch.equal(hidden.mask, pad)
    assert not pad[:, n_image(family):].all()  # prompt padding is masked out
    if family == "pi0_fast":  # BOS after the padding, valid
        assert (inputs["lang_tokens"][:, -1] == extractor.tokenizer.bos_token_id).all()
        assert pad[:, -1].all()


def test_prompt_is_the_policy_processors_prompt(family, extractor):
    """With state_in_input the prompt is byte-equal to what LeRobot's own processor step
    writes; by default it is that template without the state field."""
    from lerobot.processor.core import TransitionKey
    _, _, processor = modules(family)
    step_cls = next(getattr(processor, n) for n in dir(processor)
                    if n.endswith("ProcessorStep") and "Prepare" in n)
    tasks = ["put_the spoon\n", "x"]
    states = states_for(2, 0)
    theirs = step_cls(max_state_dim=8)({
        TransitionKey.OBSERVATION: {"observation.state": states},
        TransitionKey.COMPLEMENTARY_DATA: {"task": tasks}})[TransitionKey.COMPLEMENTARY_DATA]["task"]
    extractor.set_states(states, [0, 1])
    extractor.with_state = True
    try:
        assert extractor.prompts(tasks, [0, 1]) == theirs
    finally:
        extractor.with_state = False
    blind = extractor.prompts(tasks, [0, 1])
    assert all("State" not in p for p in blind)
    assert blind[0] == theirs[0][: theirs[0].index(", State:")] + theirs[0][theirs[0].index(";"):]


def _feats(ex, batch, states, out_dir):
    ex.set_states(states, [s[0] for s in batch])
    extract(ex, batch, out_dir, batch_size=2, progress=False)
    return torch.load(out_dir / "feats_A.pt", weights_only=True)


def test_state_leakage(family, checkpoint, tmp_path):
    batch = random_samples(4)
    blind = load(family, checkpoint)
    assert torch.equal(_feats(blind, batch, states_for(4, 0), tmp_path / "a"),
                       _feats(blind, batch, states_for(4, 1), tmp_path / "b"))
    seeing = load(family, checkpoint, state_in_input=True)
    c = _feats(seeing, batch, states_for(4, 0), tmp_path / "c")
    assert not torch.equal(c, _feats(seeing, batch, states_for(4, 1), tmp_path / "d"))
    assert seeing.provenance()["state_in_input"] is True


def test_modality_masks_select_the_image_block_and_the_task(family, extractor):
    batch = random_samples(2)  # "put the spoon on the towel", "x"
    inputs = extractor.build_inputs(batch)
    hidden = extractor.forward(inputs)
    masks = extractor.modality_masks(inputs, [s[2] for s in batch], hidden)
    assert masks.image[:, :n_image(family)].all() and not masks.image[:, n_image(family):].any()
    for row, (_, _, task) in enumerate(batch):
        assert masks.text_fallback[row] is None
        picked = inputs["lang_tokens"][row][masks.text[row, n_image(family):]]
        assert picked.tolist() == extractor.tokenizer.encode(task, add_special_tokens=False)


def test_dtype_policy_matches_lerobots_bfloat16_build(family, tokenizer_dir):
    """`release_dtype_policy` on a float32-built policy whose config says bfloat16 gives
    every parameter the dtype LeRobot's own bfloat16 build has."""
    want = {n: p.dtype for n, p in build_policy(family, tokenizer_dir, "bfloat16").named_parameters()}
    built = build_policy(family, tokenizer_dir, "float32")
    built.config.dtype = "bfloat16"
    release_dtype_policy(built)
    assert {n: p.dtype for n, p in built.named_parameters()} == want
    assert torch.bfloat16 in set(want.values()) and torch.float32 in set(want.values())


def test_features_equal_the_prefix_output_in_bfloat16(family, tokenizer_dir):
    """Under the bfloat16 policy the prefill is CUDA-only in LeRobot 0.4.4 itself: SigLIP's
    float32 patch embeddings feed a bfloat16 LayerNorm, which CPU layer_norm refuses. On
    CPU both LeRobot's own prefix and the extractor fail that way; on CUDA they are equal."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = build_policy(family, tokenizer_dir, "bfloat16").to(device)
    modeling, _, _ = modules(family)
    ex = FAMILIES[family][3]("built", policy=policy, tokenizer=char_tokenizer("right"),
                             dtype=None, device=device,
                             make_att_2d_masks=getattr(modeling, "make_att_2d_masks", None)).load()
    assert ex.provenance()["parameter_dtypes"]["language_model_norm"] == ["float32"]
    inputs = ex.build_inputs(random_samples(2))
    if device == "cpu":
        for run in (lambda: reference_prefix(family, policy, inputs), lambda: ex.forward(inputs)):
            with pytest.raises(RuntimeError, match="mixed dtype"):
                run()
        return
    prefix_out, _ = reference_prefix(family, policy, inputs)
    assert torch.equal(ex.forward(inputs).layers["last"], prefix_out)


def test_pi05_refuses_action_repr_on_stock_transformers(tmp_path):
    ex = Pi05Extractor.__new__(Pi05Extractor)
    ex.family = "pi05"
    why = pi05_family.stock_transformers_refusal("pi05")
    assert why is not None and "transformers fork" in why and "\n" not in why
    with pytest.raises(HarnessError, match="transformers fork"):
        ex.action_provenance()


@pytest.mark.parametrize("mode", ["MEAN_STD", "QUANTILES", "MIN_MAX"])
def test_state_normaliser_read_from_a_saved_preprocessor_equals_lerobots(mode, tmp_path):
    """--state_in_input normalises as the checkpoint's saved pre-processor does: the
    statistics and mode read from policy_preprocessor.json give LeRobot's own values."""
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.processor import NormalizerProcessorStep, PolicyProcessorPipeline
    from lerobot.processor.core import TransitionKey

    from harness.extractors.lerobot_state import StateInput
    g = torch.Generator().manual_seed(3)
    stats = {"observation.state": {"mean": torch.randn(7, generator=g),
                                   "std": torch.rand(7, generator=g) + 0.1,
                                   "q01": -torch.rand(7, generator=g) - 1,
                                   "q99": torch.rand(7, generator=g) + 1,
                                   "min": -torch.rand(7, generator=g) - 2,
                                   "max": torch.rand(7, generator=g) + 2}}
    step = NormalizerProcessorStep(
        features={"observation.state": PolicyFeature(type=FeatureType.STATE, shape=(7,))},
        norm_map={FeatureType.STATE: NormalizationMode(mode)}, stats=stats)
    PolicyProcessorPipeline(steps=[step], name="policy_preprocessor").save_pretrained(tmp_path)
    states = torch.randn(3, 7, generator=g) * 2
    theirs = step({TransitionKey.OBSERVATION: {"observation.state": states.clone()}})
    want = theirs[TransitionKey.OBSERVATION]["observation.state"]
    ours = StateInput()
    ours.use_checkpoint_normaliser(tmp_path)
    ours.set_states(states, [5, 6, 7])
    got = ours.rows([5, 6, 7], 8)
    assert torch.allclose(got[:, :7], want, atol=1e-6) and not got[:, 7].any()
    assert mode in ours.describe()
    assert torch.equal(ours.rows([5, 6, 7], 8, normalise=False)[:, :7], states)
