"""CKNNA at N = 1,000,000: approximate (HNSW) lists for 256-D features, exact k-d tree lists
for 7-D states, with the approximation's cost measured.

    python benchmarks/million.py                      # N = 1,000,000 (about 15-30 min, 2 cores)
    python benchmarks/million.py --n 20000 --output million.json   # quick

Data: random-walk-like robot episodes (smooth 6-D pose paths, a binary gripper, rest frames
at each episode's start, states rounded to 1e-3, so exact duplicates exist) and features
= random Fourier features of the states plus noise (a model that sees the state, blurred).
States are z-scored, both sides L2-normalised, as `harness cknna --zscore_B` does.

What is compared (no exact CKNNA exists at 1M here: an exact feature search is N^2 D =
2.6e14 multiply-adds):
- recall@k of the HNSW feature lists against exact top-k for `--queries` random rows
  (exact: those rows' inner products with all N rows, in blocks);
- on the same rows, mutual kNN (index rule, |kNN_A(i) ∩ kNN_B(i)| / k) from HNSW vs exact
  feature lists: mutual kNN is a mean over rows, so this estimates the full-N error;
- CKNNA (not a mean over rows) on a random subsample of `--sub` samples: exact torch
  search of both spaces vs HNSW features + tree states built on that subsample;
- CKNNA and mutual kNN at k = 5, 10, 20 on all N with the approximate lists, through the
  same Space/tie_graph path as `harness cknna`.
Times per stage and the process's peak resident memory after each (ru_maxrss). Prints one
JSON object; --output writes it atomically."""
from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness import cknna as C  # noqa: E402
from harness.io import write_json  # noqa: E402
from harness.cknna.knn import TIE_MARGIN, Neighbours, _block_topk, knn, recall  # noqa: E402

KS = (5, 10, 20)
EPISODE = 40  # frames per episode
REST = 4  # identical frames at each episode's start (robot at rest)


