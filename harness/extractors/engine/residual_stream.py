"""Every layer of a decoder whose layers are run by hand (Pi0's old LeRobot API).

`hidden_states` is what transformers returns for a layer sweep, but Pi0's bundled code
calls each decoder layer's sub-modules itself (input norm, projections, MLP) and never
asks for it. Each layer's first step is `layers[i].input_layernorm(residual)`, so a
forward pre-hook there sees the residual stream entering layer i, which is
`hidden_states[i]`; the final norm's output is `hidden_states[L]`. Tests prove the
equality on transformers models that also return `hidden_states`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from harness.errors import HarnessError
from harness.extractors.engine.hooks import HookError, _first_tensor


class ResidualStream:
    """What the hooks saw in one forward: index -> (B, T, D) tensor, like hidden_states."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.calls = [0] * (n_layers + 1)
        self.states: list[torch.Tensor | None] = [None] * (n_layers + 1)

    def _pre(self, i: int):
        def hook(module, args, kwargs):
            self.calls[i] += 1
            self.states[i] = (args[0] if args else kwargs["hidden_states"]).detach()
        return hook

    def _final(self, module, args, output):
        self.calls[-1] += 1
        self.states[-1] = _first_tensor(output).detach()

    def hidden_states(self) -> list[torch.Tensor]:
        """[input of layer 0, ..., input of layer L-1, final norm output]; each captured
        exactly once, or a HookError (a second call would mean another stream ran)."""
        wrong = [i for i, c in enumerate(self.calls) if c != 1]
        if wrong:
            raise HookError(f"residual-stream hooks fired {[self.calls[i] for i in wrong]} "
                            f"times at hidden_states indices {wrong}; expected once each")
        return list(self.states)


@contextlib.contextmanager
def capture_residual_stream(decoder: torch.nn.Module) -> Iterator[ResidualStream]:
    """Hook `decoder.layers[i].input_layernorm` (pre) and `decoder.norm` (post) for the
    `with` block; hooks are removed on exit."""
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    if layers is None or norm is None or not all(hasattr(l, "input_layernorm") for l in layers):
        raise HookError(f"{type(decoder).__name__}: expected .layers[i].input_layernorm and "
                        ".norm (a Gemma-style decoder)")
    stream = ResidualStream(len(layers))
    handles = [layer.input_layernorm.register_forward_pre_hook(stream._pre(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    handles.append(norm.register_forward_hook(stream._final))
    try:
        yield stream
    finally:
        for handle in handles:
            handle.remove()


def layer_indices(spec, n_states: int) -> list[int]:
    """Non-negative `hidden_states` indices a layer spec ('last' | 'all' | [int]) asks
    for besides the final layer."""
    if spec == "last":
        return []
    wanted = range(n_states) if spec == "all" else spec
    out = []
    for i in wanted:
        if not -n_states <= i < n_states:
            raise HarnessError(f"layer {i} out of range: the model has {n_states} hidden states")
        out.append(i % n_states)
    return out
