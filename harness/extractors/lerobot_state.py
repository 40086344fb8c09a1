"""The robot state as a model input, for the LeRobot families that take it (SmolVLA's state
token, the discretised state in Pi0.5 / Pi0-FAST prompts), and the dtype policies their
loaders apply.

Why it matters: CKNNA of features against the proprioceptive state says nothing about what
a model learned when the features were computed FROM that state. So these families are
state-blind by default, and `--state_in_input` (recorded as `state_in_input: true`) feeds
the data directory's states the way the policy would. The states come from the data
directory (`feats_B.pt`, handed over by the `extract` command through `set_states`), fed
as stored: the policy's normaliser statistics are not applied (recorded as such).
"""
from __future__ import annotations

import torch

from harness.errors import HarnessError
from harness.extractors.registry import Option

STATE_AS_FED = "feats_B.pt rows as stored (the policy's normaliser is not applied), zero-padded to max_state_dim"


class StateInput:
    """Sample index -> state row, given by the run loop; zeros when none were given."""

    def __init__(self):
        self.by_index: dict[int, torch.Tensor] = {}
        self.source = "none given: zeros"

    def set_states(self, states: torch.Tensor, indices) -> None:
        """Row p of `states` is the state of sample `indices[p]` (harness.data.BridgeData)."""
        if states.ndim != 2 or states.shape[0] != len(indices):
            raise HarnessError(f"states of shape {tuple(states.shape)} do not match "
                               f"{len(indices)} sample indices")
        self.by_index = {int(i): states[p].float() for p, i in enumerate(indices)}
        self.source = STATE_AS_FED

    def rows(self, sample_indices, width: int) -> torch.Tensor:
        """(B, width) float32 states of these samples, zero-padded (as LeRobot's
        `pad_vector`); zeros when no states were given."""
        out = torch.zeros(len(sample_indices), width)
        if not self.by_index:
            return out
        for row, index in enumerate(sample_indices):
            state = self.by_index.get(int(index))
            if state is None:
                raise HarnessError(f"no state for sample {int(index)}")
            if state.numel() > width:
                raise HarnessError(f"the state has {state.numel()} values, the policy takes at "
                                   f"most max_state_dim = {width}")
            out[row, : state.numel()] = state
        return out


def apply_dtype_policy(module: torch.nn.Module, dtype: torch.dtype,
                       keep_float32: tuple[str, ...] = ()) -> None:
    """Cast every parameter and floating buffer to `dtype`, except parameters whose name
    contains one of `keep_float32` (LeRobot's `to_bfloat16_for_selected_params` rule)."""
    module.to(dtype=dtype)
    for name, param in module.named_parameters():
        if any(part in name for part in keep_float32):
            param.data = param.data.to(torch.float32)


def parameter_dtypes(module: torch.nn.Module, prefixes: dict[str, str]) -> dict[str, list[str]]:
    """label -> sorted dtypes of the parameters under each module path, read from the
    modules (what ran, for the record)."""
    named = dict(module.named_modules())
    out = {}
    for label, path in prefixes.items():
        sub = named.get(path)
        if sub is not None:
            out[label] = sorted({str(p.dtype).removeprefix("torch.") for p in sub.parameters()})
    return out


SPEC_FIELDS = dict(
    stand_in="tiny",
    stand_in_help="'tiny' (an imitation of LeRobot 0.4.4's classes; the real ones are "
                  "tested in the LeRobot venv)",
    auto_dtype=None,  # the checkpoint's own dtypes, as LeRobot's loader gives them
)
"""FamilySpec fields every LeRobot family added by issue 20 shares."""


def family_options(state_help: str) -> tuple[Option, ...]:
    """`--state_in_input` (what it does per family) and the weight-audit options."""
    return (
        Option("state_in_input", bool, False, state_help),
        Option("image_key", str, None, "override the image key from config.image_features"),
        Option("allow_missing_keys", list, [], "model weights allowed to be absent from the "
               "checkpoint", metavar="GLOB"),
        Option("allow_unexpected_keys", list, [], "checkpoint tensors allowed to match no "
               "model weight", metavar="GLOB"),
    )
