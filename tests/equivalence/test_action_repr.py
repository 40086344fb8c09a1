"""`--action_repr` for Pi0 on the old-API stand-in: feats_action.pt is the action expert's
final-norm output at the LAST denoising step of the policy's own `sample_actions`, mean
over the action tokens; deterministic per sample, batch-independent; feats_A unchanged."""
from __future__ import annotations

import json

import pytest
import torch

from harness.errors import HarnessError
from harness.extractors import standins
from harness.extractors.pi0_lerobot import Pi0LeRobotExtractor
from harness.extractors.engine.features import extract
from tests.random_samples import random_samples


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return standins.save_tiny_pi0_checkpoint(tmp_path_factory.mktemp("pi0"))


def loaded(ckpt, **kw) -> Pi0LeRobotExtractor:
    ex = Pi0LeRobotExtractor(str(ckpt), **kw).load()
    ex.set_states(STATES)
    return ex


STATES = torch.randn(8, 8, generator=torch.Generator().manual_seed(5))


def test_reads_the_last_denoising_step_over_the_action_tokens(ckpt, monkeypatch):
    ex = loaded(ckpt)
    model = ex.policy.model
    calls = []
    original = type(model).denoise_step

    def recording(self, state, prefix_pad_masks, cache, x_t, timestep):
        calls.append((state, prefix_pad_masks, cache, x_t.clone(), timestep.clone()))
        return original(self, state, prefix_pad_masks, cache, x_t, timestep)

    monkeypatch.setattr(type(model), "denoise_step", recording)
    inputs = ex.build_inputs(random_samples())
    feats = ex.action_features(inputs)
    steps = ex.policy.config.num_steps
    assert len(calls) == steps and steps > 1
    # recompute the expert's output of the last step directly, without any hook
    state, pad, cache, x_t, t = calls[-1]
    assert torch.allclose(t, torch.full_like(t, 1.0 - (steps - 1) / steps))
    with torch.inference_mode():  # the recorded tensors are inference tensors
        suffix, s_pad, s_att = model.embed_suffix(state, x_t, t)
    n_prefix, n_suffix = pad.shape[1], suffix.shape[1]
    mask = torch.cat([pad[:, None, :].expand(-1, n_suffix, n_prefix),
                      standins.make_att_2d_masks(s_pad, s_att)], dim=2)
    positions = pad.sum(-1)[:, None] + torch.cumsum(s_pad, dim=1) - 1
    with torch.inference_mode():
        out, _ = model.paligemma_with_expert.forward(
            attention_mask=mask, position_ids=positions, past_key_values=cache,
            inputs_embeds=[None, suffix], fill_kv_cache=False)
    n = ex.policy.config.n_action_steps
    want = out[1][:, -n:].mean(dim=1)
    assert torch.equal(feats, want.float())
    # the first step's output is a different thing (the loop really ran)
    state, pad, cache, x0, t0 = calls[0]
    assert not torch.allclose(x0, x_t)
    assert feats.shape == (4, standins.HIDDEN)


def test_deterministic_batch_independent_and_reset_each_batch(ckpt, monkeypatch):
    ex = loaded(ckpt)
    resets = []
    monkeypatch.setattr(ex.policy, "reset", lambda: resets.append(1))
    samples = random_samples()
    batched = ex.action_features(ex.build_inputs(samples))
    again = ex.action_features(ex.build_inputs(samples))
    alone = torch.cat([ex.action_features(ex.build_inputs([s])) for s in samples])
    assert torch.equal(batched, again)
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    assert len(resets) == 2 + len(samples)
    assert not torch.allclose(batched[0], batched[1])


