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
from harness.features import extract
from tests.random_samples import random_samples


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return standins.save_tiny_pi0_checkpoint(tmp_path_factory.mktemp("pi0"))


def test_reads_the_last_denoising_step_over_the_action_tokens(ckpt, monkeypatch):
    ex = Pi0LeRobotExtractor(str(ckpt)).load()
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
    ex = Pi0LeRobotExtractor(str(ckpt)).load()
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
    ex = Pi0LeRobotExtractor(str(ckpt)).load()
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
    assert meta["action_repr"]["state_input"] == "zeros"
    assert "gemma_expert" in meta["action_repr"]["point"]


def test_new_api_is_refused_with_a_clear_error(tmp_path):
    ckpt = standins.save_tiny_pi0_checkpoint(tmp_path, new_api=True)
    ex = Pi0LeRobotExtractor(str(ckpt)).load()
    with pytest.raises(HarnessError, match="old LeRobot API"):
        ex.action_features(ex.build_inputs(random_samples(1)))
