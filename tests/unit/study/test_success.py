"""CKNNA against task success across models: the seed authors' published table (real
input, copied verbatim with its CRLF line endings) and an independent rank correlation."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from harness.study import success
from harness.cli import main
from harness.study.config import parse
from harness.study.report.success import success_markdown

TABLE = Path(__file__).resolve().parents[2] / "data" / "starVLA__cknna__record__cknna_3way_5k.csv"


def independent_spearman(x, y) -> float:
    """Spearman's rho written apart from harness.study.success: mid-ranks from a value -> mean
    position table, then numpy's Pearson correlation."""
    def midranks(v):
        positions = {}
        for pos, value in enumerate(sorted(v), start=1):
            positions.setdefault(value, []).append(pos)
        return [sum(positions[value]) / len(positions[value]) for value in v]
    return float(np.corrcoef(midranks(x), midranks(y))[0, 1])


def table_columns(cknna_column):
    """(names, cknna, success) of the rows where both cells are numbers, read with csv."""
    with open(TABLE, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r[cknna_column] and r["WidowX_avg"]]
    return ([r["Model"] for r in rows], [float(r[cknna_column]) for r in rows],
            [float(r["WidowX_avg"]) for r in rows])


def test_the_fixture_is_the_published_file_unchanged():
    raw = TABLE.read_bytes()
    assert raw.count(b"\r\n") == 18 and raw.startswith(b"Model,dir_name,WidowX_avg,")
    original = Path("/work/shared/real/starVLA__cknna__record__cknna_3way_5k.csv")
    if original.is_file():
        assert raw == original.read_bytes()


def test_ranks_share_ties():
    assert success.ranks([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert success.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert success.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


@pytest.mark.parametrize("column", ["CKNNA_proprio_imgtext_k10", "CKNNA_proprio_img_k10",
                                    "CKNNA_action_imgtext_k10"])
def test_cli_on_the_published_table(column, tmp_path, capsys):
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    assert main(["success", "--csv", str(TABLE), "--cknna_column", column,
                 "--success_column", "WidowX_avg", "--output", str(out), "--plot", str(png)]) == 0
    record = json.loads(out.read_text())["correlations"][column]
    names, x, y = table_columns(column)
    assert record["models"] == names and record["n_models"] == len(names)
    assert record["spearman_rho"] == pytest.approx(independent_spearman(x, y), abs=1e-12)
    iv = record["interval"]
    assert iv["low"] < record["spearman_rho"] < iv["high"] and iv["draws"] == 2000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert f"{len(names)} models" in printed
    if column == "CKNNA_proprio_img_k10":  # RT-1-X and Octo have no image split
        assert record["left_out"] == ["Octo-base", "RT-1-X"] and "left out" in printed


def test_bootstrap_is_seeded_and_exact_for_a_monotone_relation():
    x, y = [0.1, 0.2, 0.3], [1, 4, 9]  # 1 in 9 resamples repeats one model thrice
    a, b = success.bootstrap(x, y, 300, seed=1), success.bootstrap(x, y, 300, seed=1)
    assert a == b and a["low"] == a["high"] == pytest.approx(1.0)
    assert a["draws_without_rho"] > 0  # a resample of one repeated model has no rho


def test_fewer_than_three_models_give_no_rho():
    record = success.correlate({"a": 0.1, "b": 0.2, "c": float("nan")}, {"a": 0.5, "b": 0.7, "c": 0.1})
    assert record["spearman_rho"] is None and record["n_models"] == 2
    assert "needs at least 3" in record["note"] and record["left_out"] == ["c"]


def test_study_section_and_report(tmp_path):
    models = {"m1": 0.05, "m2": 0.11, "m3": 0.08, "m4": 0.09}
    rates = {"m1": 0.2, "m2": 0.7, "m3": 0.4, "m4": 0.3}
    results = {"_meta": {"k_values": [10]},
               "models": {m: {"cknna_k10": v} for m, v in models.items()}}
    results["success"] = success.study_section(results, rates)
    r = results["success"]["k10"]
    assert r["spearman_rho"] == pytest.approx(independent_spearman(
        list(models.values()), [rates[m] for m in models]), abs=1e-12)
    text = success_markdown(results)
    assert "rests on 4 models only" in text and "| 10 | 4 |" in text


def test_config_success_rate_is_a_fraction():
    base = {"data_dir": "d", "models": [{"name": "m", "feats": "f.pt", "success_rate": 0.4}]}
    config, problems = parse(base)
    assert not problems and config.models[0].success_rate == 0.4
    base["models"][0]["success_rate"] = 47.9
    _, problems = parse(base)
    assert problems and problems[0].startswith("models[0].success_rate")


def test_cli_bad_column_is_one_line_exit_2(capsys, tmp_path):
    assert main(["success", "--csv", str(TABLE), "--cknna_column", "CKNNA_k10",
                 "--success_column", "WidowX_avg", "--output", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert "--cknna_column 'CKNNA_k10': not a column of" in err and err.count("\n") == 1
    assert not (tmp_path / "o.json").exists()
