"""The family registry is the one declaration: `extract` flags, `--help` and the config's
`options` schema list the same options, with the same defaults, for every family."""
from __future__ import annotations

import argparse

import pytest

from harness.study import config
from harness.cli import build_parser, main
from harness.extractors.engine import registry

NOT_OPTIONS = {"help", "ckpt", "data_dir", "output_dir",  # per-run arguments, not options
               "threads",  # per process; a study's `threads` is top-level (README, Threads)
               "resume_from", "save_every"}  # the seed's flags: parsed only to be refused


def _family_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    extract = next(a for a in parser._subparsers._group_actions[0].choices.items()
                   if a[0] == "extract")[1]
    sub = next(a for a in extract._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_the_builtin_families_are_registered():
    names = list(registry.families())
    assert names[:4] == ["spatialvla", "pi0_lerobot", "starvla", "hf"]  # PREFERRED_ORDER first
    assert {"openvla", "smolvla", "pi05", "pi0_fast", "groot"} <= set(names[4:])  # later (issue 20)
    for spec in registry.families().values():
        assert spec.help and spec.stand_in and spec.demo and spec.final_norm_paths


@pytest.mark.parametrize("family", list(registry.families()))
def test_cli_flags_and_config_options_are_the_same(family):
    p = _family_parsers()[family]
    flags = {a.dest: a.default for a in p._actions if a.dest not in NOT_OPTIONS}
    schema = config.options_model(family).model_fields
    assert list(flags) == list(schema)
    for name, field in schema.items():
        assert flags[name] == field.default, name


@pytest.mark.parametrize("family", list(registry.families()))
def test_help_lists_every_schema_option(family, capsys):
    with pytest.raises(SystemExit):
        main(["extract", family, "--help"])
    text = capsys.readouterr().out
    for name in config.option_names(family):
        assert f"--{name}" in text, name


@pytest.mark.parametrize("value,parsed", [("last", "last"), ("all", "all"), ("0, 13,-1", [0, 13, -1]),
                                          ([0, 1], [0, 1]), ("3", [3])])
def test_layers_parse_the_same_from_a_flag_or_a_list(value, parsed):
    assert registry.parse_layers(value) == parsed


@pytest.mark.parametrize("value", ["middle", "", [], [0, "1"], [True]])
def test_bad_layers_are_refused(value):
    with pytest.raises(registry.HarnessError):
        registry.parse_layers(value)


def test_final_norm_paths_come_from_the_specs():
    FINAL_NORM_PATHS = registry.final_norm_paths()
    assert FINAL_NORM_PATHS["paligemma"][0] == "model.language_model.norm"
    assert set(FINAL_NORM_PATHS) >= {"gemma", "gemma2", "paligemma", "paligemma2",
                                     "qwen2_5_vl", "qwen3_vl"}


def test_docs_options_table_is_generated_from_the_registry():
    from pathlib import Path
    page = (Path(__file__).resolve().parents[3] / "docs" / "families.md").read_text()
    start = page.index("-->\n", page.index("<!-- options table")) + len("-->\n")
    end = page.index("<!-- end of options table -->")
    assert page[start:end].strip() == registry.options_markdown().strip()
