"""The metric: CKNNA, mutual kNN and linear CKA (`core`), the neighbour search under them
(`knn`, `knn_lowdim`, `neighbours`, `graph_kernels`, `device_memory`), their significance
and chance levels (`significance`, `chance`), and CKNNA against future states and per
representation (`horizons`, `views`).

This package is the metric's public face: `from harness.cknna import cknna, Space`."""
from harness.cknna.core import (EPS, TIES, Scores, Space, all_rows_equal, cka, cknna,
                                mutual_knn, pair_scores, scores_from_neighbours, space_scores,
                                subsample_neighbours)

__all__ = ["EPS", "TIES", "Scores", "Space", "all_rows_equal", "cka", "cknna", "mutual_knn",
           "pair_scores", "scores_from_neighbours", "space_scores", "subsample_neighbours"]
