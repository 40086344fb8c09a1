"""Three meanings that once only a bit-for-bit comparison with an older engine guarded:
the float64 re-score of a tie zone honours `exclude_same_group`; a paired interval is
oriented (a - b, not b - a); `--compare` pairs each model with its own subset draws."""
import json

import pytest
import torch

from harness import cknna as C
from harness.cknna import significance as S
from harness.cli import main
from tests.dense_reference import dense_shared_scores

pytestmark = pytest.mark.unit


def grouped_duplicates(seed, n=80):
    """40 identical rows in A (a robot at rest) spread over episodes of 4, the rest
    distinct; B related to A's latent, so excluding same-episode pairs matters."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 6, generator=g)
    a[:40] = a[0]
    b = a[:, :3] + 0.3 * torch.randn(n, 3, generator=g)
    groups = torch.arange(n) // 4
    unit = torch.nn.functional.normalize
    return unit(a, dim=1), unit(b, dim=1), groups


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [3, 6])
def test_the_tie_zone_rescan_leaves_out_same_group_pairs(seed, k, monkeypatch):
    a, b, groups = grouped_duplicates(seed)
    # The 40-row tie runs past every list searched (k + TIE_MARGIN long): those rows are
    # scored again against every candidate (graph_kernels' re-scan), groups left out.
    space = C.Space(a, k, groups=groups)
    assert space.neighbours.k < 40 and space.tied_rows(k) > 0
    got = C.cknna(a, b, k, groups=groups)
    assert got == pytest.approx(dense_shared_scores(a, b, k, groups=groups)[0], abs=1e-10)
    # and it is not the number without the exclusion
    assert abs(got - dense_shared_scores(a, b, k)[0]) > 1e-3


def two_models(seed, n=200):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, 5, generator=g)
    good = torch.cat([3 * b, torch.randn(n, 10, generator=g)], 1)
    noise = torch.randn(n, 15, generator=g)
    unit = torch.nn.functional.normalize
    return unit(b, dim=1), {"good": unit(good, dim=1), "noise": unit(noise, dim=1)}


def test_a_paired_interval_is_the_interval_of_a_minus_b():
    b, models = two_models(0)
    observed, draws = {}, {}
    for name, a in models.items():
        out = S.align(a, b, [10], subsample_draws=20, subsample_fraction=0.8, seed=1,
                      keep_draws=True)[10]
        observed[name], draws[name] = {10: out["cknna"]}, {10: out["subsample_values"]}
    [ab] = S.compare(["good", "noise"], observed, draws, [10], fraction=0.8)["k10"]
    [ba] = S.compare(["noise", "good"], observed, draws, [10], fraction=0.8)["k10"]
    assert ab["difference"] == pytest.approx(observed["good"][10] - observed["noise"][10])
    assert 0 < ab["interval"][0] < ab["difference"] < ab["interval"][1]
    assert ab["subset_difference_mean"] > 0  # on the subsets too, good beats noise
    assert ba["interval"] == pytest.approx([-ab["interval"][1], -ab["interval"][0]])
    assert ba["difference"] == pytest.approx(-ab["difference"])


def test_cli_compare_pairs_each_model_with_its_own_subset_values(tmp_path):
    """Each model's subset values are its own: the mean subset difference good - noise is
    the mean of CKNNA on each shared subset (by the dense definition) of good minus noise."""
    b, models = two_models(1, n=120)
    paths = []
    for name, x in models.items():
        (tmp_path / name).mkdir()
        torch.save(x, tmp_path / name / "feats_A.pt")
        paths.append(str(tmp_path / name / "feats_A.pt"))
    torch.save(b, tmp_path / "b.pt")
    out = tmp_path / "r.json"
    assert main(["cknna", "--feats_A", *paths, "--feats_B", str(tmp_path / "b.pt"),
                 "--topk", "5", "--compare", "--subsample", "6", "--seed", "3",
                 "--output", str(out)]) == 0
    [row] = json.loads(out.read_text())["comparisons"]["k5"]
    assert (row["a"], row["b"]) == ("good", "noise")
    want = []
    for subset in S.subsets(120, 6, 0.5, seed=3):  # the f-sized subsets (default f = 0.5)
        good = dense_shared_scores(models["good"][subset], b[subset], 5)[0]
        noise = dense_shared_scores(models["noise"][subset], b[subset], 5)[0]
        want.append(good - noise)
    assert row["subset_difference_mean"] == pytest.approx(sum(want) / len(want), abs=1e-6)
    assert row["subset_difference_mean"] > 0.1
