"""`python -m harness cknna` on temporary files: the seed's contract, extras, and bad input."""
import json
import math

import numpy as np
import pytest
import torch

from harness.cli import main
from tests.dense_reference import dense_cknna, dense_mutual_knn

N = 60


def unit_rows(x):
    return torch.nn.functional.normalize(x, dim=1)


@pytest.fixture
def study(tmp_path):
    """feats_B.pt plus two models' feats_A.pt in folders named like the seed's."""
    g = torch.Generator().manual_seed(0)
    states = torch.randn(N, 7, generator=g)
    feats = {
        "spatialvla": torch.cat([states * 3, torch.randn(N, 9, generator=g)], dim=1),
        "pi0": torch.randn(N, 12, generator=g),
    }
    torch.save(states, tmp_path / "feats_B.pt")
    paths = []
    for name, x in feats.items():
        (tmp_path / name).mkdir()
        torch.save(x, tmp_path / name / "feats_A.pt")
        paths.append(str(tmp_path / name / "feats_A.pt"))
    return tmp_path, paths, states, feats


def run_cli(*argv):
    return main(["cknna", *map(str, argv)])


def test_seed_flags_and_json_superset(study, capsys):
    root, paths, states, feats = study
    out = root / "results.json"
    assert run_cli("--feats_A", *paths, "--feats_B", root / "feats_B.pt", "--topk", 5, 10,
                   "--also_mutual_knn", "--device", "cpu", "--output", out) == 0
    res = json.loads(out.read_text())
    meta = res["_meta"]
    assert {"timestamp", "feats_B_path", "feats_B_shape", "N", "k_values"} <= set(meta)
    assert meta["feats_B_shape"] == [N, 7] and meta["N"] == N and meta["k_values"] == [5, 10]
    assert list(res["models"]) == ["spatialvla", "pi0"]
    for name, entry in res["models"].items():
        assert entry["feats_A_path"].endswith(f"{name}/feats_A.pt")
        assert entry["feats_A_dim"] == feats[name].shape[1]
        a, b = unit_rows(feats[name]), unit_rows(states)
        for k in (5, 10):
            assert entry[f"cknna_k{k}"] == pytest.approx(dense_cknna(a, b, k), abs=1e-6)
            assert entry[f"mutual_knn_k{k}"] == pytest.approx(dense_mutual_knn(a, b, k))
    table = capsys.readouterr().out
    assert "| spatialvla | 16 | 5 |" in table and "| CKNNA |" in table


def test_mutual_knn_only_when_asked(study):
    root, paths, _, _ = study
    out = root / "r.json"
    assert run_cli("--feats_A", paths[0], "--feats_B", root / "feats_B.pt", "--output", out) == 0
    entry = json.loads(out.read_text())["models"]["spatialvla"]
    assert "cknna_k10" in entry and "mutual_knn_k10" not in entry


@pytest.mark.parametrize("fmt", ["pt-dict", "npy", "safetensors"])
def test_other_file_formats_give_the_same_numbers(study, fmt):
    root, paths, states, feats = study
    x = feats["pi0"]
    (root / "alt").mkdir()
    if fmt == "pt-dict":
        path = root / "alt" / "feats_A.pt"
        torch.save({"feats": x, "note": torch.zeros(1)}, path)
    elif fmt == "npy":
        path = root / "alt" / "feats_A.npy"
        np.save(path, x.numpy())
    else:
        from safetensors.torch import save_file
        path = root / "alt" / "feats_A.safetensors"
        save_file({"feats": x}, str(path))
    out = root / "r.json"
    assert run_cli("--feats_A", path, "--feats_B", root / "feats_B.pt", "--output", out) == 0
    got = json.loads(out.read_text())["models"]["alt"]["cknna_k10"]
    assert got == pytest.approx(dense_cknna(unit_rows(x), unit_rows(states), 10), abs=1e-6)


