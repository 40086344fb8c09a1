"""Project-wide pytest setup: offline hub, markers, hypothesis profiles, gpu skips.

A test's marker is its directory: tests/unit -> `unit`, tests/equivalence ->
`equivalence`, tests/gpu -> `gpu`, tests/e2e -> `e2e`, tests/benchmarks -> `benchmark`.
Moving a file moves its marker; no file declares its own."""
import os
from pathlib import Path

# Read by huggingface_hub/transformers at import time: set before anything imports them.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from harness import threads  # noqa: E402  (imports no torch)

# The session's torch threads, chosen as `harness` chooses them (README, Threads): on a
# machine shared with other jobs, torch's one-thread-per-core default oversubscribes the
# cores (measured: `pytest -m unit` 42 s alone, 6:50 beside one CPU-bound job). Set before
# torch is imported, and inherited by every `python -m harness` the tests start.
THREADS = threads.choose(workers=int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ["OMP_NUM_THREADS"] = os.environ["HARNESS_THREADS"] = str(THREADS.threads)


def pytest_report_header(config):
    return f"harness threads: {THREADS.record()}"

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_addoption(parser):
    parser.addoption(
        "--stand-ins", action="store_true", default=False,
        help="run the gpu suite on CPU against tiny random-weight stand-ins",
    )
    parser.addoption(
        "--data-dir", default=None,
        help="data directory (metadata.json, images/, feats_B.pt) for the gpu suite",
    )


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


MARKER_OF_DIRECTORY = {"unit": "unit", "equivalence": "equivalence", "gpu": "gpu",
                       "e2e": "e2e", "benchmarks": "benchmark"}
TESTS = Path(__file__).resolve().parent / "tests"


def marker_for(path) -> str | None:
    """The marker of a test file: the name of its directory right under tests/."""
    try:
        first = Path(path).resolve().relative_to(TESTS).parts[0]
    except (ValueError, IndexError):
        return None
    return MARKER_OF_DIRECTORY.get(first)


@pytest.hookimpl(tryfirst=True)  # before `-m` selection, which reads these markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = marker_for(item.path)
        if marker is None:
            raise pytest.UsageError(f"{item.nodeid}: test outside tests/"
                                    f"{{{','.join(MARKER_OF_DIRECTORY)}}} has no marker")
        item.add_marker(getattr(pytest.mark, marker))
    if config.getoption("--stand-ins") or _cuda_available():
        return
    skip = pytest.mark.skip(
        reason="needs CUDA and real checkpoints; pass --stand-ins to run on CPU stand-ins")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
