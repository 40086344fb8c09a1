"""The study config's typed schema (pydantic v2), checked before any work starts.

One declaration per key: a new top-level key is one field of `StudyConfig`. Each model's
`options` table is checked against its family's options, built from the same registry
declaration as the `extract` flags (`harness.extractors.engine.registry`). Every problem is
reported at once, with its TOML location (`models[1].options.batchsize`) and, for an
unknown key, the closest known one.
"""
from __future__ import annotations

import difflib
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, PlainValidator, ConfigDict, Field, StrictInt, StrictStr,
                      ValidationError, create_model, field_validator, model_validator)

from harness.errors import HarnessError
from harness.extractors.engine.registry import LAYERS, FamilySpec, Option, families, layers_flag

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

LaxPath = Annotated[Path, Field(strict=False)]


class _Strict(BaseModel):
    """No string read as a number or a boolean; no unknown key."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ModelEntry(_Strict):
    """One [[models]] row: extract with `family`/`ckpt` (+ `options`), or reuse `feats`."""

    name: StrictStr
    family: Optional[StrictStr] = None
    ckpt: Optional[StrictStr] = None
    feats: Optional[LaxPath] = None
    python: StrictStr = Field(default_factory=lambda: sys.executable)
    options: dict[str, Any] = Field(default_factory=dict)
    # e.g. its SimplerEnv WidowX success; the report correlates CKNNA with it across models
    success_rate: Optional[Annotated[float, Field(ge=0, le=1)]] = None

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"{name!r} is not a folder name (no '/', no leading '.')")
        return name

    @field_validator("family")
    @classmethod
    def _known_family(cls, family: str | None) -> str | None:
        if family is not None and family not in families():
            raise ValueError(f"unknown family {family!r}{_suggest(family, families())}; "
                             f"known: {', '.join(families())} (or give feats = PATH)")
        return family

    @model_validator(mode="after")
    def _extract_or_reuse(self) -> "ModelEntry":
        if self.feats is not None:
            given = [k for k in ("family", "ckpt", "options") if k in self.model_fields_set]
            if given:
                raise ValueError(f"feats reuses features computed elsewhere; drop {given}")
        elif self.family is None or not self.ckpt:
            raise ValueError("needs family and ckpt (a hub id, a local path, or a stand-in "
                             "such as 'tiny'), or feats = PATH")
        return self

    def request(self, fingerprint: str) -> dict:
        """What features made for this entry depend on; equal requests reuse features."""
        return {"family": self.family, "ckpt": self.ckpt, "options": self.options,
                "dataset_fingerprint": fingerprint}


class StudyConfig(_Strict):
    """The keys a study config may hold (README, "run: the whole study")."""

    data_dir: LaxPath
    output_dir: LaxPath = Path("harness_out/study")
    k_values: Annotated[list[Annotated[StrictInt, Field(ge=1)]], Field(min_length=1)] = [5, 10, 20]
    permutations: Annotated[StrictInt, Field(ge=0)] = 200
    seed: StrictInt = 0
    zscore_states: bool = False
    drop_empty_tasks: bool = False
    group_by: Literal["episode", "none"] = "episode"  # per-sample groups from metadata
    compare: bool = False  # paired model comparisons on shared subsets
    # CKNNA against states t..t+a when data_dir has feats_B_seq.pt; None: 0,1,2,4,8 up to H
    horizons: Optional[list[Annotated[StrictInt, Field(ge=0)]]] = None
    # torch threads; None: chosen from the CPUs free to this process (harness.threads)
    threads: Optional[Annotated[StrictInt, Field(ge=1)]] = None
    models: Annotated[list[ModelEntry], Field(min_length=1)]

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelEntry]) -> list[ModelEntry]:
        names = [m.name for m in models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names used twice: {dupes}")
        return models


# ------------------------------------------------------------------ family options

def _layers_value(value):
    try:
        return layers_flag(value)
    except HarnessError as err:
        raise ValueError(str(err)) from None


def _annotation(o: Option):
    if o.type is LAYERS:
        return Annotated[Union[StrictStr, list[StrictInt]], PlainValidator(_layers_value)]
    if o.choices:
        kind = Literal[tuple(o.choices)]
    else:
        kind = {int: StrictInt, float: float, str: StrictStr, bool: bool, list: list[StrictStr]}[o.type]
    return Optional[kind] if o.default is None else kind


@lru_cache(maxsize=None)
def options_model(family: str) -> type[BaseModel]:
    """The typed `options` table of one family: the registry's common + family options."""
    spec: FamilySpec = families()[family]
    fields = {o.name: (_annotation(o), o.default) for o in spec.option_fields()}
    return create_model(f"{family}_options", __base__=_Strict, **fields)


def option_names(family: str) -> list[str]:
    return list(options_model(family).model_fields)


# ------------------------------------------------------------------ loading

def _suggest(word: str, known) -> str:
    close = difflib.get_close_matches(str(word), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _known_at(parent: tuple, raw: dict) -> list[str]:
    if not parent:
        return list(StudyConfig.model_fields)
    if len(parent) == 2 and parent[0] == "models":
        return list(ModelEntry.model_fields)
    return []


def _problems(err: ValidationError, prefix: tuple, known) -> list[str]:
    out = []
    for e in err.errors():
        loc = prefix + tuple(p for p in e["loc"] if not (isinstance(p, str) and "[" in p))
        if e["type"] == "extra_forbidden":
            key = loc[-1]
            out.append(f"{_where(loc)}: unknown key{_suggest(key, known(loc[:-1]))}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        given = "" if e["type"] in ("missing", "value_error") else f" (got {e['input']!r})"
        out.append(f"{_where(loc)}: {msg}{given}")
    return out


def parse(raw: dict) -> tuple[StudyConfig | None, list[str]]:
    """(config, []) or (None, every problem with its TOML location)."""
    problems: list[str] = []
    config = None
    try:
        config = StudyConfig.model_validate(raw)
    except ValidationError as err:
        problems += _problems(err, (), lambda parent: _known_at(parent, raw))
    entries = raw.get("models") if isinstance(raw.get("models"), list) else []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("family") not in families():
            continue
        options = entry.get("options", {})
        if not isinstance(options, dict):
            continue  # already reported by StudyConfig
        model = options_model(entry["family"])
        try:
            checked = model.model_validate(options)
        except ValidationError as err:
            problems += _problems(err, ("models", i, "options"), lambda _p: list(model.model_fields))
            continue
        if getattr(checked, "action_repr", False) and not families()[entry["family"]].action_stream:
            problems.append(f"models[{i}].options.action_repr: family {entry['family']!r} has "
                            "no action stream to read")
            continue
        if config is not None:
            config.models[i].options = checked.model_dump(exclude_unset=True)
    return (None if problems else config), problems


class ConfigError(HarnessError):
    """Schema problems, with the raw table, so a caller can add the problems it can
    still find (`k_values` against the data's N) and report them all at once."""

    def __init__(self, message: str, problems: list[str], raw: dict):
        super().__init__(message)
        self.problems, self.raw = problems, raw


def load(path: str | os.PathLike) -> StudyConfig:
    """Read, type-check and resolve (paths relative to the file) a study config."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: config file not found")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise HarnessError(f"{path}: not valid TOML ({err})") from None
    config, problems = parse(raw)
    if problems:
        raise ConfigError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems),
                          problems, raw)
    base = path.resolve().parent

    def resolve(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else base / p

    config.data_dir, config.output_dir = resolve(config.data_dir), resolve(config.output_dir)
    for m in config.models:
        if m.feats is not None:
            m.feats = resolve(m.feats)
    return config
