"""`extract` argument handling that needs no model: the seed scripts' flag spellings,
layers and dtype resolution."""
from __future__ import annotations

import pytest

from harness.cli import build_parser
from harness.commands.extract import parse_layers, resolve_dtype
from harness.errors import HarnessError


def test_seed_flag_spellings():
    parser = build_parser()
    args = parser.parse_args(["extract", "pi0_lerobot", "--ckpt_path", "HaomingSong/lerobot-pi0-bridge",
                              "--data_dir", "d", "--output_dir", "o"])
    assert args.ckpt == "HaomingSong/lerobot-pi0-bridge"
    args = parser.parse_args(["extract", "spatialvla", "--data-dir", "d", "--output-dir", "o"])
    assert args.ckpt == "IPEC-COMMUNITY/spatialvla-4b-224-sft-bridge"
    assert args.unnorm_key == "bridge_orig/1.0.0"
    with pytest.raises(SystemExit):  # starvla has no default checkpoint
        parser.parse_args(["extract", "starvla", "--data_dir", "d", "--output_dir", "o"])


def test_layers_and_dtype_parsing():
    assert parse_layers("last") == "last" and parse_layers("all") == "all"
    assert parse_layers("0, 13,-1") == [0, 13, -1]
    with pytest.raises(HarnessError):
        parse_layers("middle")
    assert resolve_dtype("auto", tiny=True, family="spatialvla") == "float32"
    assert resolve_dtype("auto", tiny=False, family="spatialvla") == "bfloat16"
    assert resolve_dtype("auto", tiny=False, family="pi0_lerobot") is None  # checkpoint's own
    assert resolve_dtype("float16", tiny=False, family="starvla") == "float16"


@pytest.mark.parametrize("dtype", ["bf16", "float8", "int8"])
def test_a_dtype_outside_the_family_schema_is_one_line(dtype, tmp_path, capsys):
    """Allowed values come from the registry's option declaration; no traceback, no usage."""
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["extract", "hf", "--dtype", dtype, "--ckpt", "tiny",
                                   "--data_dir", str(tmp_path),
                                   "--output_dir", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"invalid choice: '{dtype}'" in err[0] and "bfloat16" in err[0] and "float32" in err[0]
    assert not (tmp_path / "out").exists()

