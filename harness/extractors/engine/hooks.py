"""Capture one module's output during a forward, without changing the forward.

Module paths move between transformers releases (docs/facts.md §4; each family declares
its final-norm paths in its registry spec), so a capture takes a list of
candidate dotted paths and uses the first that exists. A hook that never fires is an
error, not an empty result: a silent hook means features were read from somewhere else.
"""
from __future__ import annotations

import contextlib
import difflib
from typing import Iterator, Sequence

import torch

from harness.errors import HarnessError


class HookError(HarnessError):
    """A capture could not be placed or never fired."""


def find_module(root: torch.nn.Module, paths: Sequence[str]) -> tuple[str, torch.nn.Module]:
    """(path, module) for the first of `paths` that names a submodule of `root`."""
    names = dict(root.named_modules())
    for path in paths:
        if path in names:
            return path, names[path]
    close: list[str] = []
    for path in paths:
        close += [c for c in difflib.get_close_matches(path, names, n=3, cutoff=0.5) if c not in close]
    raise HookError(f"{type(root).__name__}: none of the module paths {list(paths)} exists; "
                    f"closest real names: {close[:6] or 'none'}")


def _first_tensor(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]  # e.g. LeRobot 0.6's norm returns (hidden, gate)
    to_tuple = getattr(output, "to_tuple", None)  # transformers ModelOutput
    if to_tuple is not None:
        return _first_tensor(to_tuple())
    raise HookError(f"hooked module returned {type(output).__name__}, not a tensor or tuple")


class Capture:
    """What a capture saw: the last output (detached), the path used, and the call count."""

    def __init__(self, path: str):
        self.path = path
        self.calls = 0
        self._output: torch.Tensor | None = None

    def _hook(self, module, args, output):
        self.calls += 1
        self._output = _first_tensor(output).detach()  # returning None keeps the output

    @property
    def fired(self) -> bool:
        return self.calls > 0

    @property
    def output(self) -> torch.Tensor:
        if self._output is None:
            raise HookError(f"hook on {self.path!r} never fired")
        return self._output


@contextlib.contextmanager
def capture(root: torch.nn.Module, paths: Sequence[str] | str) -> Iterator[Capture]:
    """Hook the first existing module of `paths` for the `with` block; removed on exit.

    Raises HookError on exit when the hook never fired during the block.
    """
    if isinstance(paths, str):
        paths = [paths]
    path, module = find_module(root, paths)
    record = Capture(path)
    handle = module.register_forward_hook(record._hook)
    try:
        yield record
    finally:
        handle.remove()
    if not record.fired:
        raise HookError(f"hook on {type(root).__name__}.{path} never fired during the forward")
