"""Issue 9: each bad study config exits 2 before any extraction, naming the key; a TOML
list of layers runs. Drives `python -m harness run CONFIG` in a fresh interpreter."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.data.synth import generate

ROOT = Path(__file__).resolve().parents[2]
N = 60
GOOD = {"name": "paligemma", "family": "hf", "ckpt": "tiny:paligemma"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "d"
    generate(root, n=N, seed=5, progress=False)
    return root


def toml_value(v) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


def run_config(tmp_path: Path, data_dir: Path, top: dict, model: dict) -> subprocess.CompletedProcess:
    lines = [f'data_dir = "{data_dir}"', 'output_dir = "out"']
    lines += [f"{k} = {toml_value(v)}" for k, v in top.items()]
    lines += ["[[models]]"] + [f"{k} = {toml_value(v)}" for k, v in model.items()]
    cfg = tmp_path / "study.toml"
    cfg.write_text("\n".join(lines) + "\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "harness", "run", str(cfg)], cwd=tmp_path,
                          env=env, capture_output=True, text=True)


BAD = [  # (top-level keys, model options, the key the error must name, words it must hold)
    ({"k_values": [5, 100]}, {}, "k_values[1]", "[1, 59]"),
    ({"k_values": "5"}, {}, "k_values", "valid list"),
    ({"permutations": -5}, {}, "permutations", "greater than or equal to 0"),
    ({"zscore_states": "false"}, {}, "zscore_states", "valid boolean"),
    ({}, {"batchsize": 4}, "models[0].options.batchsize", "did you mean 'batch_size'"),
    ({}, {"layers": "middle"}, "models[0].options.layers", "'last', 'all'"),
    ({"horizons": [0, 20]}, {}, "horizons[1] = 20", "beyond H = 10"),
    ({"horizons": [-1]}, {}, "horizons[0]", "greater than or equal to 0"),
]


@pytest.mark.parametrize("top,options,key,words", BAD, ids=[b[2] for b in BAD])
def test_bad_config_exits_2_before_any_extraction(tmp_path, data_dir, top, options, key, words):
    model = dict(GOOD, options=options) if options else GOOD
    proc = run_config(tmp_path, data_dir, {"permutations": 5, **top}, model)
    assert proc.returncode == 2, proc.stderr
    err = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("harness run: error: "), proc.stderr
    assert key in err[0] and words in err[0] and "study.toml" in err[0], err
    assert not (tmp_path / "out").exists()  # no features dir, no extract.log


def test_a_zero_state_row_exits_2_before_any_extraction(tmp_path, data_dir):
    import shutil
    copy = tmp_path / "d"
    shutil.copytree(data_dir, copy)
    states = torch.load(copy / "feats_B.pt", weights_only=True)
    states[17] = 0
    torch.save(states, copy / "feats_B.pt")
    proc = run_config(tmp_path, copy, {"permutations": 5}, GOOD)
    assert proc.returncode == 2, proc.stderr
    assert "all-zero rows" in proc.stderr and "[17]" in proc.stderr
    assert not (tmp_path / "out" / "features").exists()


def test_every_problem_is_listed_at_once(tmp_path, data_dir):
    proc = run_config(tmp_path, data_dir, {"permutations": -1, "zscore_states": "no", "seeed": 1},
                      dict(GOOD, options={"batchsize": 4, "tokens": "al"}))
    assert proc.returncode == 2
    err = proc.stderr
    for key in ("permutations", "zscore_states", "seeed", "did you mean 'seed'",
                "models[0].options.batchsize", "models[0].options.tokens"):
        assert key in err, key
    assert "5 problem(s)" in err


def test_a_toml_list_of_layers_runs(tmp_path, data_dir):
    proc = run_config(tmp_path, data_dir, {"permutations": 5, "k_values": [5]},
                      dict(GOOD, options={"layers": [0, 1]}))
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    meta = json.loads((out / "features" / "paligemma" / "extraction_metadata.json").read_text())
    assert meta["layers"] == [0, 1]
    assert meta["layer_files"] == ["feats_A.pt", "feats_A_layer0.pt", "feats_A_layer1.pt"]
    res = json.loads((out / "results.json").read_text())
    assert set(res["layers"]["paligemma"]) == {"0", "1"}


def test_extract_and_run_check_their_output_dirs_first(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    bad = str(tmp_path / "afile" / "out")
    assert main(["extract", "hf", "--ckpt", "tiny", "--data_dir", str(tmp_path / "nodata"),
                 "--output_dir", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--output_dir" in err[0] and "afile is a file" in err[0], err
    assert main(["run", "--output_dir", bad]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "output_dir" in err[0] and "afile is a file" in err[0], err
    assert not (tmp_path / "nodata").exists()
