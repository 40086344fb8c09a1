"""Which weights a family's real checkpoint holds in which dtype, declared once per family.

A real checkpoint rarely runs in one dtype: LeRobot's Pi0 loader puts PaliGemma and the
expert's decoder layers in bf16 and leaves the expert's final norm and the state/action
projections in float32. Code that is only ever run on an all-float32 stand-in cannot see
the dtype clashes such a mix causes, so every family declares its mix here
(`FamilySpec.dtype_policy`) and the contract suite (tests/equivalence/test_contract.py)
loads each stand-in under it.

Selectors follow the upstream loaders: a parameter matches a selector when the selector is
a substring of its name, names taken relative to `root` (a module path inside the model
an extractor holds). Parameters outside `root` keep float32.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DtypePolicy:
    """One checkpoint's dtype mix: `low` for the parameters in `low_modules` (whole
    modules, cast with `.to`, buffers too) or matching `low_params`, then float32 again for
    those matching `float32_params`; everything else float32."""

    summary: str
    low: str = "bfloat16"
    root: str = ""
    low_modules: tuple[str, ...] = ("",)
    low_params: tuple[str, ...] = ()
    float32_params: tuple[str, ...] = ()

    @property
    def uniform(self) -> bool:
        """True when every parameter is in `low` (a plain `.to(low)` realises it)."""
        return self.low_modules == ("",) and not self.float32_params

    def dtype_name(self, name: str) -> str:
        """The dtype ('bfloat16' / 'float32') of the parameter `name` (relative to `root`)."""
        low = any(name == m or name.startswith(m + ".") or m == "" for m in self.low_modules)
        low = low or any(s in name for s in self.low_params)
        if any(s in name for s in self.float32_params):
            low = False
        return self.low if low else "float32"

    def _scope(self, model):
        return model.get_submodule(self.root) if self.root else model

    def apply(self, model):
        """Cast a float32 model to this mix in place, as the real loader does; returns it."""
        import torch
        scope, low = self._scope(model), getattr(torch, self.low)
        for path in self.low_modules:
            scope.get_submodule(path).to(dtype=low)
        for name, param in scope.named_parameters():
            want = getattr(torch, self.dtype_name(name))
            if param.dtype != want:
                param.data = param.data.to(want)
        return model

    def mismatches(self, model) -> list[str]:
        """'name: has, policy says want' for every parameter of `model` (under `root`)
        whose dtype differs from the policy; parameters outside `root` must be float32."""
        scope = self._scope(model)
        inside = {id(p) for p in scope.parameters()}
        out = [f"{n}: {_name(p.dtype)}, policy says {self.dtype_name(n)}"
               for n, p in scope.named_parameters() if _name(p.dtype) != self.dtype_name(n)]
        out += [f"{n}: {_name(p.dtype)}, outside {self.root!r} so float32"
                for n, p in model.named_parameters()
                if id(p) not in inside and _name(p.dtype) != "float32"]
        return out


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


ALL_BF16 = DtypePolicy("every weight bfloat16 (from_pretrained with torch_dtype=bfloat16)")
"""The default: the whole model in bf16, as `from_pretrained(torch_dtype=bf16)` loads it."""

FLOAT32 = DtypePolicy("every weight float32 (the stand-ins' exact tier)", low="float32")
