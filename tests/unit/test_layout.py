"""The test layout is the marker: conftest marks a test by its directory, and unit tests
build no model (those live in tests/equivalence)."""
from __future__ import annotations

import re
from pathlib import Path

import conftest

UNIT = Path(__file__).resolve().parent


def test_this_test_is_marked_unit_by_its_directory(request):
    assert request.node.get_closest_marker("unit") is not None
    assert request.node.get_closest_marker("equivalence") is None


def test_marker_for_each_directory():
    tests = UNIT.parent
    assert conftest.marker_for(tests / "unit" / "test_x.py") == "unit"
    assert conftest.marker_for(tests / "equivalence" / "test_x.py") == "equivalence"
    assert conftest.marker_for(tests / "benchmarks" / "test_x.py") == "benchmark"
    assert conftest.marker_for(tests / "gpu" / "test_x.py") == "gpu"
    assert conftest.marker_for(tests / "e2e" / "test_x.py") == "e2e"
    assert conftest.marker_for(tests / "test_x.py") is None


def test_no_unit_test_builds_a_model():
    builds = re.compile(r"harness\.extractors import .*\b(tiny|standins)\b|extract\w*\", \"\w+\", "
                        r"\"--ckpt\"|from_pretrained\(")
    offenders = [p.name for p in UNIT.glob("test_*.py")
                 if p.name != Path(__file__).name and builds.search(p.read_text())]
    assert offenders == []
