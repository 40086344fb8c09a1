"""The protocol every model family implements, so one run loop serves them all.

A family differs only in how it loads, how it turns samples into model inputs and where
it reads hidden states; pooling, sharding, provenance and resume live in
`harness.extractors.engine.features` and never look inside a model.

Contract (duck-typed: subclassing `Extractor` is optional, `check_extractor` verifies):
- `load()` -> self: load weights / processor, move to device, set eval mode.
- `build_inputs(samples)` -> dict of tensors on the device, for one batch of
  `Sample` tuples `(index, PIL image, task)`.
- `forward(inputs)` -> `HiddenStates`: per named layer a (B, T, D) tensor and the (B, T)
  boolean mask of the tokens that pooling may use (padding is always False).
  `layers["last"]` is the final layer (post final norm); other keys (e.g. "0".."N" for a
  layer sweep over `hidden_states`) are optional.
- `provenance()` -> JSON-able dict: model id/revision, class, extraction point, layers,
  pooling, dtype, attention implementation, padding side, prompt template, image size fed.
  The run loop adds versions, git hash and the dataset fingerprint.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence, Tuple

import torch

if TYPE_CHECKING:  # PIL is only needed for type hints here
    from PIL import Image

Sample = Tuple[int, "Image.Image", str]
"""One data point: (sample index in the dataset, RGB image, task string)."""

FINAL = "last"
"""Key of the final layer in `HiddenStates.layers`; it becomes `feats_A.pt`."""


@dataclass
class HiddenStates:
    """One batch's hidden states by layer name, plus the pooling mask."""

    layers: dict[str, torch.Tensor]
    mask: torch.Tensor

    def __post_init__(self):
        if FINAL not in self.layers:
            raise ValueError(f"HiddenStates needs a {FINAL!r} layer, got {sorted(self.layers)}")
        for name, h in self.layers.items():
            if h.ndim != 3 or tuple(h.shape[:2]) != tuple(self.mask.shape):
                raise ValueError(f"layer {name!r} has shape {tuple(h.shape)}; expected "
                                 f"(B, T, D) matching mask {tuple(self.mask.shape)}")


class Extractor(abc.ABC):
    """Optional base class spelling out the protocol (see the module docstring)."""

    family: str = "?"
    hidden_dim: int | None = None

    @abc.abstractmethod
    def load(self) -> "Extractor":
        """Load weights and processors; return self."""

    @abc.abstractmethod
    def build_inputs(self, samples: Sequence[Sample]) -> dict:
        """Model inputs for one batch, already on the device."""

    @abc.abstractmethod
    def forward(self, inputs: dict) -> HiddenStates:
        """Run the model (no grad) and return hidden states + pooling mask."""

    @abc.abstractmethod
    def describe(self) -> dict:
        """What only this family knows about how its features are made (JSON-able, except
        that `dtype` may be a torch.dtype)."""

    def attention_implementation(self) -> str | None:
        """The attention implementation of the modules that ran (None: not recorded)."""
        return None

    def provenance(self) -> dict:
        """How the features are made, built here once for every family: the family's own
        record, dtype spelled one way, the attention implementation read from the modules
        that ran (not the one asked for)."""
        from harness.extractors.engine.compat import dtype_name

        record = {"family": self.family, **self.describe()}
        record["dtype"] = dtype_name(record.get("dtype"))
        attention = self.attention_implementation()
        if attention is not None:
            record["attn_implementation"] = attention
        return record


REQUIRED = ("family", "load", "build_inputs", "forward", "provenance")


def check_extractor(obj) -> None:
    """Raise TypeError naming what an object lacks to be used as an extractor."""
    missing = [name for name in REQUIRED if not hasattr(obj, name)]
    if missing:
        raise TypeError(f"{type(obj).__name__} is not an extractor: missing {missing}")


def to_device(value, device, dtype):
    """Move one model input: float tensors also take the model dtype, others keep theirs
    (token ids and masks must stay integer/bool); non-tensors pass through."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        return value.to(device=device, dtype=dtype)
    return value.to(device)


def model_of(extractor):
    """The torch module a loaded extractor runs: a LeRobot family's `policy`, else `model`
    (where dtype policies apply and what provenance is checked against)."""
    policy = getattr(extractor, "policy", None)
    return policy if policy is not None else extractor.model
