"""Time and peak memory of a study's metric stage at N = 50,000 (issue 14, item 6).

    python benchmarks/large_study.py                       # N=50000, D_A=2048, k=5,10,20
    python benchmarks/large_study.py --n 2000 --models 2   # a quick check

Runs `harness.study.results.compute` (what `harness run` and `harness cknna` call) on
synthetic features: each model's A = B·W + noise (so CKNNA is well above chance), with
mutual kNN and a permutation null, then the horizon scores against (N, H+1, 7) future
states. Peak memory is the process's VmHWM (reset through /proc/self/clear_refs just
before the stage) and its rise over the resident set the inputs already hold; an N×N
float32 matrix at N=50,000 would be 10 GB, so a rise far below that shows none is
built. Not part of CI (it takes minutes). Prints one JSON object."""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness.cknna import horizons as H  # noqa: E402
from harness.study.results import Settings, compute  # noqa: E402
from harness.data.states import l2_rows  # noqa: E402


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def inputs(n: int, dim_a: int, models: int, horizon: int, seed: int):
    """Smooth random-walk states (N, H+1, 7) and models that see the current state."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randn(n, horizon + 1, 7, generator=g) * 0.05
    seq = torch.randn(n, 1, 7, generator=g) + steps.cumsum(dim=1)
    feats = {}
    for m in range(models):
        w = torch.randn(7, dim_a, generator=g)
        a = seq[:, 0] @ w + 2.0 * torch.randn(n, dim_a, generator=g)
        feats[f"model{m}"] = ("synthetic", l2_rows(a))
    return seq, feats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--dim-a", type=int, default=2048)
    p.add_argument("--models", type=int, default=1)
    p.add_argument("--permutations", type=int, default=5)
    p.add_argument("--horizons", type=int, nargs="*", default=[0, 4])
    p.add_argument("--skip-metrics", action="store_true",
                   help="time only the horizon stage (its own kNN search of each model)")
    p.add_argument("--output", help="also write the JSON here")
    args = p.parse_args()
    ks = [5, 10, 20]
    seq, models = inputs(args.n, args.dim_a, args.models, max(args.horizons or [0]), 0)
    states = l2_rows(seq[:, 0].contiguous())
    input_mb = (sum(a.numel() for _, a in models.values()) + seq.numel()) * 4 / 2**20
    settings = Settings(ks=ks, mutual=True, permutations=args.permutations,
                        pairwise=args.models > 1)

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    base = rss_mb("VmRSS")
    start = time.perf_counter()
    results = (None if args.skip_metrics else
               compute(models, states, "synthetic", settings, {"row_l2_normalised": True}))
    metrics_s = time.perf_counter() - start
    peak_metrics = rss_mb("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    by_horizon = H.horizon_scores(models, seq, args.horizons, settings) if args.horizons else {}
    horizons_s = time.perf_counter() - start
    out = {
        "n": args.n, "dim_a": args.dim_a, "dim_b": 7, "models": args.models, "ks": ks,
        "permutations": args.permutations, "horizons": args.horizons,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "inputs_mb": round(input_mb, 1),
        "rss_before_stage_mb": round(base, 1),
        "metric_stage_seconds": round(metrics_s, 1),
        "metric_stage_peak_rss_mb": round(peak_metrics, 1),
        "metric_stage_peak_rise_mb": round(peak_metrics - base, 1),
        "horizon_stage_seconds": round(horizons_s, 1),
        "horizon_stage_peak_rss_mb": round(rss_mb("VmHWM"), 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "nxn_float32_would_be_mb": round(args.n * args.n * 4 / 2**20, 1),
        "cknna": {label: {f"k{k}": m[f"cknna_k{k}"] for k in ks}
                  for label, m in (results or {"models": {}})["models"].items()},
        "cknna_by_horizon": by_horizon,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
