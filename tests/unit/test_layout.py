"""The layout: conftest marks a test by its directory, unit tests build no model (those
live in tests/equivalence), and harness/ is four rooms plus shared helpers whose imports
run only downhill (docs/architecture.md, drawn by tools/layout.py)."""
from __future__ import annotations

import re
from pathlib import Path

import conftest
from tools import layout

UNIT = Path(__file__).resolve().parent


def test_this_test_is_marked_unit_by_its_directory(request):
    assert request.node.get_closest_marker("unit") is not None
    assert request.node.get_closest_marker("equivalence") is None


def test_marker_for_each_directory():
    tests = UNIT.parent
    assert conftest.marker_for(tests / "unit" / "test_x.py") == "unit"
    for room in ("cknna", "data", "extractors", "study"):
        assert conftest.marker_for(tests / "unit" / room / "test_x.py") == "unit"
    assert conftest.marker_for(tests / "equivalence" / "test_x.py") == "equivalence"
    assert conftest.marker_for(tests / "benchmarks" / "test_x.py") == "benchmark"
    assert conftest.marker_for(tests / "gpu" / "test_x.py") == "gpu"
    assert conftest.marker_for(tests / "e2e" / "test_x.py") == "e2e"
    assert conftest.marker_for(tests / "test_x.py") is None


def test_no_unit_test_builds_a_model():
    builds = re.compile(r"harness\.extractors import .*\b(tiny|standins)\b|extract\w*\", \"\w+\", "
                        r"\"--ckpt\"|from_pretrained\(")
    assert len(list(UNIT.rglob("test_*.py"))) > len(list(UNIT.glob("test_*.py")))
    offenders = [p.name for p in UNIT.rglob("test_*.py")
                 if p.name != Path(__file__).name and builds.search(p.read_text())]
    assert offenders == []


# Which module stands in which room (docs/architecture.md); a new module is placed here.
ROOMS = {
    "shared": ["harness", "errors", "io", "provenance", "progress", "locks", "ranks", "threads"],
    "data": ["data", "data.layout", "data.check", "data.load", "data.write", "data.future",
             "data.states", "data.synth", "data.lerobot_build"],
    "extractors/engine": ["extractors", "extractors.engine", "extractors.engine.registry",
                          "extractors.engine.base", "extractors.engine.dtype_policy",
                          "extractors.engine.compat", "extractors.engine.observed",
                          "extractors.engine.hooks", "extractors.engine.residual_stream",
                          "extractors.engine.pooling", "extractors.engine.modality",
                          "extractors.engine.features", "extractors.engine.extra_outputs",
                          "extractors.engine.state_input"],
    "extractors": [f"extractors.{m}" for m in (
        "spatialvla", "pi0_lerobot", "starvla", "hf_vlm", "openvla", "smolvla", "pi05",
        "pi0_fast", "groot", "lerobot_state", "tiny", "standins", "openvla_standin",
        "smolvla_standin", "pi05_standin", "groot_standin")],
    "cknna": ["cknna", "cknna.core", "cknna.knn", "cknna.knn_lowdim", "cknna.neighbours",
              "cknna.graph_kernels", "cknna.topk_kernels", "cknna.device_memory",
              "cknna.significance", "cknna.chance", "cknna.horizons", "cknna.views"],
    "study/report": ["study.report", "study.report.markdown", "study.report.html",
                     "study.report.cells", "study.report.figures", "study.report.horizons",
                     "study.report.success"],
    "study": ["study", "study.config", "study.checks", "study.pipeline", "study.results",
              "study.success"],
    "wiring": ["cli", "__main__", "commands", "commands.cknna", "commands.data",
               "commands.extract", "commands.run", "commands.success"],
}


def _full(name: str) -> str:
    return name if name == "harness" else f"harness.{name}"


def test_every_module_stands_in_its_room():
    """The four rooms (data, extractors, the metric, the study) and the shared helpers hold
    exactly the modules listed above, in the order the downhill rule reads."""
    assert tuple(ROOMS) == layout.ROOMS
    placed = {_full(m): room for room, names in ROOMS.items() for m in names}
    assert sorted(placed) == sorted(layout.modules())
    assert {m: layout.room_of(m) for m in placed} == placed


def test_the_rooms_read_downhill():
    """No import from a lower room to a higher one, at any depth (docs/architecture.md)."""
    assert layout.uphill(layout.graph()) == []


def test_no_circles():
    assert layout.circles(layout.graph()) == []


def test_imports_are_read_at_any_depth():
    """The rule's reader sees an import inside a function, resolves `from P import module`
    to the module and a relative import to its package, and flags what runs uphill."""
    known = layout.modules()
    source = ("import torch\n"
              "from harness.cknna import graph_kernels, EPS\n"
              "def late():\n"
              "    from harness.study import pipeline\n"
              "    from . import check\n")
    found = layout.imports_of("harness.data.load", source, known)
    assert found == {"harness.cknna.graph_kernels", "harness.cknna", "harness.study.pipeline",
                     "harness.data.check"}
    assert len(layout.uphill({"harness.data.load": found})) == 3
    assert layout.circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_import_names_a_module_of_this_tree(tmp_path):
    """An import left at an old path fails here, even where an editable install of another
    checkout would still answer it."""
    root = layout.ROOT
    files = [p for d in ("harness", "tests", "benchmarks", "tools") for p in (root / d).rglob("*.py")]
    assert layout.stale_imports(files + [root / "conftest.py"]) == []
    old = tmp_path / "old_paths.py"
    old.write_text("from harness import knn, io\nfrom harness.cknna import cknna, nothing\n"
                   "import harness.significance\nfrom harness.results import compute\n")
    found = [line.split(": ")[1] for line in layout.stale_imports([old])]
    assert found == ["harness.knn", "harness.cknna.nothing", "harness.significance",
                     "harness.results"]


def test_the_architecture_page_is_current():
    """docs/architecture.md carries the picture the code's imports draw today;
    `python -m tools.layout --write` redraws it."""
    assert layout.block() in layout.DOC.read_text()


def test_test_modules_have_unique_names():
    """Folders without __init__.py import their tests by file name alone, so two equal
    names there would clash at collection."""
    tests = UNIT.parent
    bare = [p for p in tests.rglob("test_*.py")
            if not (p.parent / "__init__.py").is_file()]
    names = [p.name for p in bare]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
