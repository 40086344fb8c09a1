"""The model-family registry: one declaration per family, read by every other layer.

Each extractor module declares `SPEC = FamilySpec(...)`: its name, one-line help, default
checkpoint, stand-in, options, final-norm paths and how to build its extractor. The
`extract` sub-commands (flags and `--help`), the study config's typed `options` schema
(`harness.study.config`), the demo and the docs all read `FAMILIES`, so a flag and a config
option cannot drift apart. A new family is a new module here that defines `SPEC`
(discovered automatically) plus its tests; see docs/families.md.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

from harness.errors import HarnessError
from harness.extractors.engine.dtype_policy import ALL_BF16, DtypePolicy

LAYERS = "layers"
"""Option type of `--layers`: 'last', 'all', '0,13,-1' on the command line; in a config
also a TOML list of integers."""


@dataclass(frozen=True)
class Option:
    """One extractor option: a `--name` flag and a key of the config's `options` table.

    `type` is int, float, str, bool (a switch), list (one or more strings) or LAYERS."""

    name: str
    type: Any
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    metavar: str | None = None


@dataclass(frozen=True)
class Common:
    """Options every family takes, resolved once before a family builds its extractor."""

    ckpt: str
    device: str
    dtype: str | None
    layers: str | list[int]
    revision: str | None
    tiny: bool


@dataclass(frozen=True)
class FamilySpec:
    """Everything the rest of the project needs to know about one model family."""

    name: str
    help: str
    build: Callable[[Common, dict, Any], Any]
    """(common, family options, contextlib.ExitStack) -> extractor, not yet loaded."""
    default_ckpt: str | None = None
    stand_in: str = "tiny"
    """The `--ckpt` value of the family's tiny random-weight stand-in (the demo's)."""
    stand_in_help: str = "'tiny'"
    options: tuple[Option, ...] = ()
    final_norm_paths: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """model_type -> module paths of the final norm, newest transformers layout first."""
    auto_dtype: str | None = "bfloat16"
    """`--dtype auto` on a real checkpoint (None: the checkpoint's own)."""
    demo: tuple[tuple[str, str, dict], ...] = ()
    """(model name, ckpt, options) rows this family adds to the built-in demo study."""
    action_stream: bool = False
    """True when the model has an action stream `--action_repr` can read (Pi0's expert)."""
    dtype_policy: DtypePolicy = ALL_BF16
    """Which weights the real checkpoint's loader leaves in which dtype: `--dtype
    checkpoint` loads the stand-in that way, and the contract suite checks it."""

    def option_fields(self) -> tuple[Option, ...]:
        """Common options first, then the family's own: the `extract` flags and the
        config's `options` keys, in one order."""
        return (*COMMON_OPTIONS, *self.options)


COMMON_OPTIONS: tuple[Option, ...] = (
    Option("batch_size", int, 8, "samples per forward"),
    Option("dtype", str, "auto", "float32 | bfloat16 | float16 | auto (bf16 for real "
           "checkpoints, fp32 for stand-ins; Pi0: the checkpoint's own) | checkpoint (the "
           "real checkpoint's dtype mix; stand-ins loaded under the family's dtype policy)",
           choices=("auto", "float32", "bfloat16", "float16", "checkpoint")),
    Option("device", str, "auto", "cuda | cpu | cuda:N | auto"),
    Option("layers", LAYERS, "last", "'last', 'all', or hidden_states indices "
           "(0,13,-1 on the command line; [0, 13, -1] in a config)"),
    Option("limit", int, None, "only the first N samples"),
    Option("resume", bool, False, "keep finished shards, do the rest"),
    Option("revision", str, None, "hub revision (commit, tag or branch)"),
    Option("split_modalities", bool, False, "also write feats_A_img.pt (image tokens) and "
           "feats_A_txt.pt (the task's tokens) from the same forward"),
    Option("action_repr", bool, False, "also write feats_action.pt, the action stream's "
           "representation (families with an action stream only)"),
)


def parse_layers(value) -> str | list[int]:
    """'last' | 'all' | [int, ...] from a flag's text or a config's list: parsed here only."""
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value) and value:
            return list(value)
        raise HarnessError(f"layers must be a non-empty list of integers, got {value!r}")
    text = str(value).strip()
    if text in ("last", "all"):
        return text
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        out = []
    if not out:
        raise HarnessError(f"layers must be 'last', 'all' or integers (e.g. 0,13,-1), got {value!r}")
    return out


