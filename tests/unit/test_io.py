"""`harness.io`: atomic writes leave the old file on failure; feature files in every
supported format read to the same float matrix; bad files are named."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from harness import io
from harness.errors import HarnessError

X = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 7


def test_atomic_path_keeps_the_old_file_when_the_block_fails(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_write_json_and_text_create_parents(tmp_path):
    io.write_json(tmp_path / "a" / "r.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "a" / "r.json").read_text()) == {"k": [1, 2]}
    io.write_text(tmp_path / "b" / "t.md", "hi\n")
    assert (tmp_path / "b" / "t.md").read_text() == "hi\n"


def test_save_tensor_gives_the_same_bytes_for_the_same_tensor(tmp_path):
    io.save_tensor(tmp_path / "a.pt", X)
    io.save_tensor(tmp_path / "b.pt", X.clone())
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True), X)


def test_every_format_reads_to_the_same_matrix(tmp_path):
    from safetensors.torch import save_file
    torch.save(X, tmp_path / "t.pt")
    torch.save({"feats": X, "other": 1}, tmp_path / "d.pth")
    np.save(tmp_path / "n.npy", X.double().numpy())
    save_file({"feats": X, "extra": X[:1].clone()}, str(tmp_path / "s.safetensors"))
    save_file({"whatever": X}, str(tmp_path / "one.safetensors"))
    np.save(tmp_path / "i.npy", np.arange(12, dtype=np.int64).reshape(4, 3))
    for name in ("t.pt", "d.pth", "n.npy", "s.safetensors", "one.safetensors"):
        out = io.load_features(tmp_path / name)
        assert out.dtype == torch.float32 and torch.equal(out, X), name
    assert torch.equal(io.load_features(tmp_path / "i.npy"), torch.arange(12.0).reshape(4, 3))


@pytest.mark.parametrize("make,needle", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(b"not a torch file"), "is a text file; expected"),
    (lambda p: torch.save({"x": X}, p), "no 'feats' key"),
    (lambda p: torch.save(X[0], p), "expected a 2-D"),
    (lambda p: torch.save(torch.ones(3, 2, dtype=torch.bool), p), "expected numbers"),
    (lambda p: torch.save(torch.tensor([[1.0, float("nan")], [1.0, 2.0]]), p), "1 rows contain NaN"),
    (lambda p: torch.save(torch.tensor([[1.0, 2.0], [float("-inf"), 2.0], [3.0, float("inf")]]), p),
     r"2 rows contain NaN/Inf \(first rows \[1, 2\]\)"),
])
def test_bad_feature_files_are_named(tmp_path, make, needle):
    path = tmp_path / "f.pt"
    make(path)
    with pytest.raises(HarnessError, match=needle) as info:
        io.load_features(path)
    assert str(path) in str(info.value)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text("1,2\n")
    with pytest.raises(HarnessError, match="unsupported suffix"):
        io.load_features(path)
