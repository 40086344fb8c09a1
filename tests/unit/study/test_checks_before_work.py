"""Issue 21, point 5: problems that used to slip past the checks before work.

- a model asking for a CUDA device its interpreter does not have is a config problem
  (exit 2, nothing written), not an error buried in extract.log;
- k_values beyond N are listed together with the schema's problems and the paths';
- `data synth` into a folder it cannot write: one line, exit 2. Tests run as root here,
  and root writes into a chmod 0555 folder anyway, so that case runs the command with
  CAP_DAC_OVERRIDE dropped (util-linux `setpriv`), where the kernel really refuses; a
  folder under /proc is refused to everyone."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.data.synth import generate

ROOT = Path(__file__).resolve().parents[3]
N = 12


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "d"
    generate(root, n=N, seed=1, horizon_max=0)
    return root


def run_config(tmp_path, text: str, capsys) -> tuple[int, list[str]]:
    cfg = tmp_path / "study.toml"
    cfg.write_text(text)
    code = main(["run", str(cfg)])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    return code, err


def test_a_cuda_device_that_is_not_there_is_a_config_problem(tmp_path, data_dir, capsys):
    device = f"cuda:{torch.cuda.device_count()}"  # one past the last: absent on any machine
    code, err = run_config(tmp_path, f'data_dir = "{data_dir}"\noutput_dir = "out"\nk_values = [2]\n'
                           '[[models]]\nname = "m"\nfamily = "hf"\nckpt = "tiny:paligemma"\n'
                           f'options = {{ device = "{device}" }}\n', capsys)
    assert code == 2 and len(err) == 1, err
    assert f"models[0] ('m').options.device = '{device}'" in err[0] and sys.executable in err[0]
    assert not (tmp_path / "out").exists()  # refused before any extraction


def test_k_beyond_n_is_listed_with_the_schema_problems(tmp_path, data_dir, capsys):
    code, err = run_config(tmp_path, f'data_dir = "{data_dir}"\nk_values = [5, 100]\n'
                           'permutations = -5\n[[models]]\nname = "m"\nfamily = "hf"\n'
                           'ckpt = "tiny:paligemma"\noptions = { batchsize = 2 }\n', capsys)
    assert code == 2 and len(err) == 1, err
    assert "3 problem(s)" in err[0], err
    assert "permutations" in err[0] and "batchsize" in err[0]
    assert f"k_values[1] = 100: must be in [1, N-1] = [1, {N - 1}]" in err[0]


def test_k_beyond_n_is_listed_with_the_path_problems(tmp_path, data_dir, capsys):
    code, err = run_config(tmp_path, f'data_dir = "{data_dir}"\nk_values = [100]\n'
                           '[[models]]\nname = "m"\nfamily = "hf"\nckpt = "/no/such/ckpt"\n',
                           capsys)
    assert code == 2 and len(err) == 1 and "2 problem(s)" in err[0], err
    assert "/no/such/ckpt: no such path" in err[0] and "k_values[0] = 100" in err[0]


def synth(target: Path, *prefix: str) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "harness", "data", "synth", str(target),
                           "--n", "6"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def assert_one_line_exit_2(done: subprocess.CompletedProcess, target: Path) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness data: error: "), done.stderr
    assert str(target) in lines[0]


def test_data_synth_under_proc_is_one_line_exit_2():
    assert_one_line_exit_2(synth(Path("/proc/harness-synth")), Path("/proc/harness-synth"))


def test_data_synth_into_a_read_only_folder_is_one_line_exit_2(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    folder.chmod(0o555)
    if os.geteuid() != 0:
        prefix = ()
    elif shutil.which("setpriv"):  # root without the capability to ignore file modes
        prefix = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner")
    else:
        pytest.skip("running as root without setpriv: a 0555 folder does not stop root")
    done = synth(folder / "data", *prefix)
    assert_one_line_exit_2(done, folder / "data")
    assert list(folder.iterdir()) == []
