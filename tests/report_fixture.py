"""A results dict with every optional part (pairwise, permutations, subsample intervals,
CKA, per-layer scores) from small random data, for report tests."""
from __future__ import annotations

import torch

from harness.study.results import Settings, compute, l2_rows

N = 60


def full_results(permutations: int = 30, subsample: int = 10) -> dict:
    g = torch.Generator().manual_seed(0)
    states = torch.randn(N, 7, generator=g)
    related = torch.cat([states * 2, 0.3 * torch.randn(N, 5, generator=g)], dim=1)
    models = {"related-model": ("related/feats_A.pt", l2_rows(related)),
              "noise-model": ("noise/feats_A.pt", l2_rows(torch.randn(N, 9, generator=g)))}
    layers = {"related-model": {str(i): l2_rows(related + i * torch.randn(N, 12, generator=g))
                                for i in range(3)}}
    settings = Settings(ks=[5, 10], permutations=permutations, subsample_draws=subsample,
                        pairwise=True, cka=True)
    return compute(models, l2_rows(states), "feats_B.pt", settings,
                   {"row_l2_normalised": True, "feats_B_zscored": False}, layers=layers)
