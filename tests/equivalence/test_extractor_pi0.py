"""Pi0-LeRobot extractor through its real loader (a fake local checkpoint directory with
config, safetensors, tokenizer and a bundled `modeling_pi0.py`), old and 0.6 APIs."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.errors import HarnessError
from harness.extractors import standins
from harness.extractors.pi0_lerobot import Pi0LeRobotExtractor
from harness.extractors.engine.pooling import masked_mean
from tests.random_samples import TASKS, random_samples

def samples(n=len(TASKS), seed=0):
    return random_samples(n, seed)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return standins.save_tiny_pi0_checkpoint(tmp_path_factory.mktemp("pi0_old"))


@pytest.fixture(scope="module")
def ckpt_new(tmp_path_factory):
    return standins.save_tiny_pi0_checkpoint(tmp_path_factory.mktemp("pi0_new"), new_api=True)


def pooled(ex, batch):
    h = ex.forward(ex.build_inputs(batch))
    return masked_mean(h.layers["last"], h.mask)


def edited_checkpoint(src, dst, edit):
    """Copy a checkpoint directory, passing its tensors through `edit(dict) -> dict`."""
    import shutil
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    save_file(edit(tensors), str(dst / "model.safetensors"))
    return dst


def test_shapes_and_prefix_mask(ckpt):
    ex = Pi0LeRobotExtractor(str(ckpt)).load()
    h = ex.forward(ex.build_inputs(samples()))
    width = max(ex.max_length, 1 + len(TASKS[0]) + 1)  # bos + bytes + "\n", never truncated
    assert h.layers["last"].shape == (4, standins.N_IMAGE_TOKENS + width, standins.HIDDEN)
    assert h.mask[:, : standins.N_IMAGE_TOKENS].all()  # image tokens always count
    lang = h.mask[:, standins.N_IMAGE_TOKENS:]
    assert lang.sum(1).tolist() == [1 + len(t) + 1 for t in TASKS]
    assert lang[:, 0].all()  # right padding: language starts right after the image


def test_tokens_match_prepare_language_and_end_with_newline(ckpt):
    ex = Pi0LeRobotExtractor(str(ckpt)).load()
    short = ["x", "", "open the drawer"]
    ids, mask = ex.tokenize(short)
    ref_ids, ref_mask = ex.policy.prepare_language({"task": short})
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    newline = ex.tokenizer.encode("\n", add_special_tokens=False)
    assert len(newline) == 1
    last = mask.sum(1) - 1
    assert (ids[torch.arange(3), last] == newline[0]).all()


def test_seed_tokenisation_drops_newline_and_changes_features(ckpt):
    default = Pi0LeRobotExtractor(str(ckpt)).load()
    seed = Pi0LeRobotExtractor(str(ckpt), seed_tokenization=True).load()
    ids_d, mask_d = default.tokenize(["open the drawer"])
    ids_s, mask_s = seed.tokenize(["open the drawer"])
    assert int(mask_d.sum()) == int(mask_s.sum()) + 1
    newline = default.tokenizer.encode("\n", add_special_tokens=False)[0]
    assert newline not in ids_s[mask_s].tolist()
    assert not torch.allclose(pooled(default, samples(1)), pooled(seed, samples(1)), atol=1e-4)
    assert "seed" in seed.provenance()["tokenization"]


def test_batch_invariance(ckpt):
    ex = Pi0LeRobotExtractor(str(ckpt)).load()
    batch = samples()
    together = pooled(ex, batch)
    for i, sample in enumerate(batch):
        torch.testing.assert_close(together[i], pooled(ex, [sample])[0], atol=1e-5, rtol=1e-5)


def test_pad_tokens_do_not_reach_features(ckpt):
    ex = Pi0LeRobotExtractor(str(ckpt)).load()
    inputs = ex.build_inputs(samples(2))
    a = ex.forward(inputs)
    pads = ~inputs["lang_masks"]
    assert pads.any()
    inputs["lang_tokens"] = inputs["lang_tokens"].masked_fill(pads, 77)
    b = ex.forward(inputs)
    torch.testing.assert_close(masked_mean(a.layers["last"], a.mask),
                               masked_mean(b.layers["last"], b.mask), atol=1e-6, rtol=0)


def test_prefill_only_no_select_action_no_state(ckpt):
    ex = Pi0LeRobotExtractor(str(ckpt)).load()
    ex.forward(ex.build_inputs(samples(2)))
    assert ex.policy.select_action_calls == 0
    assert ex.policy.seen_batch_keys == [{standins.PI0_IMAGE_KEY}]  # no (dummy) state
    assert ex.provenance()["state_input"] == "none"


def test_hook_must_equal_prefix_out(ckpt, monkeypatch):
    ex = Pi0LeRobotExtractor(str(ckpt)).load()
    pwe = ex.policy.model.paligemma_with_expert
    original = pwe.forward

    def shifted(**kwargs):  # a forward whose returned prefix is not the norm output
        (prefix, suffix), cache = original(**kwargs)
        return [prefix + 1e-3, suffix], cache

    monkeypatch.setattr(pwe, "forward", shifted)
    with pytest.raises(HarnessError, match="prefix_out"):
        ex.forward(ex.build_inputs(samples(1)))


def test_missing_weight_key_stops_the_run(ckpt, tmp_path):
    key = next(k for k in load_file(str(ckpt / "model.safetensors"))  # layout differs by release
               if "paligemma." in k and k.endswith("layers.0.self_attn.q_proj.weight"))
    bad = edited_checkpoint(ckpt, tmp_path / "ck", lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(HarnessError, match="1 missing") as err:
        Pi0LeRobotExtractor(str(bad)).load()
    assert key in str(err.value)
    ex = Pi0LeRobotExtractor(str(bad), allow_missing=["*layers.0.self_attn.q_proj.weight"]).load()
    assert ex.audit["allowed_missing"] == ["*layers.0.self_attn.q_proj.weight"]


def test_unexpected_weight_key_stops_the_run(ckpt, tmp_path):
    extra = "model.paligemma_with_expert.paligemma.renamed_layout.norm.weight"
    bad = edited_checkpoint(ckpt, tmp_path / "ck", lambda t: {**t, extra: torch.ones(standins.HIDDEN)})
    with pytest.raises(HarnessError, match="1 unexpected"):
        Pi0LeRobotExtractor(str(bad)).load()
    Pi0LeRobotExtractor(str(bad), allow_unexpected=["*.renamed_layout.*"]).load()


def test_weights_not_actually_loaded_stop_the_run(ckpt, monkeypatch):
    """Keys can match while the loader skipped the values (e.g. a renaming loader)."""
    def no_load(cls, directory, **kwargs):
        return cls(standins.TinyPI0Config(), seed=123).eval()

    monkeypatch.setattr(standins.TinyPI0Policy, "from_pretrained", classmethod(no_load))
    with pytest.raises(HarnessError, match="differ from the file"):
        Pi0LeRobotExtractor(str(ckpt)).load()


def test_image_key_from_config_with_override(tmp_path):
    cfg = standins.TinyPI0Config()
    cfg.input_features = {"observation.images.image": {"type": "VISUAL", "shape": [3, 48, 48]},
                          "observation.images.wrist": {"type": "VISUAL", "shape": [3, 48, 48]},
                          **cfg.input_features}
    path = standins.save_tiny_pi0_checkpoint(tmp_path / "ck", config=cfg)
    assert Pi0LeRobotExtractor(str(path)).load().image_key == "observation.images.image"
    ex = Pi0LeRobotExtractor(str(path), image_key="observation.images.wrist").load()
    ex.forward(ex.build_inputs(samples(1)))
    assert ex.policy.seen_batch_keys == [{"observation.images.wrist"}]
    with pytest.raises(HarnessError, match="not in the config"):
        Pi0LeRobotExtractor(str(path), image_key="observation.images.nope").load()


def test_new_api_matches_old_api(ckpt, ckpt_new):
    """LeRobot 0.6 shape (tuple-returning norm, 4-D float mask, _preprocess_images) gives
    the same features as the old API on the same weights."""
    old = Pi0LeRobotExtractor(str(ckpt)).load()
    new = Pi0LeRobotExtractor(str(ckpt_new)).load()
    assert (old.api, new.api) == ("old", "new")
    torch.testing.assert_close(pooled(old, samples()), pooled(new, samples()), atol=1e-5, rtol=0)
    assert new.policy.select_action_calls == 0


def test_bundled_code_needing_old_lerobot_gets_a_clear_error(ckpt, tmp_path):
    import shutil
    bad = tmp_path / "ck"
    shutil.copytree(ckpt, bad)
    (bad / "modeling_pi0.py").write_text("from lerobot.common.policies.pretrained import X\n")
    with pytest.raises(HarnessError, match="older LeRobot"):
        Pi0LeRobotExtractor(str(bad)).load()


def test_unknown_repo_offline_is_a_harness_error():
    with pytest.raises(HarnessError, match="HF cache"):
        Pi0LeRobotExtractor("nobody/not-a-pi0-checkpoint").load()


def test_bundled_policy_with_unimplemented_abstract_methods_still_loads(ckpt, tmp_path):
    """Old bundled code under a newer LeRobot base class: abstract methods get stubs."""
    import shutil
    path = tmp_path / "ck"
    shutil.copytree(ckpt, path)
    (path / "modeling_pi0.py").write_text(
        "import abc\n"
        "from harness.extractors.standins import TinyPI0Policy, make_att_2d_masks\n"
        "class PI0Policy(TinyPI0Policy, abc.ABC):\n"
        "    @abc.abstractmethod\n"
        "    def predict_action_chunk(self, batch): ...\n")
    ex = Pi0LeRobotExtractor(str(path)).load()
    assert ex.provenance()["stubbed_abstract_methods"] == ["predict_action_chunk"]
    assert pooled(ex, samples(1)).shape == (1, standins.HIDDEN)
    with pytest.raises(HarnessError):
        ex.policy.predict_action_chunk({})


def test_explicit_dtype_casts_weights_not_rotary_buffers(ckpt):
    ex = Pi0LeRobotExtractor(str(ckpt), dtype="bfloat16").load()
    assert {p.dtype for p in ex.policy.parameters()} == {torch.bfloat16}
    rotary = {b.dtype for n, b in ex.policy.named_buffers() if n.endswith("inv_freq")}
    assert rotary == {torch.float32}
    assert ex.provenance()["dtype"] == "bfloat16"
    assert torch.isfinite(pooled(ex, samples(2))).all()


def test_installed_lerobot_path_without_lerobot_is_a_clear_error(ckpt):
    try:
        import lerobot  # noqa: F401
        pytest.skip("LeRobot is installed here")
    except ImportError:
        pass
    with pytest.raises(HarnessError, match="LeRobot's PI0Policy is not importable"):
        Pi0LeRobotExtractor(str(ckpt), code="lerobot").load()


def test_attention_is_what_PI0Config_chooses_in_the_old_api(ckpt):
    """The old API's decoder picks its attention from PI0Config.attention_implementation
    (on the PaliGemmaWithExpert config), not from the HF language model's sub-config."""
    ex = Pi0LeRobotExtractor(str(ckpt)).load()
    pwe = ex.policy.model.paligemma_with_expert
    assert ex.provenance()["attn_implementation"] == pwe.config.attention_implementation == "eager"
    pwe.config.attention_implementation = "flex"  # what a checkpoint trained with flex says
    assert ex.provenance()["attn_implementation"] == "flex"


def test_padding_side_is_the_tokenizers_under_seed_compat(ckpt):
    """The policy's own path pads right (built here); the seed's pads wherever the
    tokenizer does (Gemma's fast tokenizer, and the stand-in's: left)."""
    own = Pi0LeRobotExtractor(str(ckpt)).load()
    seed = Pi0LeRobotExtractor(str(ckpt), seed_tokenization=True).load()
    assert seed.tokenizer.padding_side == "left"
    _, own_mask = own.tokenize(["ab", "abcdef"])
    _, seed_mask = seed.tokenize(["ab", "abcdef"])
    assert not own_mask[0, -1] and own.provenance()["padding_side"] == "right"
    assert not seed_mask[0, 0] and seed.provenance()["padding_side"] == "left"
