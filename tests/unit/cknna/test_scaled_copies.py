"""Rows equal up to a positive scale (the same frame extracted twice at different scales)
tie in every space: the CLI and the study normalise rows in float64 (`states.l2_rows`)
and decide ties in float64, so the result cannot hang on float32 rounding of the
normalisation. On tie-free data the numbers are those of the float32 normalisation."""
import json

import pytest
import torch

from harness import cknna as C
from harness.cli import main
from harness.data.states import l2_rows
from tests.dense_reference import dense_shared_scores

pytestmark = pytest.mark.unit


def scaled_copies(seed, n_proto=30, copies=3, da=24, db=5, scales=None):
    """Each prototype row repeated `copies` times at different positive scales (A) and the
    states of the same frames (B, copies too, but grouped differently)."""
    g = torch.Generator().manual_seed(seed)
    proto_a = torch.randn(n_proto, da, generator=g)
    proto_b = torch.randn(n_proto, db, generator=g)
    idx = torch.arange(n_proto).repeat_interleave(copies)
    if scales is None:
        scales = torch.rand(len(idx), 1, generator=g) * 9 + 0.1
    a = proto_a[idx] * scales
    # B: the same frames' states, a third of them from a neighbouring prototype.
    b_idx = torch.where(torch.arange(len(idx)) % 3 == 0, (idx + 1) % n_proto, idx)
    b = proto_b[b_idx] * (torch.rand(len(idx), 1, generator=g) * 5 + 0.5)
    return a, b


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [2, 5, 10])
def test_scaled_copies_tie_as_exact_copies_do(seed, k):
    a, b = scaled_copies(seed)
    exact_a, exact_b = scaled_copies(seed, scales=torch.ones(90, 1))
    got = C.cknna(l2_rows(a), l2_rows(b), k)
    same_rows = C.cknna(l2_rows(exact_a), l2_rows(exact_b), k)
    assert got == pytest.approx(same_rows, abs=1e-6)  # kernel values differ in the last bits
    # and both are the float64 definition with every copy tied
    assert got == pytest.approx(dense_shared_scores(l2_rows(a), l2_rows(b), k)[0], abs=1e-6)


def test_the_result_does_not_hang_on_the_normalisation_rounding():
    """Float32 normalisation leaves copies ~6e-8 apart; float64 ~1e-16. Both are below the
    input's precision (float32), so both give the same ties and the same CKNNA."""
    a, b = scaled_copies(0)
    for k in (2, 5, 10):
        f32 = C.cknna(a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True), k)
        assert f32 == pytest.approx(C.cknna(l2_rows(a), l2_rows(b), k), abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_tie_free_numbers_are_those_of_the_float32_normalisation(seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(300, 32, generator=g), torch.randn(300, 7, generator=g)
    b = b + a[:, :7]
    for k in (5, 10, 20):
        old = C.cknna(a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True), k)
        assert C.cknna(l2_rows(a), l2_rows(b), k) == pytest.approx(old, abs=1e-6)


def test_cli_scores_scaled_copies_as_exact_copies(tmp_path):
    a, b = scaled_copies(1)
    exact_a, _ = scaled_copies(1, scales=torch.ones(90, 1))
    out = {}
    for name, feats in (("scaled", a), ("exact", exact_a)):
        (tmp_path / name).mkdir()
        torch.save(feats, tmp_path / name / "feats_A.pt")
    torch.save(b, tmp_path / "b.pt")
    assert main(["cknna", "--feats_A", str(tmp_path / "scaled" / "feats_A.pt"),
                 str(tmp_path / "exact" / "feats_A.pt"), "--feats_B", str(tmp_path / "b.pt"),
                 "--topk", "5", "--output", str(tmp_path / "r.json")]) == 0
    out = json.loads((tmp_path / "r.json").read_text())["models"]
    assert out["scaled"]["cknna_k5"] == pytest.approx(out["exact"]["cknna_k5"], abs=1e-6)
