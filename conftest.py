"""Project-wide pytest setup: offline hub, markers, hypothesis profiles, gpu skips."""
import os

# Read by huggingface_hub/transformers at import time: set before anything imports them.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

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


def pytest_collection_modifyitems(config, items):
    if config.getoption("--stand-ins") or _cuda_available():
        return
    skip = pytest.mark.skip(
        reason="needs CUDA and real checkpoints; pass --stand-ins to run on CPU stand-ins")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