def make_data(n: int, dim: int, noise: float, seed: int):
    """(states (n, 7), features (n, dim)), both L2-normalised, states z-scored first."""
    g = torch.Generator().manual_seed(seed)
    episodes = math.ceil(n / EPISODE)
    start = torch.rand(episodes, 1, 6, generator=g) * 2 - 1
    velocity = (torch.randn(episodes, EPISODE, 6, generator=g) * 0.02).cumsum(1)  # smooth
    velocity[:, :REST] = 0
    pose = start + velocity.cumsum(1)
    t = torch.arange(EPISODE).view(1, -1)
    close = torch.randint(REST + 1, EPISODE // 2, (episodes, 1), generator=g)
    gripper = ((t >= close) & (t < close + EPISODE // 3)).float().unsqueeze(2)
    states = torch.cat([pose, gripper], dim=2).reshape(-1, 7)[:n]
    states = torch.round(states * 1000) / 1000
    states = (states - states.mean(0)) / states.std(0)
    w = torch.randn(7, dim, generator=g) * 1.5
    b = torch.rand(dim, generator=g) * 2 * math.pi
    feats = torch.empty(n, dim)
    for s in range(0, n, 1 << 16):  # in chunks: no second (n, dim) temporary
        block = torch.cos(states[s:s + (1 << 16)] @ w + b)
        feats[s:s + (1 << 16)] = block + noise * torch.randn(block.shape, generator=g)
    unit = torch.nn.functional.normalize
    return unit(states, dim=1), unit(feats, dim=1)


def exact_rows(x: torch.Tensor, rows: torch.Tensor, k: int, chunk: int = 64):
    """Exact top-k (torch tie rule) of `rows` among all rows of x, self excluded."""
    values, indices = [], []
    for s in range(0, len(rows), chunk):
        q = rows[s:s + chunk]
        gram = x[q] @ x.T
        gram[torch.arange(len(q)), q] = float("-inf")
        v, i = _block_topk(gram, k)
        values.append(v)
        indices.append(i)
    return torch.cat(values), torch.cat(indices)


def overlap(a_idx: torch.Tensor, b_idx: torch.Tensor) -> float:
    """Mean over rows of |a ∩ b| / k (index rule)."""
    return (a_idx.unsqueeze(2) == b_idx.unsqueeze(1)).any(2).double().mean().item()


def run(n: int = 1_000_000, dim: int = 256, noise: float = 0.5, queries: int = 2000,
        sub: int = 20000, seed: int = 0) -> dict:
    stages = {}
    length = max(KS) + TIE_MARGIN  # what Space searches for k_max = 20

    def stage(name, fn):
        start = time.perf_counter()
        result = fn()
        stages[name] = {"s": round(time.perf_counter() - start, 3),
                        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        print(f"{name}: {stages[name]}", file=sys.stderr, flush=True)
        return result

    states, feats = stage("data", lambda: make_data(n, dim, noise, seed))
    out = {"n": n, "dim_features": dim, "dim_states": 7, "noise": noise, "ks": list(KS),
           "list_length": length, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "stages": stages}
    nb_states = stage("states_knn_tree", lambda: knn(states, length, backend="tree"))
    nb_feats = stage("features_knn_hnsw", lambda: knn(feats, length, backend="faiss-hnsw"))
    out["hnsw_missing_entries"] = int((nb_feats.indices < 0).sum())

    g = torch.Generator().manual_seed(seed + 1)
    rows = torch.randperm(n, generator=g)[:min(queries, n)]
    fv, fi = stage("features_exact_on_queries", lambda: exact_rows(feats, rows, length))
    sv, si = stage("states_exact_on_queries", lambda: exact_rows(states, rows, length))
    out["queries"] = len(rows)
    out["features_hnsw_recall"] = {
        k: recall(Neighbours(nb_feats.indices[rows, :k], nb_feats.values[rows, :k]),
                  Neighbours(fi[:, :k], fv[:, :k])) for k in KS}
    # The tree is exact: its k-th values equal brute force (index order among ties may not).
    out["states_tree_kth_value_max_abs_diff"] = {
        k: (nb_states.values[rows, k - 1] - sv[:, k - 1]).abs().max().item() for k in KS}
    out["mutual_knn_on_queries"] = {
        k: {"exact": overlap(fi[:, :k], si[:, :k]),
            "approximate": overlap(nb_feats.indices[rows, :k], nb_states.indices[rows, :k])}
        for k in KS}

    def full():
        sa = C.Space(feats, max(KS), neighbours=nb_feats)
        sb = C.Space(states, max(KS), neighbours=nb_states)
        scores = {}
        for k in KS:
            s = C.space_scores(sa, sb, k)
            scores[k] = {"cknna": s.cknna, "mutual_knn": s.mutual_knn,
                         "tied_rows_features": sa.graph(k).tied_rows,
                         "tied_rows_states": sb.graph(k).tied_rows}
        return scores
    out["full_approximate"] = stage("cknna_full_n", full)

    idx = torch.randperm(n, generator=g)[:min(sub, n)]
    a, b = feats[idx], states[idx]

    def on_subsample(**options):
        sa = C.Space(a, max(KS), knn_options=options.get("a", {}))
        sb = C.Space(b, max(KS), knn_options=options.get("b", {}))
        return sa, {k: C.space_scores(sa, sb, k).cknna for k in KS}
    exact_sa, exact = stage("subsample_exact_torch", lambda: on_subsample())
    approx_sa, approx = stage("subsample_hnsw_tree", lambda: on_subsample(
        a={"backend": "faiss-hnsw"}, b={"backend": "tree"}))
    out["subsample"] = {
        "m": len(idx), "cknna_exact": exact, "cknna_approximate": approx,
        "cknna_error": {k: approx[k] - exact[k] for k in KS},
        "hnsw_recall": {k: recall(approx_sa.neighbours.prefix(k), exact_sa.neighbours.prefix(k))
                        for k in KS}}
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256, help="feature width")
    p.add_argument("--noise", type=float, default=0.5, help="feature noise per column")
    p.add_argument("--queries", type=int, default=2000, help="rows for recall@k")
    p.add_argument("--sub", type=int, default=20000, help="subsample for the CKNNA error")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", metavar="F.json")
    args = p.parse_args()
    if args.n < 4 * max(KS) or args.queries < 1 or args.sub < 4 * max(KS):
        p.error(f"--n and --sub must be >= {4 * max(KS)}, --queries >= 1")
    out = run(args.n, args.dim, args.noise, args.queries, args.sub, args.seed)
    print(json.dumps(out, indent=1))
    if args.output:
        write_json(args.output, out)


if __name__ == "__main__":
    main()
