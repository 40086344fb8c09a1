"""The k-d tree backend (`knn(..., backend="tree")`): the same neighbour graphs as the torch
search on tie-free and tie-heavy low-D data, with groups, when its queries must grow or
fall back to brute force, and on rows of any norm."""
import json
import sys

import pytest
import torch

from harness import cknna as C
from harness.cknna import knn_lowdim
from harness.cli import main
from harness.cknna.knn import knn

pytestmark = pytest.mark.unit
pytest.importorskip("scipy")


def unit_rows(x):
    return torch.nn.functional.normalize(x, dim=1)


def smooth_states(seed, n=600, d=7):
    """Random-walk trajectories: neighbours are mostly earlier and later frames."""
    g = torch.Generator().manual_seed(seed)
    return unit_rows(torch.randn(n, d, generator=g).mul(0.1).cumsum(0) + 0.5)


def quantised_states(seed, n=600, d=7, step=0.5):
    """States on a coarse grid (like Bridge's rounded values): many exact duplicates."""
    g = torch.Generator().manual_seed(seed)
    return unit_rows(torch.round(torch.randn(n, d, generator=g) / step) * step + 0.01)


def duplicated_rows(seed, n=600, d=7, prototypes=12):
    """A few states copied many times (a robot at rest): ties far past any k."""
    g = torch.Generator().manual_seed(seed)
    return unit_rows(torch.randn(prototypes, d, generator=g))[torch.randint(0, prototypes, (n,), generator=g)]


DATA = {"random": lambda s: unit_rows(torch.randn(600, 7, generator=torch.Generator().manual_seed(s))),
        "smooth": smooth_states, "quantised": quantised_states, "duplicated": duplicated_rows}


def edges(g):
    """A graph's edges in key order: (src, dst, weight, val)."""
    order = (g.src * g.n + g.dst).argsort()
    return g.src[order], g.dst[order], g.weight[order], g.val[order]


def assert_same_graph(sa, sb, k):
    ga, gb = edges(sa.graph(k)), edges(sb.graph(k))
    assert torch.equal(ga[0], gb[0]) and torch.equal(ga[1], gb[1])
    assert torch.equal(ga[2], gb[2])  # weights come from float64 products: identical
    assert torch.allclose(ga[3], gb[3], rtol=0, atol=1e-6)  # float32 sums may differ in the last bits
    assert sa.graph(k).tied_rows == sb.graph(k).tied_rows


@pytest.mark.parametrize("kind", sorted(DATA))
@pytest.mark.parametrize("seed", range(2))
def test_tree_graphs_equal_torch_graphs(kind, seed):
    x = DATA[kind](seed)
    torch_space = C.Space(x, 20)
    tree_space = C.Space(x, 20, knn_options={"backend": "tree"})
    for k in (1, 5, 20):
        assert_same_graph(torch_space, tree_space, k)


@pytest.mark.parametrize("kind", sorted(DATA))
@pytest.mark.parametrize("k", [1, 5, 20])
def test_cknna_with_tree_equals_default(kind, k):
    b = DATA[kind](3)
    g = torch.Generator().manual_seed(4)
    a = unit_rows(torch.cat([b * 2, torch.randn(len(b), 5, generator=g)], dim=1))
    assert C.cknna(a, b, k, backend="tree") == pytest.approx(C.cknna(a, b, k), abs=1e-6)
    assert C.mutual_knn(a, b, k, backend="tree") == pytest.approx(C.mutual_knn(a, b, k), abs=1e-12)