def test_extract_writes_feats_action_and_leaves_feats_A_bit_identical(ckpt, tmp_path):
    ex = loaded(ckpt)
    samples = random_samples()
    extract(ex, samples, tmp_path / "plain", batch_size=3, progress=False)
    extract(ex, samples, tmp_path / "act", batch_size=3, progress=False, action_repr=True,
            split_modalities=True)
    load = lambda p: torch.load(p, weights_only=True)  # noqa: E731
    assert torch.equal(load(tmp_path / "plain" / "feats_A.pt"), load(tmp_path / "act" / "feats_A.pt"))
    action = load(tmp_path / "act" / "feats_action.pt")
    torch.testing.assert_close(action, ex.action_features(ex.build_inputs(samples)),
                               rtol=0, atol=1e-5)
    meta = json.loads((tmp_path / "act" / "extraction_metadata.json").read_text())
    assert "feats_action.pt" in meta["extra_files"]
    assert meta["action_repr"]["action_state"] == "real"
    assert meta["state_in_input"] == {"feats_A.pt": False, "feats_A_img.pt": False,
                                      "feats_A_txt.pt": False, "feats_action.pt": True}
    assert "gemma_expert" in meta["action_repr"]["point"]


def test_new_api_is_refused_with_a_clear_error(tmp_path):
    ckpt = standins.save_tiny_pi0_checkpoint(tmp_path, new_api=True)
    ex = Pi0LeRobotExtractor(str(ckpt)).load()
    with pytest.raises(HarnessError, match="old LeRobot API"):
        ex.action_features(ex.build_inputs(random_samples(1)))


def _record_sample_actions(ex, monkeypatch) -> list:
    model, calls = ex.policy.model, []
    real = model.sample_actions

    def recording(images, img_masks, tokens, masks, state, noise=None):
        calls.append((state.clone(), noise.clone()))
        return real(images, img_masks, tokens, masks, state, noise=noise)

    monkeypatch.setattr(model, "sample_actions", recording)
    return calls


def test_action_state_real_is_the_state_through_the_policys_normalisation(ckpt, monkeypatch):
    """Default: the data's state, normalised by the checkpoint's own statistics and padded
    as the policy's select_action feeds it; 'zeros' feeds zeros. Recorded either way."""
    samples = random_samples()
    real = loaded(ckpt)
    calls = _record_sample_actions(real, monkeypatch)
    real.action_features(real.build_inputs(samples))
    state = calls[0][0]
    norm = real.policy.normalize_inputs
    want = (STATES[:4] - norm.mean) / (norm.std + 1e-8)  # the stand-in's MEAN_STD statistics
    torch.testing.assert_close(state, want, rtol=0, atol=1e-6)
    assert real.action_provenance()["action_state"] == "real"
    zeros = loaded(ckpt, action_state="zeros")
    calls = _record_sample_actions(zeros, monkeypatch)
    feats_zero = zeros.action_features(zeros.build_inputs(samples))
    assert torch.equal(calls[0][0], torch.zeros_like(state))
    assert zeros.action_provenance()["action_state"] == "zeros"
    assert not zeros.state_in_input("feats_action") and real.state_in_input("feats_action")
    assert not torch.allclose(feats_zero, real.action_features(real.build_inputs(samples)))
    with pytest.raises(HarnessError, match="needs the data set's states"):
        Pi0LeRobotExtractor(str(ckpt)).load().action_features(real.build_inputs(samples))


def test_seed_compat_draws_the_seeds_noise_float32(ckpt, monkeypatch):
    """--seed_compat: sample i's noise is what `torch.manual_seed(42 + i)` then LeRobot's
    float32 `sample_noise` draws; otherwise seeded by the index alone. Both float32."""
    samples = random_samples()
    config = None
    for seed_compat, base in ((True, 42), (False, 0)):
        ex = loaded(ckpt, seed_tokenization=seed_compat)
        config = ex.policy.config
        calls = _record_sample_actions(ex, monkeypatch)
        ex.action_features(ex.build_inputs(samples))
        noise = calls[0][1]
        assert noise.dtype == torch.float32
        for i in range(len(samples)):
            torch.manual_seed(base + i)
            want = torch.normal(0.0, 1.0, size=(1, config.n_action_steps, config.max_action_dim),
                                dtype=torch.float32)
            assert torch.equal(noise[i], want[0]), (seed_compat, i)
        assert f"manual_seed({base} + sample index)" in ex.action_provenance()["noise"]
