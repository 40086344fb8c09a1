"""What a researcher gets on disk: shareable modes, strict JSON, output paths checked
before any work, and one-line read errors that say what a file is."""
import json
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import io
from harness.cli import main
from harness.errors import HarnessError

pytestmark = pytest.mark.unit


@pytest.fixture
def umask():
    """Set a umask for the test and restore the old one after it."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755),
                                                       (0o027, 0o640, 0o750),
                                                       (0o077, 0o600, 0o700)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    io.write_json(tmp_path / "a.json", {"x": 1})
    io.write_text(tmp_path / "b.md", "text")
    io.save_tensor(tmp_path / "new" / "c.pt", torch.zeros(2, 2))
    for name in ("a.json", "b.md", "new/c.pt"):
        assert mode(tmp_path / name) == file_mode, name
    assert mode(tmp_path / "new") == dir_mode
    # A plain open() under the same umask gives the same mode (the reference behaviour).
    (tmp_path / "plain").write_text("x")
    assert mode(tmp_path / "plain") == file_mode


def test_synthetic_data_dir_and_cli_outputs_are_shareable(tmp_path, umask):
    from harness.data.synth import generate
    umask(0o022)
    generate(tmp_path / "data", n=12, seed=0, progress=False)
    assert mode(tmp_path / "data") == 0o755
    assert mode(tmp_path / "data" / "feats_B.pt") == 0o644
    (tmp_path / "m").mkdir()
    torch.save(torch.randn(12, 5), tmp_path / "m" / "feats_A.pt")
    assert main(["cknna", "--feats_A", str(tmp_path / "m" / "feats_A.pt"), "--feats_B",
                 str(tmp_path / "data" / "feats_B.pt"), "--topk", "3", "--pairwise",
                 "--heatmap", str(tmp_path / "h.png"), "--output", str(tmp_path / "r.json")]) == 0
    assert mode(tmp_path / "r.json") == mode(tmp_path / "h.png") == 0o644


# ------------------------------------------------------------------ strict JSON


def test_nan_and_inf_are_written_as_null_with_a_warning_beside(tmp_path):
    io.write_json(tmp_path / "r.json", {"a": float("nan"), "b": [1.0, float("inf")],
                                        "c": {"d": float("-inf"), "e": 2.5}}, nan_note="why")
    text = (tmp_path / "r.json").read_text()
    back = json.loads(text, parse_constant=lambda t: pytest.fail(f"non-JSON token {t}"))
    assert back == {"a": None, "a_warning": "nan written as null: why", "b": [1.0, None],
                    "c": {"d": None, "d_warning": "-inf written as null: why", "e": 2.5}}


# ------------------------------------------------------------------ outputs checked first


def test_bad_output_path_fails_before_any_work(tmp_path, monkeypatch, capsys):
    import harness.commands.cknna as cmd

    def no_work(*a, **k):
        raise AssertionError("the metrics ran before the output path was checked")
    monkeypatch.setattr(cmd, "compute", no_work)
    monkeypatch.setattr(cmd, "load_features", no_work)
    (tmp_path / "afile").write_text("I am a file\n")
    cases = {("--output", "afile/x.json"): "afile is a file",
             ("--heatmap", "afile/h.png"): "afile is a file",
             ("--output", "."): "is a directory"}
    for (flag, rel), needle in cases.items():
        argv = ["cknna", "--feats_A", "a.pt", "--feats_B", "b.pt", "--permutations", "20000",
                flag, str(tmp_path / rel)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0] and needle in err[0], err
    assert (tmp_path / "afile").read_text() == "I am a file\n"


def test_unwritable_directory_is_refused(tmp_path, monkeypatch):
    """Root may write anywhere, so the permission answer is simulated: only the decision
    made from it is under test."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked
                        else real_access(p, mode))
    with pytest.raises(HarnessError, match="not writable"):
        io.check_output_file(locked / "sub" / "r.json", "--output")


# ------------------------------------------------------------------ read errors


def unreadable_files(root):
    (root / "text.pt").write_text("hello, this is a text file\n")
    (root / "empty.pt").write_bytes(b"")
    with open(root / "plain.pt", "wb") as f:
        pickle.dump({"feats": [[1.0, 2.0]]}, f)
    torch.save({"feats": np.zeros((4, 2))}, root / "numpy_inside.pt")
    np.save(root / "objects.npy", np.array([{"a": 1}], dtype=object))
    (root / "text.npy").write_text("1,2,3\n")
    (root / "empty.safetensors").write_bytes(b"")
    return {"text.pt": "is a text file", "empty.pt": "is empty (0 bytes)",
            "plain.pt": "is a plain Python pickle", "numpy_inside.pt": "torch archive holding "
            "Python objects other than tensors", "objects.npy": "numpy file of Python objects",
            "text.npy": "is a text file", "empty.safetensors": "is empty"}


def test_read_errors_say_what_the_file_is_and_what_was_expected(tmp_path, capfd):
    for name, needle in unreadable_files(tmp_path).items():
        with pytest.raises(HarnessError) as info:
            io.load_features(tmp_path / name)
        message = str(info.value)
        assert message.startswith(str(tmp_path / name)) and needle in message, message
        assert "expected a" in message and "\n" not in message
        assert "weights_only" not in message and "False" not in message, message
    streams = capfd.readouterr()
    assert "Warning" not in streams.err + streams.out  # torch's pickle warning is silenced


def test_every_tensor_reader_describes_an_unreadable_file(tmp_path):
    """Features, states, future states and groups share one reader: a text file renamed
    .pt is named as such, with what that reader expected."""
    from harness.commands.cknna import load_groups
    from harness.data import future
    from harness.data.check import read_states
    bad = tmp_path / "x.pt"
    bad.write_text("hello\n")
    readers = {"(N, D) tensor": io.load_features, "float (N, 7) tensor": read_states,
               "(N, H+1, D) tensor": lambda p: future.load(p, 3),
               "1-D integer tensor": lambda p: load_groups(p, 3)}
    for expected, read in readers.items():
        with pytest.raises(HarnessError) as info:
            read(bad)
        message = str(info.value)
        assert "x.pt: is a text file; expected" in message and expected in message, message
        assert "weights_only" not in message and "\n" not in message
