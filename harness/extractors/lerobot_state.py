"""The robot state as a model input, for the LeRobot families that take it (SmolVLA's state
token, the discretised state in Pi0.5 / Pi0-FAST prompts), and what those families share.

Why it matters: CKNNA of features against the proprioceptive state says nothing about what
a model learned when the features were computed FROM that state. So these families are
state-blind by default, and `--state_in_input` (recorded as `state_in_input: true`) feeds
the data directory's states the way the policy would. The states come from the data
directory (`feats_B.pt`, handed over by the `extract` command through `set_states`),
normalised as the checkpoint's own pre-processor does when the checkpoint directory holds
it (`policy_preprocessor.json` and its normaliser's statistics file), else as stored; the
record says which.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.errors import HarnessError
from harness.extractors.engine.registry import Option

AS_STORED = " as stored"
STATE_KEY = "observation.state"
LIMITS = {"MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}


class StateNormaliser:
    """LeRobot 0.4.4's NormalizerProcessorStep for the state, read from a checkpoint's saved
    pre-processor (its config's norm_map["STATE"], eps, and the statistics file)."""

    def __init__(self, mode: str, stats: dict[str, torch.Tensor], eps: float, source: str):
        if mode != "IDENTITY" and mode != "MEAN_STD" and mode not in LIMITS:
            raise HarnessError(f"{source}: state normalisation mode {mode!r} is not known here")
        self.mode, self.stats, self.eps, self.source = mode, stats, eps, source

    def __call__(self, state: torch.Tensor) -> torch.Tensor:
        if self.mode == "IDENTITY":
            return state
        width = next(iter(self.stats.values())).numel()
        if state.numel() != width:
            raise HarnessError(f"{self.source}: the checkpoint's state statistics have {width} "
                               f"values, the data directory's states {state.numel()}")
        if self.mode == "MEAN_STD":
            return (state - self.stats["mean"]) / (self.stats["std"] + self.eps)
        low, high = (self.stats[k] for k in LIMITS[self.mode])
        span = high - low
        span = torch.where(span == 0, torch.full_like(span, self.eps), span)
        return 2 * (state - low) / span - 1

    @classmethod
    def from_checkpoint(cls, directory) -> "StateNormaliser | None":
        """The normaliser of `directory/policy_preprocessor.json`, or None without one."""
        if directory is None or not (Path(directory) / "policy_preprocessor.json").is_file():
            return None
        path = Path(directory) / "policy_preprocessor.json"
        try:
            steps = json.loads(path.read_text())["steps"]
            step = next(s for s in steps if s.get("registry_name") == "normalizer_processor")
        except (OSError, ValueError, KeyError, StopIteration, TypeError) as err:
            raise HarnessError(f"{path}: no readable normalizer_processor step ({err})") from None
        mode = str(step["config"].get("norm_map", {}).get("STATE", "IDENTITY"))
        if mode == "IDENTITY":
            return cls(mode, {}, 0.0, str(path))
        from safetensors.torch import load_file
        tensors = load_file(str(Path(directory) / step["state_file"]))
        stats = {k[len(STATE_KEY) + 1:]: v.float() for k, v in tensors.items()
                 if k.startswith(STATE_KEY + ".")}
        return cls(mode, stats, float(step["config"].get("eps", 1e-8)), str(path))

    def describe(self) -> str:
        return f" normalised as {self.source} says ({self.mode})"


class StateInput:
    """Sample index -> state row, given by the run loop; zeros when none were given."""

    def __init__(self):
        self.by_index: dict[int, torch.Tensor] = {}
        self.source = "none given: zeros"
        self.normaliser: StateNormaliser | None = None

    def use_checkpoint_normaliser(self, directory) -> None:
        """Normalise as the checkpoint's saved pre-processor does (when it has one)."""
        self.normaliser = StateNormaliser.from_checkpoint(directory)

    def set_states(self, states: torch.Tensor, indices=None) -> None:
        """Row p of `states` is the state of sample `indices[p]` (harness.data.BridgeData;
        row p = sample p without indices)."""
        indices = range(len(states)) if indices is None else indices
        if states.ndim != 2 or states.shape[0] != len(indices):
            raise HarnessError(f"states of shape {tuple(states.shape)} do not match "
                               f"{len(indices)} sample indices")
        self.by_index = {int(i): states[p].float() for p, i in enumerate(indices)}
        self.source = "feats_B.pt rows"

    def describe(self, normalise: bool = True) -> str:
        """What `rows(..., normalise)` feeds, for the record."""
        if not self.by_index:
            return self.source
        how = self.normaliser.describe() if normalise and self.normaliser else AS_STORED + (
            "" if not normalise else " (the checkpoint has no policy_preprocessor.json)")
        return f"{self.source}{how}, zero-padded to max_state_dim"

    def rows(self, sample_indices, width: int, normalise: bool = True) -> torch.Tensor:
        """(B, width) float32 states of these samples, normalised as the checkpoint's
        pre-processor does (when it has one and `normalise`), zero-padded (as LeRobot's
        `pad_vector`); zeros when no states were given."""
        out = torch.zeros(len(sample_indices), width)
        if not self.by_index:
            return out
        for row, index in enumerate(sample_indices):
            state = self.by_index.get(int(index))
            if state is None:
                raise HarnessError(f"no state for sample {int(index)}")
            if normalise and self.normaliser is not None:
                state = self.normaliser(state)
            if state.numel() > width:
                raise HarnessError(f"the state has {state.numel()} values, the policy takes at "
                                   f"most max_state_dim = {width}")
            out[row, : state.numel()] = state
        return out


def import_lerobot(family: str, module: str, policy_class: str,
                   install: str = "install lerobot==0.4.4"):
    """Import LeRobot's `module`, or a one-line HarnessError naming the family and class."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise HarnessError(f"{family}: LeRobot's {policy_class} is not importable ({err}); "
                           f"{install}") from None


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


def build_dtype(dtype: str | None) -> str | None:
    """The dtype a LeRobot family's extractor takes: None (the loader's own mix, on a
    stand-in `release_dtype_policy`) for `--dtype checkpoint`."""
    return None if dtype == "checkpoint" else dtype


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
