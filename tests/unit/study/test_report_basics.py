"""`harness.study.report.markdown`: the markdown views show the JSON's numbers, failures and notice;
figures are written as PNG files."""
from __future__ import annotations

import math

from harness.study.report import markdown as report

RESULTS = {
    "_meta": {"N": 40, "k_values": [5, 10], "permutations": 20, "seed": 0,
              "preprocessing": {"feats_B_zscored": True},
              "knn": {"tie_rule": "lower index first"}, "git": "abc", "versions": {},
              "study": {"notice": "STAND-INS", "data_dir": "d", "dataset_fingerprint": "sha256:1",
                        "config": "study.toml",
                        "models": {"a": {"status": "extracted", "feats_A_path": "a/feats_A.pt"},
                                   "b": {"status": "extracted", "feats_A_path": "b/feats_A.pt"},
                                   "c": {"status": "failed", "error": "boom\nKeyError: x"}}}},
    "models": {"a": {"feats_A_dim": 8, "cknna_k5": 0.123456, "cknna_k10": 0.25,
                     "mutual_knn_k5": 0.5, "mutual_knn_k10": 0.4, "p_value_k5": 0.0476,
                     "p_value_k10": 0.0476,
                     "details": {"k5": {"permutation": {"null_mean": 0.01, "null_std": 0.002}},
                                 "k10": {"permutation": {"null_mean": 0.02, "null_std": 0.003}}}},
               "b": {"feats_A_dim": 4, "cknna_k5": float("nan"), "cknna_k10": 0.00012,
                     "mutual_knn_k5": 0.1, "mutual_knn_k10": 0.2, "p_value_k5": 1.0,
                     "p_value_k10": 0.5, "details": {"k5": {}, "k10": {}}}},
    "pairwise": {"labels": ["a", "b"], "cknna_k5": [[1.0, 0.2], [0.3, 1.0]],
                 "cknna_k10": [[1.0, 0.25], [0.35, 1.0]]},
    "layers": {"a": {"0": {"k5": 0.01, "k10": 0.02}, "3": {"k5": 0.1, "k10": 0.2}}},
}


def _row(text: str, label: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_table_shows_the_json_numbers():
    table = report.markdown_table(RESULTS)
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert header == ["model", "dim", "k", "CKNNA", "chance (null mean)", "excess", "p",
                      "p adj. (BH)", "vs chance", "mkNN"]
    rows = [[c.strip() for c in x.strip("|").split("|")] for x in table.splitlines()
            if x.startswith("| a |")]
    # the fixture's records carry no adjusted p: the verdict falls back to the raw p
    assert rows[0][:7] == ["a", "8", "5", "0.1235", "0.0100", "", "0.0476"]
    assert rows[1][:4] == ["a", "8", "10", "0.2500"] and rows[1][-1] == "0.4000"
    b = [[c.strip() for c in x.strip("|").split("|")] for x in table.splitlines()
         if x.startswith("| b |")]
    assert b[0][3] == "NaN" and b[1][3] == "1.20e-04"  # NaN shown, small values not rounded to 0
    assert "CKNNA(row, column), k=5" in table and "| a | 1.0000 | 0.2000 |" in table


def test_study_report_lists_status_notice_and_layers():
    text = report.study_markdown(RESULTS)
    assert "**STAND-INS**" in text and "z-scored: True" in text and "(40 samples" in text
    assert _row(text, "c")[:2] == ["c", "failed"] and "KeyError: x" in _row(text, "c")[2]
    assert "## Per-layer CKNNA: a" in text and "| 3 | 0.1000 | 0.2000 |" in text


def test_heatmap_k_prefers_ten():
    assert report.heatmap_k([5, 10, 20]) == 10
    assert report.heatmap_k([5, 20]) == 5


def test_write_report_writes_every_file(tmp_path):
    files = report.write_report(RESULTS, tmp_path)
    assert set(files) == {"json", "markdown", "html", "cknna_vs_k", "heatmap", "layers"}
    for path in files.values():
        assert path.is_file() and path.stat().st_size > 0
    for key in ("cknna_vs_k", "heatmap", "layers"):
        assert files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    assert math.isnan(RESULTS["models"]["b"]["cknna_k5"])  # input not modified
