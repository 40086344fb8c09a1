"""Issue 14 items 3 and 4 through `harness run`: future states (the synthetic set writes
feats_B_seq.pt) give CKNNA per horizon and cknna_vs_horizon.png; success_rate per model
gives Spearman's rho with its interval and success_vs_cknna.png. External features, so
nothing is extracted."""
import json
import re

import pytest
import torch

from harness.cli import main
from harness.data.synth import generate
from tests.dense_reference import dense_cknna
from tests.unit.study.test_success import independent_spearman

N = 60
RATES = {"near": 0.7, "mixed": 0.5, "noise": 0.1}


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    generate(root / "d", n=N, seed=1, progress=False)
    states = torch.load(root / "d" / "feats_B.pt", weights_only=True)
    g = torch.Generator().manual_seed(0)
    feats = {"near": torch.cat([states * 5, torch.randn(N, 3, generator=g)], dim=1),
             "mixed": torch.cat([states, torch.randn(N, 6, generator=g)], dim=1),
             "noise": torch.randn(N, 10, generator=g)}
    lines = [f'data_dir = "{root / "d"}"', 'output_dir = "out"', "permutations = 0",
             "k_values = [5, 10]"]
    for name, x in feats.items():
        torch.save(x, root / f"{name}.pt")
        lines += ["[[models]]", f'name = "{name}"', f'feats = "{root / name}.pt"',
                  f"success_rate = {RATES[name]}"]
    (root / "study.toml").write_text("\n".join(lines) + "\n")
    assert main(["run", str(root / "study.toml")]) == 0
    return root, feats


def test_run_scores_each_horizon(study):
    root, feats = study
    res = json.loads((root / "out" / "results.json").read_text())
    assert res["_meta"]["horizons"]["horizons"] == [0, 1, 2, 4, 8]
    seq = torch.load(root / "d" / "feats_B_seq.pt", weights_only=True)
    for name, x in feats.items():
        by_h = res["models"][name]["horizons"]
        assert by_h["h0"]["cknna_k10"] == pytest.approx(res["models"][name]["cknna_k10"], abs=1e-12)
        want = dense_cknna(_unit(x), _unit(torch.cat([seq[:, 0], seq[:, 1], seq[:, 2]], dim=1)), 5)
        assert by_h["h2"]["cknna_k5"] == pytest.approx(want, abs=1e-6)


def test_run_correlates_with_success(study):
    root, _ = study
    res = json.loads((root / "out" / "results.json").read_text())
    for k in (5, 10):
        record = res["success"][f"k{k}"]
        assert record["n_models"] == 3 and "rests on 3 models only" in record["note"]
        want = independent_spearman([res["models"][m][f"cknna_k{k}"] for m in RATES],
                                    list(RATES.values()))
        assert record["spearman_rho"] == pytest.approx(want, abs=1e-12)
        assert record["interval"]["draws"] == 2000


def test_report_shows_horizons_and_success(study):
    root, _ = study
    markdown = (root / "out" / "report.md").read_text()
    assert "## CKNNA against future states (horizons)" in markdown
    assert "## CKNNA and task success across models" in markdown and "3 models" in markdown
    linked = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", markdown)
    assert "cknna_vs_horizon.png" in linked and "success_vs_cknna.png" in linked
    html = (root / "out" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(linked)


def test_horizons_can_be_switched_off(tmp_path, study):
    root, _ = study
    cfg = (root / "study.toml").read_text().replace("k_values = [5, 10]",
                                                    "k_values = [5, 10]\nhorizons = []")
    cfg = cfg.replace('output_dir = "out"', f'output_dir = "{tmp_path / "out"}"')
    (tmp_path / "study.toml").write_text(cfg)
    assert main(["run", str(tmp_path / "study.toml")]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "horizons" not in res["_meta"] and not (tmp_path / "out" / "cknna_vs_horizon.png").exists()
