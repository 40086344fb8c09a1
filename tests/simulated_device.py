"""Run code as if its data sat on a GPU, on a machine without one.

Tensors "on the device" are CPU tensors of the subclass `OnDevice`. Inside
`simulated_device()` a torch function mode applies CUDA's placement rules to them:
- `device=` given to a factory (`torch.arange(n, device=x.device)`) or `.to(device)`
  puts the result on the device; a factory without it (`torch.arange(n)`, a
  `torch.Generator`'s `randperm`) and `.cpu()` give a host tensor, as on CUDA;
- an operation mixing device tensors with host tensors of one element or more fails on
  CUDA ("Expected all tensors to be on the same device"): it is recorded as a mismatch,
  with the innermost harness/ line that called it (host 0-dim tensors are allowed, as
  on CUDA; so are host indices into a device tensor, recorded as a transfer, like
  `.to(device)` of a host tensor);
- `.numpy()` of a device tensor is a mismatch; `.item()`, `.tolist()`, `bool()`,
  `int()`, `float()`, `.nonzero()`, boolean-mask indexing and `.cpu()` wait for the
  device, so they are counted as syncs, per line.
The values are computed on CPU as usual, so a run finishes and reports every site at
once. Limits: a device passed as a string ("cuda") is not told apart from "cpu", and
`.to(torch.device("cpu"))` counts as a move onto the device (the code says `.cpu()`
when it means the host).
"""
from __future__ import annotations

import contextlib
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

HARNESS = Path(__file__).resolve().parents[1] / "harness"
SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu"}
FACTORIES = {"arange", "zeros", "ones", "empty", "full", "tensor", "as_tensor", "randperm",
             "randint", "rand", "randn", "linspace", "eye"}


class OnDevice(torch.Tensor):
    """A tensor that plays one on the GPU (its values live on CPU)."""


def to_device(x: torch.Tensor) -> torch.Tensor:
    return x.as_subclass(OnDevice)


def on_device(x) -> bool:
    return isinstance(x, OnDevice)


def _host(x) -> bool:
    """A host tensor that CUDA would not accept beside device tensors."""
    return isinstance(x, torch.Tensor) and not isinstance(x, OnDevice) and x.dim() > 0


def _site() -> str:
    """file:line (function) of the innermost harness/ frame calling torch."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if HARNESS in path.parents:
            return f"{path.relative_to(HARNESS.parent)}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "outside harness/"


def _names_a_device(args, kwargs) -> bool:
    return kwargs.get("device") is not None or any(isinstance(a, torch.device) for a in args[1:])


@dataclass
class Findings:
    mismatches: Counter = field(default_factory=Counter)  # (site, what) -> count
    transfers: Counter = field(default_factory=Counter)
    syncs: Counter = field(default_factory=Counter)

    def mismatch_sites(self, under: str = "") -> list[str]:
        return sorted({f"{site}: {what}" for site, what in self.mismatches if under in site})


class _Mode(TorchFunctionMode):
    def __init__(self, findings: Findings):
        super().__init__()
        self.f = findings

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self._check(name, args, tensors)
        moves = name == "to" and _names_a_device(args, kwargs)
        if moves and _host(args[0]):
            self.f.transfers[(_site(), "host tensor copied to the device")] += 1
        out = func(*args, **kwargs)
        if name == "cpu":
            return out.as_subclass(torch.Tensor)
        if moves or (name in FACTORIES and kwargs.get("device") is not None):
            return out.as_subclass(OnDevice) if isinstance(out, torch.Tensor) else out
        return out

    def _check(self, name, args, tensors) -> None:
        if not any(map(on_device, tensors)):
            return
        site = _site()
        if name in SYNCS:
            self.f.syncs[site] += 1
        if name == "numpy":
            self.f.mismatches[(site, ".numpy() of a device tensor")] += 1
        elif name in ("__getitem__", "__setitem__"):
            self._indexing(site, name, args)
        elif any(map(_host, tensors)):
            self.f.mismatches[(site, f"{name}: device and host tensors mixed")] += 1

    def _indexing(self, site, name, args) -> None:
        target, key = args[0], args[1]
        keys = [t for t in tree_leaves(key) if isinstance(t, torch.Tensor)]
        if any(t.dtype == torch.bool for t in keys):
            self.f.syncs[site] += 1  # the result's size is known only on the device
        value = args[2] if name == "__setitem__" else None
        if not on_device(target):
            if any(map(on_device, keys)):
                self.f.mismatches[(site, f"{name}: host tensor indexed by a device tensor")] += 1
            elif on_device(value) and keys and value.dim() > 0:
                self.f.mismatches[(site, f"{name}: device values put into a host tensor")] += 1
            elif on_device(value):  # a slice assignment is a copy_, which crosses devices
                self.f.transfers[(site, f"{name}: device values copied into a host tensor")] += 1
            return
        if any(map(_host, keys)):
            self.f.transfers[(site, f"{name}: host indices into a device tensor")] += 1
        if _host(value):
            if keys:
                self.f.mismatches[(site, f"{name}: host values put into a device tensor")] += 1
            else:
                self.f.transfers[(site, f"{name}: host values copied into a device tensor")] += 1


@contextlib.contextmanager
def simulated_device():
    """Yields the Findings of everything run inside (see the module docstring)."""
    findings = Findings()
    with _Mode(findings):
        yield findings
