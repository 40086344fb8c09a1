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


# Lower rank = further downhill; a module may import its own rank or lower ranks only.
RANKS = {
    "errors": 0, "io": 0, "states": 0, "provenance": 0, "pooling": 0, "hooks": 0,
    "progress": 0, "modality": 0, "residual_stream": 0, "device_memory": 0,
    "locks": 0, "ranks": 0, "threads": 0,
    "data": 1, "synth": 1, "lerobot_build": 1,
    "extractors": 2,
    "features": 3, "extra_outputs": 3, "state_input": 3,
    "neighbours": 4, "knn": 4, "knn_lowdim": 4, "cknna": 4, "significance": 4, "chance": 4,
    "graph_kernels": 4,
    "results": 5, "report": 5, "report_cells": 5, "report_html": 5, "views": 5, "figures": 5,
    "horizons": 5, "success": 5, "report_horizons": 5, "report_success": 5,
    "config": 6, "checks": 6,
    "pipeline": 7,
    "commands": 8, "cli": 8, "__main__": 8, "__init__": 8,
}


def _rank(module: str) -> int:
    return RANKS[module.split(".")[1] if "." in module else module]


def test_the_architecture_reads_downhill():
    """data -> extractors -> features -> metrics -> results/report; config, pipeline and
    the commands only wire (docs/architecture.md). Every import, at any depth, counts."""
    import ast
    package = UNIT.parents[1] / "harness"
    uphill = []
    for path in package.rglob("*.py"):
        module = ".".join(("harness",) + path.relative_to(package).with_suffix("").parts)
        if _rank(module if module.count(".") else "harness.__init__") == 8:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for target in targets:
                if target.startswith("harness.") and _rank(target) > _rank(module):
                    uphill.append(f"{module} imports {target}")
    assert uphill == []
