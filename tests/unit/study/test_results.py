"""`harness.study.results.compute`: the seed's JSON layout, numbers equal to the dense formula,
pairwise order, per-layer scores and the record of how they were made."""
from __future__ import annotations

import pytest
import torch

from harness.study.results import Settings, compute
from harness.data.states import l2_rows, record
from tests.dense_reference import dense_cknna, dense_mutual_knn

N = 50


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(11)
    b = torch.randn(N, 7, generator=g, dtype=torch.float64).float()
    a1 = torch.cat([b * 2, torch.randn(N, 5, generator=g)], dim=1)
    a2 = torch.randn(N, 9, generator=g)
    return {"m1": ("m1/feats_A.pt", l2_rows(a1)), "m2": ("m2/feats_A.pt", l2_rows(a2))}, l2_rows(b)


@pytest.fixture(scope="module")
def results(inputs):
    models, b = inputs
    layers = {"m1": {"0": models["m2"][1], "1": models["m1"][1]}}
    return compute(models, b, "feats_B.pt", Settings(ks=[3, 7], permutations=10, pairwise=True),
                   record(None), {"study": {"note": "x"}}, layers=layers)


def test_seed_layout_and_meta(results):
    meta = results["_meta"]
    assert (meta["N"], meta["k_values"], meta["feats_B_shape"]) == (N, [3, 7], [N, 7])
    assert meta["feats_B_path"] == "feats_B.pt" and meta["study"] == {"note": "x"}
    assert meta["preprocessing"] == {"row_l2_normalised": True, "feats_B_zscored": False,
                                     "feats_B_zscore": None}
    assert meta["permutations"] == 10 and "tie_rule" in meta["knn"] and "versions" in meta
    entry = results["models"]["m1"]
    assert entry["feats_A_path"] == "m1/feats_A.pt" and entry["feats_A_dim"] == 12
    for k in (3, 7):
        assert {f"cknna_k{k}", f"mutual_knn_k{k}", f"p_value_k{k}"} <= set(entry)
        assert 0 < entry[f"p_value_k{k}"] <= 1


def test_scores_equal_the_dense_formula(inputs, results):
    models, b = inputs
    for label, (_, a) in models.items():
        for k in (3, 7):
            entry = results["models"][label]
            assert entry[f"cknna_k{k}"] == pytest.approx(dense_cknna(a, b, k), abs=1e-6)
            assert entry[f"mutual_knn_k{k}"] == pytest.approx(dense_mutual_knn(a, b, k), abs=1e-6)


def test_pairwise_is_ordered_row_then_column(inputs, results):
    models, _ = inputs
    pw = results["pairwise"]
    assert pw["labels"] == ["m1", "m2"]
    a1, a2 = models["m1"][1], models["m2"][1]
    assert pw["cknna_k3"][0][1] == pytest.approx(dense_cknna(a1, a2, 3), abs=1e-6)
    assert pw["cknna_k3"][1][0] == pytest.approx(dense_cknna(a2, a1, 3), abs=1e-6)


def test_per_layer_scores(inputs, results):
    models, b = inputs
    sweep = results["layers"]["m1"]
    assert sweep["0"]["k7"] == pytest.approx(dense_cknna(models["m2"][1], b, 7), abs=1e-6)
    assert sweep["1"]["k3"] == pytest.approx(results["models"]["m1"]["cknna_k3"], abs=1e-12)


def test_no_pairwise_or_layers_unless_asked(inputs):
    models, b = inputs
    out = compute(models, b, "feats_B.pt", Settings(ks=[3]), record(None))
    assert "pairwise" not in out and "layers" not in out
    assert "p_value_k3" not in out["models"]["m1"]
