"""Time and peak memory of the CKNNA stage for one model, against its baselines.

    python benchmarks/cknna_stage.py --n 5000 --dim-a 2304 --dense      # the issue's targets
    python benchmarks/cknna_stage.py --n 100000 --dim-a 2048            # large N, exact
    python benchmarks/cknna_stage.py --n 5000 --permutations 1000       # the null
    python benchmarks/cknna_stage.py --n 20000 --dim-a 256 --faiss      # FAISS time and recall

Peak extra memory is the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) over what the inputs already hold. Prints one JSON object."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness import cknna as C  # noqa: E402
from harness.cknna import significance as S  # noqa: E402
from harness.cknna.knn import knn, recall  # noqa: E402

KS = (5, 10, 20)


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(fn):
    """(seconds, peak extra MB, result) of one call."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = rss_mb("VmRSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return seconds, rss_mb("VmHWM") - base, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--dim-a", type=int, default=2304)
    p.add_argument("--dim-b", type=int, default=7)
    p.add_argument("--dense", action="store_true", help="also time the dense reference")
    p.add_argument("--permutations", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--faiss", action="store_true",
                   help="also time the FAISS backends on A and measure HNSW recall@20")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(args.n, args.dim_a, generator=g), dim=1)
    b = torch.nn.functional.normalize(torch.randn(args.n, args.dim_b, generator=g), dim=1)
    out = {"n": args.n, "dim_a": args.dim_a, "dim_b": args.dim_b, "ks": KS,
           "threads": torch.get_num_threads(), "torch": torch.__version__}

    def best(fn, repeats):
        runs = [measure(fn) for _ in range(repeats)]
        return min(r[0] for r in runs), max(r[1] for r in runs), runs[0][2]

    if args.n <= 20000:
        out["gram_s"], out["gram_extra_mb"], _ = best(lambda: a @ a.T, args.repeats)
    out["engine_s"], out["engine_extra_mb"], result = best(lambda: S.align(a, b, KS), args.repeats)
    out["cknna"] = {k: r["cknna"] for k, r in result.items()}
    if "gram_s" in out:
        out["engine_over_gram"] = out["engine_s"] / out["gram_s"]
    if args.dense:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from dense_reference import dense_cknna, dense_mutual_knn
        out["dense_s"], out["dense_extra_mb"], _ = best(lambda: {
            k: (dense_cknna(a, b, k, torch.float32), dense_mutual_knn(a, b, k, torch.float32))
            for k in KS}, 1)
        out["dense_over_engine"] = out["dense_s"] / out["engine_s"]
    if args.permutations:
        na, nb = C.Space(a, max(KS)), C.Space(b, max(KS))
        observed = C.space_scores(na, nb, 10)
        out["permutations"] = args.permutations
        out["permutation_k10_s"], _, _ = best(
            lambda: S.permutation_null(na, nb, observed, args.permutations), 1)
    if args.faiss:
        exact_s, _, exact = best(lambda: knn(a, max(KS)), 1)
        out["knn_a_torch_s"] = exact_s
        for backend in ("faiss-flat", "faiss-hnsw"):
            t, _, found = best(lambda: knn(a, max(KS), backend=backend), 1)
            out[f"knn_a_{backend}_s"] = t
            out[f"knn_a_{backend}_recall"] = recall(found, exact)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
