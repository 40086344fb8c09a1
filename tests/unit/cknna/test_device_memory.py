"""Block sizes from free memory, the CUDA path tested on CPU: torch.cuda's queries are
replaced by a simulated card with little or lots of free memory."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import harness.cknna.knn as knn_mod
from harness.cknna import device_memory as dm
from harness.commands import resolve_device
from harness.errors import HarnessError
from harness.cknna.knn import knn
from tests.unit.cknna.test_knn import by_the_rule, tied_data

CUDA = torch.device("cuda")
GIB = 1 << 30


@pytest.fixture
def fake_cuda(monkeypatch):
    """`fake_cuda(free, cached=0, count=1)`: torch.cuda reports a card with `free` bytes
    free on the device and `cached` bytes reserved by the allocator but unused."""
    def simulate(free: int, cached: int = 0, count: int = 1):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GIB))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: cached + 5)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 5)
    return simulate


# ------------------------------------------------------------ the budget itself


def test_cpu_keeps_the_callers_fixed_budget(fake_cuda):
    fake_cuda(free=1)  # a nearly full card must not shrink CPU blocks
    assert dm.block_elements("cpu", 12345, 32) == 12345
    assert dm.block_elements(torch.device("cpu"), knn_mod.ROW_BLOCK_ELEMENTS, 32) == 1 << 22


@given(free=st.integers(0, 200 * GIB), bpe=st.integers(1, 64))
def test_cuda_budget_fits_free_memory_within_floor_and_cap(free, bpe):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 200 * GIB))
        mp.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
        mp.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
        got = dm.block_elements(CUDA, 7, bpe)
    allowed = free * dm.FREE_FRACTION
    assert dm.MIN_ELEMENTS <= got <= dm.CUDA_MAX_ELEMENTS
    if got > dm.MIN_ELEMENTS:  # above the floor it fits the share of free memory ...
        assert got * bpe <= allowed
    if got < dm.CUDA_MAX_ELEMENTS:  # ... and below the cap it is the largest that fits
        assert (got + 1) * bpe > allowed or got == dm.MIN_ELEMENTS


def test_lots_of_free_memory_hits_the_cap(fake_cuda):
    fake_cuda(free=78 * GIB)
    assert dm.block_elements(CUDA, 1 << 24, 32) == dm.CUDA_MAX_ELEMENTS


def test_little_free_memory_gives_a_smaller_block_than_cpu(fake_cuda):
    fake_cuda(free=256 << 20)  # 256 MiB: half of it over 32 bytes an element is 4 M
    got = dm.block_elements(CUDA, 1 << 24, 32)
    assert got == int((256 << 20) * dm.FREE_FRACTION) // 32 < 1 << 24


def test_tiny_free_memory_gives_the_minimum(fake_cuda):
    fake_cuda(free=1024)
    assert dm.block_elements(CUDA, 1 << 24, 32) == dm.MIN_ELEMENTS


def test_memory_cached_by_the_allocator_counts_as_free(fake_cuda):
    fake_cuda(free=0, cached=GIB)
    cached_only = dm.block_elements(CUDA, 1, 4)
    fake_cuda(free=GIB)
    assert cached_only == dm.block_elements(CUDA, 1, 4) > dm.MIN_ELEMENTS


def test_cuda_without_cuda_and_bad_arguments_are_clear_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="cuda.*not available"):
        dm.block_elements(CUDA, 1, 4)
    with pytest.raises(ValueError, match="cpu_elements"):
        dm.block_elements("cpu", 0, 4)
    with pytest.raises(ValueError, match="bytes_per_element"):
        dm.block_elements("cpu", 1, 0)


# ------------------------------------------------------------ the kNN search's blocks


@pytest.fixture
def gram_shapes(monkeypatch):
    """Shapes of the Gram blocks the search reduces (a spy on its top-k)."""
    shapes = []
    real = knn_mod._block_topk

    def spy(gram, k):
        shapes.append(tuple(gram.shape))
        return real(gram, k)
    monkeypatch.setattr(knn_mod, "_block_topk", spy)
    return shapes


def as_if_on_cuda(monkeypatch):
    """The search's budget as the simulated card gives it, for data that stay on CPU, and
    its per-block torch top-k (the compiled running top-k is CPU only)."""
    monkeypatch.setattr(knn_mod, "block_elements",
                        lambda device, cpu, bpe: dm.block_elements(CUDA, cpu, bpe))
    monkeypatch.setattr(knn_mod, "_top_k", knn_mod._BlockTopK)


@pytest.mark.parametrize("free", [1024, 8 << 20, 78 * GIB])
def test_search_blocks_follow_free_memory_and_results_do_not_change(
        fake_cuda, gram_shapes, monkeypatch, free):
    x, n, k = tied_data(11, n=600, d=3), 600, 7
    on_cpu = {s: knn(x, k, strategy=s) for s in ("rows", "symmetric")}
    fake_cuda(free=free)
    as_if_on_cuda(monkeypatch)
    share = free * dm.FREE_FRACTION  # bytes one block may use
    allowed = max(dm.MIN_ELEMENTS, min(int(share) // knn_mod.GRAM_BYTES_PER_ELEMENT,
                                       dm.CUDA_MAX_ELEMENTS))
    for strategy in ("rows", "symmetric"):
        gram_shapes.clear()
        got = knn(x, k, strategy=strategy)
        assert torch.equal(got.indices, by_the_rule(x, k))
        assert torch.equal(got.indices, on_cpu[strategy].indices)
        assert torch.equal(got.values, on_cpu[strategy].values)
        rows = min(n, allowed // n) if strategy == "rows" else min(n, math.isqrt(allowed))
        assert gram_shapes[0] == ((rows, n) if strategy == "rows" else (rows, rows))
        for r, c in gram_shapes:  # within free memory's share, or the floor
            assert r * c * knn_mod.GRAM_BYTES_PER_ELEMENT <= share or r * c <= dm.MIN_ELEMENTS
        if free == 1024:  # the floor still gives blocks of many rows
            assert rows >= dm.MIN_ELEMENTS // n > 100


@pytest.mark.parametrize("strategy", ["rows", "symmetric"])
def test_block_size_never_changes_the_neighbours_on_tie_heavy_data(strategy):
    """Small-integer rows: exact duplicates and equal products everywhere, computed exactly
    in float32, so every block size must give the same lists, values and all."""
    x = tied_data(7, n=90, d=2)
    groups = torch.arange(90) // 4
    for g in (None, groups):
        runs = [knn(x, 13, strategy=strategy, block_rows=b, groups=g) for b in (1, 5, 32, 89, 500)]
        for nb in runs[1:]:
            assert torch.equal(nb.indices, runs[0].indices)
            assert torch.equal(nb.values, runs[0].values)


# ------------------------------------------------------------ --device


def test_resolve_device_auto_follows_cuda(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    fake_cuda(free=GIB)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name, needle", [("gpu", "not a device name"), ("cuda:3", "cuda:0")])
def test_resolve_device_rejects_bad_names_and_missing_cards(fake_cuda, name, needle):
    fake_cuda(free=GIB, count=2)
    with pytest.raises(HarnessError, match=f"--device '?{name}'?: .*{needle}"):
        resolve_device(name)


def test_resolve_device_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(HarnessError, match="--device cuda: CUDA is not available"):
        resolve_device("cuda")


def test_cknna_device_cuda_without_cuda_exits_2_with_one_line(tmp_path):
    """The real command line, in a process where CUDA is hidden (as on a CPU machine)."""
    (tmp_path / "m").mkdir()
    torch.save(torch.randn(20, 5), tmp_path / "m" / "feats_A.pt")
    torch.save(torch.randn(20, 3), tmp_path / "b.pt")
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "cknna", "--feats_A", str(tmp_path / "m" / "feats_A.pt"),
         "--feats_B", str(tmp_path / "b.pt"), "--device", "cuda", "--output",
         str(tmp_path / "r.json")],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root), "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device cuda" in lines[0] and "CUDA" in lines[0], lines
    assert not (tmp_path / "r.json").exists()