def layers_flag(value) -> str:
    """The command-line text of a parsed layers value ([0, 1] -> '0,1')."""
    parsed = parse_layers(value)
    return parsed if isinstance(parsed, str) else ",".join(map(str, parsed))


def is_tiny(ckpt: str) -> bool:
    return ckpt == "tiny" or ckpt.startswith("tiny:")


def _discover() -> dict[str, FamilySpec]:
    """Every module of harness.extractors that defines SPEC, in a fixed order."""
    import harness.extractors as package

    found: dict[str, FamilySpec] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name in ("engine", "tiny", "standins") or info.name.startswith("_"):
            continue
        spec = getattr(importlib.import_module(f"{package.__name__}.{info.name}"), "SPEC", None)
        if spec is None:
            continue
        if spec.name in found:
            raise RuntimeError(f"two extractor modules declare family {spec.name!r}")
        found[spec.name] = spec
    order = {name: i for i, name in enumerate(PREFERRED_ORDER)}
    return dict(sorted(found.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


PREFERRED_ORDER = ("spatialvla", "pi0_lerobot", "starvla", "hf")
"""Display order of the built-in families in help text; new families follow, by name."""

_FAMILIES: dict[str, FamilySpec] | None = None


def families() -> dict[str, FamilySpec]:
    """name -> FamilySpec of every registered family (discovered once)."""
    global _FAMILIES
    if _FAMILIES is None:
        _FAMILIES = _discover()
    return _FAMILIES


def get(name: str) -> FamilySpec:
    specs = families()
    if name not in specs:
        raise HarnessError(f"unknown family {name!r}; known: {', '.join(specs)}")
    return specs[name]


def final_norm_paths() -> dict[str, tuple[str, ...]]:
    """model_type -> final-norm module paths, merged over every family."""
    out: dict[str, tuple[str, ...]] = {}
    for spec in families().values():
        for model_type, paths in spec.final_norm_paths.items():
            out.setdefault(model_type, paths)
    return out


def options_markdown() -> str:
    """The options table of every family, as docs/families.md shows it (a test keeps the
    page equal to this): `python -c "from harness.extractors.engine.registry import
    options_markdown; print(options_markdown())"`."""
    def cell(o: Option) -> str:
        kind = {int: "int", float: "float", str: "str", bool: "bool", list: "list of str",
                LAYERS: "layers"}[o.type]
        choices = f" ({' / '.join(map(str, o.choices))})" if o.choices else ""
        default = "" if o.default in (None, [], False) else f"`{o.default}`"
        what = o.help.replace("|", "\\|")
        return f"| `{o.name}` | {kind}{choices} | {default} | {what} |"

    lines = ["All families: `--ckpt`, `--data_dir`, `--output_dir`, and", "",
             "| option | type | default | what |", "|---|---|---|---|"]
    lines += [cell(o) for o in COMMON_OPTIONS]
    for spec in families().values():
        ckpt = f"`{spec.default_ckpt}`" if spec.default_ckpt else "none (required)"
        lines += ["", f"`{spec.name}`: {spec.help}. Default checkpoint: {ckpt}; stand-in: "
                  f"{spec.stand_in_help}.", ""]
        if spec.options:
            lines += ["| option | type | default | what |", "|---|---|---|---|"]
            lines += [cell(o) for o in spec.options]
        else:
            lines.append("No options of its own.")
    return "\n".join(lines) + "\n"
