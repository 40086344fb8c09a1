"""The compiled running top-k against the tie rule written out in Python (value descending,
lower index first among equal values), whatever the blocks, their order, the buffer's
size and the values (duplicates, +0 and -0, -inf), and the search built on it against
the torch top-k it replaces on CPU."""
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from harness.cknna import knn as knn_module
from harness.cknna import topk_kernels as T

pytestmark = pytest.mark.unit


def by_the_rule(sims: np.ndarray, k: int):
    """Each row's k best (value, index) pairs, sorted in Python by (-value, index)."""
    values, indices = [], []
    for row in sims:
        best = sorted(range(len(row)), key=lambda j: (-float(row[j]), j))[:k]
        values.append([row[j] for j in best])
        indices.append(best)
    return np.array(values, np.float32), np.array(indices, np.int64)


def offered_in_blocks(sims: np.ndarray, k: int, block: int, symmetric: bool, factor: int = 4):
    """`sims` offered as the searches do: row blocks against all columns, or blocks (I, J)
    with J >= I offered for their rows and, transposed, for their columns' rows."""
    n = sims.shape[0]
    top = T.RunningTopK(n, k, factor)
    for s in range(0, n, block):
        if not symmetric:
            top.offer(sims[s:s + block], s, 0)
            continue
        for t in range(s, n, block):
            top.offer(sims[s:s + block, t:t + block], s, t, transposed=t != s)
    return top.result()


def tied_similarities(seed: int, n: int, levels: int) -> np.ndarray:
    """A symmetric matrix of few distinct values (many exact ties), -0 beside +0, and -inf
    on the diagonal as the searches put it."""
    rng = np.random.default_rng(seed)
    upper = rng.integers(-levels, levels + 1, (n, n)).astype(np.float32) / 4
    sims = np.triu(upper, 1) + np.triu(upper, 1).T
    sims[rng.random((n, n)) < 0.1] *= -1  # some values change sign: zeros become -0
    sims = np.triu(sims, 1) + np.triu(sims, 1).T
    np.fill_diagonal(sims, -np.inf)
    return sims.astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 70), k_share=st.floats(0, 1),
       block=st.integers(1, 80), levels=st.integers(0, 6), symmetric=st.booleans(),
       factor=st.integers(2, 5))
@example(seed=0, n=2, k_share=1.0, block=1, levels=0, symmetric=True, factor=2)
def test_lists_follow_the_tie_rule(seed, n, k_share, block, levels, symmetric, factor):
    sims = tied_similarities(seed, n, levels)
    k = 1 + int(k_share * (n - 2))
    values, indices = offered_in_blocks(sims, k, block, symmetric, factor)
    want_values, want_indices = by_the_rule(sims, k)
    assert np.array_equal(indices, want_indices)
    assert np.array_equal(values, want_values)  # -0 and +0 compare equal


def test_negative_zero_ties_with_zero_and_keeps_the_lower_index():
    sims = np.array([[-np.inf, 0.0, -0.0, 0.5, -0.0, 0.0]], np.float32)
    values, indices = offered_in_blocks(np.vstack([sims] * 1), 4, 2, False)
    assert indices.tolist() == [[3, 1, 2, 4]]
    assert values.tolist() == [[0.5, 0.0, 0.0, 0.0]]


def test_a_buffer_of_k_keys_or_fewer_is_refused():
    with pytest.raises(ValueError, match="buffer_factor=1"):
        T.RunningTopK(3, 4, buffer_factor=1)


def test_rows_offered_fewer_than_k_candidates_are_an_error():
    top = T.RunningTopK(3, 4)
    top.offer(np.zeros((3, 3), np.float32), 0, 0)
    with pytest.raises(ValueError, match="fewer than k=4"):
        top.result()


@pytest.mark.parametrize("strategy", ["rows", "symmetric"])
@pytest.mark.parametrize("with_groups", [False, True])
def test_search_lists_equal_the_torch_top_k(strategy, with_groups, monkeypatch):
    """Wide float32 rows with exact duplicates: the compiled lists and the per-block
    torch top-k and merge (what CUDA runs) agree in every index and value."""
    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.normalize(torch.randn(300, 96, generator=g), dim=1)
    x[150:170] = x[:20]  # duplicates: equal similarities everywhere they meet
    groups = torch.arange(300) // 7 if with_groups else None
    compiled = knn_module.knn(x, 40, strategy=strategy, block_rows=64, groups=groups)
    monkeypatch.setattr(knn_module, "_top_k", knn_module._BlockTopK)
    by_torch = knn_module.knn(x, 40, strategy=strategy, block_rows=64, groups=groups)
    assert torch.equal(compiled.indices, by_torch.indices)
    assert torch.equal(compiled.values, by_torch.values)
