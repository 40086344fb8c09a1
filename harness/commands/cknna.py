"""`python -m harness cknna`: a drop-in for the seed's compute_cknna.py, plus extras.

Same flags and a superset of the same JSON; every input is checked before any work, and
nothing is written unless all of it succeeds."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


from harness.commands import resolve_device
from harness.errors import HarnessError
from harness.io import check_output_file, load_features, write_json
from harness.knn import BACKENDS
from harness.report import heatmap, heatmap_k, markdown_table, nan_note
from harness.results import Settings, compute
from harness.states import normalised, standardised
from harness.states import record as preprocessing_record


def register(sub) -> None:
    p = sub.add_parser("cknna", help="CKNNA of model features against states (and each other)",
                       description=__doc__)
    p.add_argument("--feats_A", nargs="+", required=True, metavar="P",
                   help="model features; each labelled by its parent folder's name")
    p.add_argument("--feats_B", required=True, metavar="P", help="state features (N, D)")
    p.add_argument("--topk", nargs="+", type=int, default=[10], metavar="K")
    p.add_argument("--also_mutual_knn", action="store_true")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    p.add_argument("--output", metavar="F.json", help="results JSON (written atomically)")
    p.add_argument("--pairwise", action="store_true", help="also model x model CKNNA(row, col)")
    p.add_argument("--permutations", type=int, default=0, metavar="N",
                   help="permutation null with N shuffles of B: p-value, null mean/std")
    p.add_argument("--subsample", type=int, default=0, metavar="DRAWS",
                   help="subsampling interval over DRAWS random subsets")
    p.add_argument("--subsample_fraction", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0, help="seed for permutations and subsets")
    p.add_argument("--zscore_B", action="store_true",
                   help="standardise each column of feats_B before L2 normalisation "
                        "(raw states mix metres and radians); recorded in the JSON")
    p.add_argument("--also_cka", action="store_true", help="also linear CKA (unbiased, biased)")
    p.add_argument("--knn_backend", choices=BACKENDS, default="torch")
    p.add_argument("--heatmap", metavar="F.png", help="model x model heatmap (implies --pairwise)")
    p.set_defaults(func=run)


def labels_for(paths: list[Path]) -> list[str]:
    """Parent folder names (the seed's labels); two files with one label is an error."""
    labels = [p.resolve().parent.name for p in paths]
    seen: dict[str, Path] = {}
    for label, path in zip(labels, paths):
        if label in seen:
            raise HarnessError(f"{path} and {seen[label]} would both be labelled {label!r} "
                               "(labels are parent folder names)")
        seen[label] = path
    return labels


def _check_args(args, n: int) -> list[int]:
    if n < 4:
        raise HarnessError(f"{args.feats_B}: N={n} samples; CKNNA needs at least 4")
    for k in args.topk:
        if not 1 <= k <= n - 1:
            raise HarnessError(f"--topk {k}: must be in [1, N-1] = [1, {n - 1}]")
    if args.permutations < 0 or args.subsample < 0:
        raise HarnessError("--permutations and --subsample must be >= 0")
    if args.subsample and not 0 < args.subsample_fraction < 1:
        raise HarnessError(f"--subsample_fraction {args.subsample_fraction}: must be in (0, 1)")
    m = int(round(args.subsample_fraction * n))
    if args.subsample and max(args.topk) > m - 1:
        raise HarnessError(f"--subsample_fraction {args.subsample_fraction}: subsets of "
                           f"{m} are too small for k={max(args.topk)}")
    return sorted(set(args.topk))


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    if args.output:
        check_output_file(args.output, "--output")
    if args.heatmap:
        check_output_file(args.heatmap, "--heatmap")
    # Read and validate every file before any metric is computed.
    b_path = Path(args.feats_B)
    feats_b = load_features(b_path)
    n = feats_b.shape[0]
    ks = _check_args(args, n)
    a_paths = [Path(p) for p in args.feats_A]
    models = {}
    for label, path in zip(labels_for(a_paths), a_paths):
        a = load_features(path)
        if a.shape[0] != n:
            raise HarnessError(f"{path}: {a.shape[0]} samples but {b_path} has {n}")
        models[label] = (str(path), normalised(path, a))
    record = None
    if args.zscore_B:
        feats_b, record = standardised(b_path, feats_b)
    settings = Settings(ks=ks, mutual=args.also_mutual_knn, permutations=args.permutations,
                        subsample_draws=args.subsample, subsample_fraction=args.subsample_fraction,
                        seed=args.seed, pairwise=args.pairwise or bool(args.heatmap),
                        cka=args.also_cka, backend=args.knn_backend, device=device)
    preprocessing = preprocessing_record(record)
    results = compute(models, normalised(b_path, feats_b), str(b_path), settings, preprocessing)
    table = markdown_table(results)
    if args.heatmap:
        k = heatmap_k(ks)
        heatmap(results["pairwise"][f"cknna_k{k}"], list(models), args.heatmap,
                f"CKNNA(row, column), k={k}")
    if args.output:
        write_json(args.output, results, nan_note=nan_note(results))
        print(f"[cknna] wrote {args.output}", file=sys.stderr)
    print(table, end="")
    return 0
