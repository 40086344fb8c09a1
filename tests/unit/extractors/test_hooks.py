"""Hook capture: path fallbacks, helpful errors, tuple outputs, detach, removal, firing."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.extractors.engine.hooks import HookError, capture, find_module


class TupleOut(nn.Module):
    def forward(self, x):
        return x * 2, "extra"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.norm = nn.LayerNorm(4)
        self.model.pair = TupleOut()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.model.norm(x)
        h2, _ = self.model.pair(h)
        return self.head(h2)


def test_first_existing_path_wins():
    net = Net()
    path, module = find_module(net, ["language_model.norm", "model.norm", "model.pair"])
    assert path == "model.norm" and module is net.model.norm


def test_missing_paths_list_tried_and_closest_names():
    with pytest.raises(HookError) as err:
        find_module(Net(), ["model.language_model.norm", "model.nrm"])
    message = str(err.value)
    assert "model.language_model.norm" in message and "model.nrm" in message
    assert "'model.norm'" in message  # the closest real name


def test_captures_output_detached_and_equal_to_manual_value():
    net = Net()
    x = torch.randn(3, 4, requires_grad=True)
    with capture(net, ["model.norm"]) as hooked:
        net(x)
    expected = nn.functional.layer_norm(x, (4,), net.model.norm.weight, net.model.norm.bias)
    torch.testing.assert_close(hooked.output, expected)
    assert not hooked.output.requires_grad and hooked.calls == 1


def test_tuple_output_takes_element_zero():
    net = Net()
    x = torch.randn(2, 4)
    with capture(net, "model.pair") as hooked:
        net(x)
    torch.testing.assert_close(hooked.output, net.model.norm(x) * 2)


def test_hook_removes_itself_and_leaves_output_unchanged():
    net = Net()
    x = torch.randn(2, 4)
    before = net(x)
    with capture(net, "model.norm"):
        during = net(x)
    assert torch.equal(before, during)
    assert len(net.model.norm._forward_hooks) == 0


def test_hook_removed_when_block_raises():
    net = Net()
    with pytest.raises(RuntimeError, match="boom"):
        with capture(net, "model.norm"):
            raise RuntimeError("boom")
    assert len(net.model.norm._forward_hooks) == 0


def test_never_fired_is_an_error():
    net = Net()
    with pytest.raises(HookError, match="never fired"):
        with capture(net, "model.norm") as hooked:
            pass
    with pytest.raises(HookError, match="never fired"):
        hooked.output
