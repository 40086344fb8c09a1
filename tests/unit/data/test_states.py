"""`harness.data.states`: the one home of state preprocessing (L2 rows, z-score, its record)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.data import states
from harness.errors import HarnessError


def test_l2_rows_have_unit_norm_and_keep_direction():
    x = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    out = states.l2_rows(x)
    assert out.dtype == torch.float64  # normalised in float64 (ties at input precision)
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.0, -1.0]], dtype=torch.float64),
                          rtol=0, atol=1e-15)


def test_a_zero_row_is_an_error_naming_the_file():
    x = torch.ones(5, 3)
    x[3] = 0
    assert states.zero_rows(x) == [3]
    with pytest.raises(HarnessError, match=r"feats_B.pt: 1 rows have zero norm \(first rows \[3\]\)"):
        states.normalised("feats_B.pt", x)


def test_zscore_matches_numpy_population_std():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(30, 4)) * [1, 10, 0.1, 3] + [5, -2, 0, 1]
    z, rec = states.zscore(torch.tensor(raw, dtype=torch.float32), ["a", "b", "c", "d"])
    raw32 = raw.astype(np.float32).astype(np.float64)
    want = (raw32 - raw32.mean(0)) / raw32.std(0)
    np.testing.assert_allclose(z.numpy(), want, atol=1e-5)
    assert rec["state_keys"] == ["a", "b", "c", "d"] and rec["ddof"] == 0


def test_standardised_refuses_constant_columns():
    x = torch.randn(10, 3)
    x[:, 1] = 2.0
    with pytest.raises(HarnessError, match=r"s.pt: columns \[1\] are constant"):
        states.standardised("s.pt", x)


def test_record():
    assert states.record(None) == {"row_l2_normalised": True, "feats_B_zscored": False,
                                   "feats_B_zscore": None}
    rec = states.record({"option": "zscore_states"}, [])
    assert rec["feats_B_zscored"] is True and rec["data_options"] == []
