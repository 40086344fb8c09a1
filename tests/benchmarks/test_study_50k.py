"""benchmarks/study_50k.py at small N (the real run is N = 50,000 by hand): it prints its
JSON and, with --output, writes the same object to a file. Timings are never asserted."""
import json
import sys

import pytest

pytestmark = pytest.mark.benchmark


def test_study_50k_script_writes_what_it_prints(tmp_path, monkeypatch, capsys):
    from benchmarks import study_50k
    out = tmp_path / "results" / "study_50k.json"
    out.parent.mkdir()
    monkeypatch.setattr(sys, "argv", ["study_50k.py", "--n", "400", "--permutations", "10",
                                      "--draws", "10", "--output", str(out)])
    study_50k.main()
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    assert printed["n"] == 400 and printed["models"] == 5 and printed["permutations"] == 10
    assert printed["stage_s"] > printed["knn_searches_s"] > 0 and printed["peak_extra_mb"] >= 0
    assert [p.name for p in out.parent.iterdir()] == ["study_50k.json"]  # no temp file left
