"""Dtype policies: upstream's substring selectors, applied as the loaders apply them, and
`--dtype checkpoint` resolving to each family's declared mix."""
import torch
from torch import nn

from harness.commands.extract import resolve_dtype
from harness.data.load import BridgeData, policy_states
from harness.extractors.engine.dtype_policy import ALL_BF16, DtypePolicy


def model():
    top = nn.Module()
    top.inner = nn.Module()
    top.inner.vlm = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    top.inner.expert = nn.Module()
    top.inner.expert.layers = nn.Sequential(nn.Linear(2, 2))
    top.inner.expert.norm = nn.LayerNorm(2)
    top.proj = nn.Linear(2, 2)
    return top


MIX = DtypePolicy("test", root="inner", low_modules=("vlm",), low_params=("expert.layers",),
                  float32_params=("vlm.1",))


def test_apply_follows_modules_substrings_and_float32_exceptions():
    m = MIX.apply(model())
    dtypes = {n: str(p.dtype).removeprefix("torch.") for n, p in m.named_parameters()}
    assert dtypes == {"inner.vlm.0.weight": "bfloat16", "inner.vlm.0.bias": "bfloat16",
                      "inner.vlm.1.weight": "float32", "inner.vlm.1.bias": "float32",
                      "inner.expert.layers.0.weight": "bfloat16",
                      "inner.expert.layers.0.bias": "bfloat16",
                      "inner.expert.norm.weight": "float32", "inner.expert.norm.bias": "float32",
                      "proj.weight": "float32", "proj.bias": "float32"}
    assert MIX.mismatches(m) == [] and not MIX.uniform and ALL_BF16.uniform


def test_mismatches_name_each_wrong_weight_inside_and_outside_the_root():
    m = model()
    assert "inner.vlm.0.weight" not in " ".join(MIX.mismatches(m))  # names relative to root
    assert any(s.startswith("vlm.0.weight: float32") for s in MIX.mismatches(m))
    m = MIX.apply(m)
    m.proj.to(torch.bfloat16)
    assert MIX.mismatches(m) == ["proj.weight: bfloat16, outside 'inner' so float32",
                                 "proj.bias: bfloat16, outside 'inner' so float32"]


def test_dtype_checkpoint_resolves_to_each_familys_policy():
    assert resolve_dtype("checkpoint", tiny=True, family="spatialvla") == "bfloat16"
    assert resolve_dtype("checkpoint", tiny=True, family="pi0_lerobot") == "checkpoint"
    assert resolve_dtype("checkpoint", tiny=False, family="pi0_lerobot") is None  # the loader's


def test_policy_states_put_the_dropped_zero_column_back(tmp_path):
    states = torch.arange(14, dtype=torch.float32).reshape(2, 7)
    data = BridgeData(tmp_path, {"state_dim_raw": 8, "pad_index_dropped": 6}, states,
                      ["a", "b"], [0, 0], [0, 1], [0, 1])
    raw = policy_states(data)
    assert raw.shape == (2, 8) and torch.equal(raw[:, 6], torch.zeros(2))
    assert torch.equal(raw[:, :6], states[:, :6]) and torch.equal(raw[:, 7], states[:, 6])
    plain = BridgeData(tmp_path, {}, states, ["a", "b"], [0, 0], [0, 1], [0, 1])
    assert policy_states(plain) is states
