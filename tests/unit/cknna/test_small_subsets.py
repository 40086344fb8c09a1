"""Intervals on a study too small for its k: one clear error, not a traceback from deep in
the neighbour search (found running a 40-sample, k = 15 study with compare)."""
import pytest
import torch

from harness.study import results
from harness.data import load
from harness.errors import HarnessError
from harness.data.states import l2_rows
from harness.data.synth import generate


def _study(tmp_path):
    generate(tmp_path / "data", 40, 1)
    data = load(tmp_path / "data")
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    models = {"a": ("a", l2_rows(x)), "b": ("b", l2_rows(x.flip(0)))}
    return models, l2_rows(data.states), torch.tensor(data.episodes)


def test_a_k_too_large_for_the_half_size_subsets_names_both(tmp_path):
    models, states, groups = _study(tmp_path)
    s = results.Settings(ks=[5, 15], subsample_draws=200, subsample_fraction=0.88,
                         groups=groups, compare=True)
    with pytest.raises(HarnessError, match=r"too few for k = 15.*smaller k"):
        results.compute(models, states, "b", s, {})


def test_the_same_study_with_a_small_k_runs(tmp_path):
    models, states, groups = _study(tmp_path)
    s = results.Settings(ks=[3], subsample_draws=200, subsample_fraction=0.88,
                         groups=groups, compare=True)
    assert set(results.compute(models, states, "b", s, {})["models"]) == {"a", "b"}
