"""Blocked exact kNN: the tie rule, block-size independence, self exclusion, FAISS backends."""
import pytest
import torch

from harness.cknna.knn import Neighbours, knn, recall


def by_the_rule(x, k):
    """Brute force in Python: sort others by (-similarity, index)."""
    gram = (x.double() @ x.double().T).tolist()
    rows = []
    for i, row in enumerate(gram):
        others = sorted((-v, j) for j, v in enumerate(row) if j != i)
        rows.append([j for _, j in others[:k]])
    return torch.tensor(rows)


def tied_data(seed, n=40, d=3):
    """Small-integer vectors: many exact duplicates and equal inner products."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (n, d), generator=g).float()


@pytest.mark.parametrize("strategy", ["rows", "symmetric"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 4, 11, 39])
def test_ties_go_to_the_lower_index(seed, k, strategy):
    x = tied_data(seed)
    assert torch.equal(knn(x, k, strategy=strategy, block_rows=7).indices, by_the_rule(x, k))


@pytest.mark.parametrize("strategy", ["rows", "symmetric"])
@pytest.mark.parametrize("block_rows", [1, 3, 7, 1000])
def test_result_does_not_depend_on_block_size(block_rows, strategy):
    x = tied_data(3, n=50)
    got = knn(x, 9, strategy=strategy, block_rows=block_rows)
    assert torch.equal(got.indices, by_the_rule(x, 9))


def test_strategies_agree_on_wide_tie_free_data():
    x = torch.nn.functional.normalize(torch.randn(300, 80, generator=torch.Generator().manual_seed(4)), dim=1)
    rows, sym = knn(x, 12, strategy="rows"), knn(x, 12, strategy="symmetric", block_rows=64)
    assert torch.equal(rows.indices, sym.indices)
    assert torch.allclose(rows.values, sym.values, atol=1e-6)


def test_smaller_k_is_a_prefix_even_with_ties():
    x = tied_data(5, n=60)
    big = knn(x, 20)
    for k in (1, 5, 13):
        assert torch.equal(big.prefix(k).indices, knn(x, k).indices)


def test_self_is_never_a_neighbour_even_among_duplicates():
    x = torch.ones(6, 4)
    nb = knn(x, 5)
    assert not (nb.indices == torch.arange(6).unsqueeze(1)).any()
    assert nb.indices[0].tolist() == [1, 2, 3, 4, 5]
    assert nb.indices[3].tolist() == [0, 1, 2, 4, 5]


def test_values_are_the_inner_products():
    x = torch.nn.functional.normalize(torch.randn(30, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    nb = knn(x, 4)
    gathered = (x @ x.T).gather(1, nb.indices)
    assert torch.allclose(nb.values, gathered)


@pytest.mark.parametrize("k", [0, 30])
def test_k_out_of_range(k):
    with pytest.raises(ValueError, match=r"\[1, 29\]"):
        knn(torch.randn(30, 3), k)


def test_prefix_longer_than_search_is_an_error():
    with pytest.raises(ValueError, match="only 3"):
        knn(torch.randn(10, 3), 3).prefix(4)


def test_recall_counts_shared_neighbours():
    exact = Neighbours(torch.tensor([[1, 2], [0, 2], [0, 1]]), torch.zeros(3, 2))
    found = Neighbours(torch.tensor([[1, 0], [2, 0], [1, 2]]), torch.zeros(3, 2))
    assert recall(found, exact) == pytest.approx(4 / 6)


def test_faiss_flat_matches_torch_on_tie_free_data():
    pytest.importorskip("faiss", reason="faiss-cpu not installed (extra 'faiss')")
    x = torch.nn.functional.normalize(torch.randn(300, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    got, want = knn(x, 10, backend="faiss-flat"), knn(x, 10)
    assert torch.equal(got.indices, want.indices)
    assert torch.allclose(got.values, want.values, atol=1e-5)
    assert got.exact


def test_faiss_hnsw_is_marked_approximate_and_has_high_recall():
    pytest.importorskip("faiss", reason="faiss-cpu not installed (extra 'faiss')")
    x = torch.nn.functional.normalize(torch.randn(2000, 16, generator=torch.Generator().manual_seed(2)), dim=1)
    got = knn(x, 10, backend="faiss-hnsw")
    assert not got.exact
    assert not (got.indices == torch.arange(2000).unsqueeze(1)).any()
    assert recall(got, knn(x, 10)) > 0.9