def test_pairwise_permutations_heatmap_and_zscore(study):
    root, paths, states, feats = study
    out, png = root / "r.json", root / "heat.png"
    assert run_cli("--feats_A", *paths, "--feats_B", root / "feats_B.pt", "--topk", 5,
                   "--permutations", 50, "--zscore_B", "--heatmap", png, "--output", out) == 0
    res = json.loads(out.read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    z = (states - states.mean(0)) / states.std(0)
    entry = res["models"]["spatialvla"]
    assert entry["cknna_k5"] == pytest.approx(
        dense_cknna(unit_rows(feats["spatialvla"]), unit_rows(z), 5), abs=1e-6)
    assert res["_meta"]["preprocessing"]["feats_B_zscored"] is True
    assert 1 / 51 <= entry["p_value_k5"] <= 1
    assert entry["details"]["k5"]["permutation"]["n_permutations"] == 50
    matrix = res["pairwise"]["cknna_k5"]
    a0, a1 = unit_rows(feats["spatialvla"]), unit_rows(feats["pi0"])
    assert matrix[0][1] == pytest.approx(dense_cknna(a0, a1, 5), abs=1e-6)
    assert matrix[1][0] == pytest.approx(dense_cknna(a1, a0, 5), abs=1e-6)
    assert matrix[0][0] == pytest.approx(1.0, abs=1e-3)


# ------------------------------------------------------------ bad input: exit 2, nothing written


def bad_input_cases(root, paths):
    b = root / "feats_B.pt"
    torch.save(torch.randn(N - 1, 7), root / "short.pt")
    torch.save(torch.randn(N, 7, 1), root / "cube.pt")
    nan = torch.randn(N, 7)
    nan[4, 2] = float("nan")
    torch.save(nan, root / "nan.pt")
    inf = torch.randn(N, 7)
    inf[9, 0] = float("inf")
    torch.save(inf, root / "inf.pt")
    zero = torch.randn(N, 7)
    zero[3] = 0
    torch.save(zero, root / "zero.pt")
    (root / "garbage.pt").write_bytes(b"not a tensor file")
    torch.save({"x": torch.randn(N, 7)}, root / "nofeats.pt")
    torch.save(torch.randn(3, 7), root / "three.pt")
    (root / "twin").mkdir()
    torch.save(torch.randn(N, 4), root / "twin" / "feats_A.pt")
    (root / "sub" / "twin").mkdir(parents=True)
    torch.save(torch.randn(N, 4), root / "sub" / "twin" / "feats_A.pt")
    return {
        "mismatched N": (["--feats_A", root / "short.pt", "--feats_B", b], "short.pt"),
        "not 2-D": (["--feats_A", root / "cube.pt", "--feats_B", b], "cube.pt"),
        "NaN": (["--feats_A", root / "nan.pt", "--feats_B", b], "nan.pt"),
        "Inf": (["--feats_A", paths[0], "--feats_B", root / "inf.pt"], "inf.pt"),
        "zero-norm row": (["--feats_A", root / "zero.pt", "--feats_B", b], "zero.pt"),
        "k = 0": (["--feats_A", paths[0], "--feats_B", b, "--topk", 0], "--topk 0"),
        "k = N": (["--feats_A", paths[0], "--feats_B", b, "--topk", 5, N], f"--topk {N}"),
        "N < 4": (["--feats_A", root / "three.pt", "--feats_B", root / "three.pt"], "three.pt"),
        "missing file": (["--feats_A", root / "nowhere.pt", "--feats_B", b], "nowhere.pt"),
        "unreadable": (["--feats_A", root / "garbage.pt", "--feats_B", b], "garbage.pt"),
        "dict without feats": (["--feats_A", root / "nofeats.pt", "--feats_B", b], "nofeats.pt"),
        "duplicate labels": (["--feats_A", root / "twin" / "feats_A.pt",
                              root / "sub" / "twin" / "feats_A.pt", "--feats_B", b], "twin"),
        "no CUDA": (["--feats_A", paths[0], "--feats_B", b, "--device", "cuda:0"], "CUDA"),
    }


CASE_NAMES = ["mismatched N", "not 2-D", "NaN", "Inf", "zero-norm row", "k = 0", "k = N", "N < 4",
              "missing file", "unreadable", "dict without feats", "duplicate labels", "no CUDA"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_exits_2_names_the_problem_and_keeps_old_output(study, capsys, case):
    root, paths, _, _ = study
    if case == "no CUDA" and torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    argv, needle = bad_input_cases(root, paths)[case]
    out = root / "results.json"
    out.write_text("previous results\n")
    assert run_cli(*argv, "--output", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert out.read_text() == "previous results\n"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []


def test_degenerate_result_is_nan_with_a_warning(tmp_path, capsys):
    # Four samples on two antipodal pairs: the unbiased self-HSIC is not positive.
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    (tmp_path / "m").mkdir()
    torch.save(x, tmp_path / "m" / "feats_A.pt")
    torch.save(x, tmp_path / "b.pt")
    out = tmp_path / "r.json"
    assert run_cli("--feats_A", tmp_path / "m" / "feats_A.pt", "--feats_B", tmp_path / "b.pt",
                   "--topk", 1, "--output", out) == 0
    text = out.read_text()
    # Strict JSON: a bare NaN token is rejected by JavaScript parsers.
    res = json.loads(text, parse_constant=lambda token: pytest.fail(f"non-JSON token {token}"))
    entry = res["models"]["m"]
    assert entry["cknna_k1"] is None and "degenerate" in entry["cknna_k1_warning"]
    assert entry["details"]["k1"]["cknna"] is None
    assert any("degenerate" in w for w in res["_meta"]["warnings"])
    assert "degenerate" in capsys.readouterr().err


# ------------------------------------------------------------ ties, groups, comparisons


def test_identical_rows_are_refused_with_one_line(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    torch.save(torch.ones(20, 5) * 3, tmp_path / "m" / "feats_A.pt")
    torch.save(torch.randn(20, 7), tmp_path / "b.pt")
    out = tmp_path / "r.json"
    assert run_cli("--feats_A", tmp_path / "m" / "feats_A.pt", "--feats_B", tmp_path / "b.pt",
                   "--topk", 3, "--output", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "feats_A.pt" in err[0] and "identical" in err[0]
    assert not out.exists()


def test_groups_exclusion_compare_and_tie_counts_in_the_json(study, capsys):
    root, paths, states, _ = study
    groups = [i // 3 for i in range(N)]
    (root / "groups.json").write_text(json.dumps(groups))
    out = root / "r.json"
    assert run_cli("--feats_A", *paths, "--feats_B", root / "feats_B.pt", "--topk", 3, 5,
                   "--groups", root / "groups.json", "--exclude_same_group", "--compare",
                   "--subsample", 20, "--subsample_fraction", 0.7, "--permutations", 10,
                   "--output", out) == 0
    res = json.loads(out.read_text())
    meta = res["_meta"]
    assert meta["groups"]["exclude_same_group"] and meta["groups"]["n_groups"] == N // 3
    assert meta["knn"]["ties"] == "shared"
    details = res["models"]["spatialvla"]["details"]["k5"]
    assert details["tied_rows_A"] == 0 and details["tied_rows_B"] == 0
    assert details["subsample"]["whole_groups"] and details["permutation"]["groups_respected"]
    [row] = res["comparisons"]["k5"]
    assert (row["a"], row["b"], row["level"]) == ("spatialvla", "pi0", 0.95)
    assert row["difference"] == pytest.approx(res["models"]["spatialvla"]["cknna_k5"]
                                              - res["models"]["pi0"]["cknna_k5"])
    assert row["interval"][0] <= row["difference"] <= row["interval"][1]
    assert "Ranking by CKNNA, k=5" in capsys.readouterr().out
    # The same numbers as the library with the same groups.
    from harness import cknna as C
    from harness.data.states import l2_rows
    b = l2_rows(states)  # the CLI's normalisation (float64)
    a = l2_rows(torch.load(paths[0]))
    assert res["models"]["spatialvla"]["cknna_k3"] == pytest.approx(
        C.cknna(a, b, 3, groups=torch.tensor(groups)), abs=1e-12)


def test_compare_implies_subsampling_and_index_ties_are_an_option(study):
    root, paths, _, _ = study
    out = root / "r.json"
    assert run_cli("--feats_A", *paths, "--feats_B", root / "feats_B.pt", "--topk", 5,
                   "--compare", "--ties", "index", "--output", out) == 0
    res = json.loads(out.read_text())
    assert res["comparisons"]["k5"][0]["n_draws"] == 200
    assert res["_meta"]["knn"]["ties"] == "index"


@pytest.mark.parametrize("case", ["wrong length", "floats", "not a list", "exclude without groups",
                                  "compare one model", "group too big"])
def test_bad_groups_exit_2_with_one_line(study, capsys, case):
    root, paths, _, _ = study
    g = root / "groups.json"
    extra = ["--groups", g]
    if case == "wrong length":
        g.write_text(json.dumps(list(range(N - 1))))
    elif case == "floats":
        torch.save(torch.arange(N).float(), root / "g.pt")
        extra = ["--groups", root / "g.pt"]
    elif case == "not a list":
        g.write_text('{"a": 1}')
    elif case == "exclude without groups":
        extra = ["--exclude_same_group"]
    elif case == "compare one model":
        g.write_text(json.dumps(list(range(N))))
        extra += ["--compare"]
        paths = paths[:1]
    else:
        g.write_text(json.dumps([0] * (N - 3) + [1, 2, 3]))
        extra += ["--exclude_same_group"]
    assert run_cli("--feats_A", *paths, "--feats_B", root / "feats_B.pt", "--topk", 5, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("--groups" in err[0] or "--compare" in err[0]
                              or "--exclude_same_group" in err[0]), err
