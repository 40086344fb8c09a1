"""benchmarks/million.py at small N (HARNESS_BENCH_N scales it; the real run is N = 1M by
hand): the JSON has every part, recalls are fractions, and the exact tree lists agree with
brute force. Timings are printed, never asserted."""
import json
import math
import os

import pytest

pytestmark = pytest.mark.benchmark
pytest.importorskip("faiss")
pytest.importorskip("scipy")

N = min(int(os.environ.get("HARNESS_BENCH_N", 5000)), 5000)


def test_million_script_at_small_n():
    from benchmarks import million
    out = json.loads(json.dumps(million.run(n=N, dim=32, queries=200, sub=N // 2)))
    ks = [str(k) for k in million.KS]
    assert out["n"] == N and out["queries"] == 200 and out["subsample"]["m"] == N // 2
    assert set(out["stages"]) == {"data", "states_knn_tree", "features_knn_hnsw",
                                  "features_exact_on_queries", "states_exact_on_queries",
                                  "cknna_full_n", "subsample_exact_torch", "subsample_hnsw_tree"}
    assert all(s["s"] >= 0 and s["peak_rss_mb"] > 0 for s in out["stages"].values())
    for k in ks:
        assert 0 <= out["features_hnsw_recall"][k] <= 1
        assert 0 <= out["subsample"]["hnsw_recall"][k] <= 1
        assert out["states_tree_kth_value_max_abs_diff"][k] <= 1e-6
        assert math.isfinite(out["full_approximate"][k]["cknna"])
        sub = out["subsample"]
        assert sub["cknna_error"][k] == pytest.approx(sub["cknna_approximate"][k] - sub["cknna_exact"][k])
    print(f"\nN={N}: " + ", ".join(f"{name} {s['s']:.2f} s" for name, s in out["stages"].items()))
