"""Issue 21, point 1: one writer per output folder. A second `extract` or `run` into a
folder in use is refused at once with one line naming the holder's PID and host (exit 2);
a lock left by a killed process is taken over."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.locks import LOCK_FILE, output_lock

ROOT = Path(__file__).resolve().parents[2]
HOLD = textwrap.dedent("""
    import sys, time
    from harness.locks import output_lock
    with output_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """A separate process holding the lock of tmp_path/'out' (killed at the end)."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "locked"
    yield out, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), HARNESS_THREADS="1"))


def test_a_second_extract_into_a_locked_folder_is_refused_naming_the_holder(holder, tmp_path):
    out, proc = holder
    # refused before any data or model is loaded
    done = cli("extract", "hf", "--data_dir", str(tmp_path / "no-data"), "--output_dir", str(out),
               "--ckpt", "tiny")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"PID {proc.pid} on host {socket.gethostname()}" in lines[0] and str(out) in lines[0]
    assert lines[0].startswith("harness extract: error: --output_dir")


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(holder, tmp_path):
    from harness.data.synth import generate
    out, proc = holder
    generate(tmp_path / "data", n=12, seed=0, horizon_max=0)
    cfg = tmp_path / "study.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\noutput_dir = "{out}"\nk_values = [2]\n'
                   '[[models]]\nname = "m"\nfamily = "hf"\nckpt = "tiny:paligemma"\n')
    done = cli("run", str(cfg))
    assert done.returncode == 2, done.stderr
    err = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(err) == 1 and f"PID {proc.pid} on host {socket.gethostname()}" in err[0], done.stderr
    assert not (out / "features").exists()  # nothing was written beside the holder


def test_a_lock_left_by_a_killed_process_is_taken_over(holder):
    out, proc = holder
    with pytest.raises(HarnessError, match=f"PID {proc.pid}"):
        with output_lock(out):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == proc.pid  # left behind
    notes = []
    with output_lock(out, note=notes.append):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert len(notes) == 1 and f"PID {proc.pid}" in notes[0] and "gone" in notes[0]
    assert not (out / LOCK_FILE).exists()


def test_the_lock_leaves_no_trace_and_is_free_again(tmp_path):
    with output_lock(tmp_path / "new" / "out"):
        assert (tmp_path / "new" / "out" / LOCK_FILE).is_file()
    assert not (tmp_path / "new" / "out").exists()  # made by the lock, left empty: removed
    (tmp_path / "kept").mkdir()
    with output_lock(tmp_path / "kept"):
        (tmp_path / "kept" / "result.txt").write_text("x")
    with output_lock(tmp_path / "kept"):
        pass
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["result.txt"]