def test_lists_are_the_true_top_k_for_rows_of_any_norm():
    """Not only unit rows: brute-force float64 inner products decide the expected sets."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(400, 4, generator=g) * torch.rand(400, 1, generator=g).mul(5)
    sims = (x.double() @ x.double().T).fill_diagonal_(float("-inf"))
    want = sims.topk(6, dim=1).indices.sort(dim=1).values
    got = knn(x, 6, backend="tree")
    assert torch.equal(got.indices.sort(dim=1).values, want)
    assert torch.allclose(got.values.double(), sims.gather(1, got.indices), atol=1e-5)
    assert (got.values[:, :-1] >= got.values[:, 1:]).all()


@pytest.mark.parametrize("max_candidates", [16, 1024])
def test_growing_queries_and_brute_force_keep_the_graph(monkeypatch, max_candidates):
    """Duplicates of one state outnumber the first query: the row's query grows, or (with a
    small cap) the row is searched against every row; the graph stays the torch one."""
    monkeypatch.setattr(knn_lowdim, "MAX_CANDIDATES", max_candidates)
    calls = []
    brute = knn_lowdim._brute
    monkeypatch.setattr(knn_lowdim, "_brute", lambda *a: calls.append(1) or brute(*a))
    x = duplicated_rows(6, n=500, prototypes=5)
    for k in (1, 5, 20):
        assert_same_graph(C.Space(x, k), C.Space(x, k, knn_options={"backend": "tree"}), k)
    assert bool(calls) == (max_candidates == 16)


def test_groups_are_excluded_like_the_torch_backend():
    x = smooth_states(7, n=400)
    groups = torch.arange(400) // 40  # episodes: the nearest frames are one's own
    for k in (1, 5, 20):
        sa = C.Space(x, k, groups=groups)
        sb = C.Space(x, k, groups=groups, knn_options={"backend": "tree"})
        assert_same_graph(sa, sb, k)
        nb = sb.neighbours
        assert (groups[nb.indices] != groups.unsqueeze(1)).all()


def test_too_few_rows_outside_the_group_are_padded_with_minus_inf():
    x = smooth_states(8, n=30, d=3)
    groups = torch.tensor([0] * 25 + [1] * 5)
    want, got = knn(x, 8, groups=groups), knn(x, 8, groups=groups, backend="tree")
    assert torch.equal(got.values == float("-inf"), want.values == float("-inf"))
    assert (got.values[:25, 5:] == float("-inf")).all() and (got.values[25:] > float("-inf")).all()
    finite = want.values > float("-inf")
    assert torch.equal(got.indices[finite], want.indices[finite])


def test_wide_rows_are_searched_by_torch():
    x = unit_rows(torch.randn(300, knn_lowdim.MAX_DIM + 1, generator=torch.Generator().manual_seed(9)))
    want, got = knn(x, 5), knn(x, 5, backend="tree")
    assert torch.equal(got.indices, want.indices) and torch.equal(got.values, want.values)


def test_non_finite_rows_are_refused():
    x = torch.randn(50, 3)
    x[7, 1] = float("nan")
    with pytest.raises(ValueError, match="x: the tree kNN backend needs finite values"):
        knn(x, 3, backend="tree")


def test_missing_scipy_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.spatial", None)
    with pytest.raises(ImportError, match=r"harness\[lowdim\]"):
        knn(torch.randn(20, 3), 2, backend="tree")


def test_cli_accepts_the_tree_backend(tmp_path):
    b = smooth_states(10, n=200)
    a = torch.cat([b * 3, torch.randn(200, 9, generator=torch.Generator().manual_seed(11))], dim=1)
    torch.save(b, tmp_path / "feats_B.pt")
    (tmp_path / "m").mkdir()
    torch.save(a, tmp_path / "m" / "feats_A.pt")
    results = {}
    for backend in ("torch", "tree"):
        out = tmp_path / f"{backend}.json"
        assert main(["cknna", "--feats_A", str(tmp_path / "m" / "feats_A.pt"), "--feats_B",
                     str(tmp_path / "feats_B.pt"), "--topk", "5", "10", "--device", "cpu",
                     "--knn_backend", backend, "--output", str(out)]) == 0
        results[backend] = json.loads(out.read_text())["models"]["m"]
    for k in (5, 10):
        assert results["tree"][f"cknna_k{k}"] == pytest.approx(results["torch"][f"cknna_k{k}"], abs=1e-6)
