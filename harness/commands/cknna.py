"""`python -m harness cknna`: a drop-in for the seed's compute_cknna.py, plus extras.

Same flags and a superset of the same JSON; every input is checked before any work, and
nothing is written unless all of it succeeds."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from harness import cknna as metrics
from harness import provenance
from harness.errors import HarnessError
from harness.io import load_features, write_json
from harness.knn import BACKENDS, knn
from harness.report import heatmap, markdown_table

TIE_RULE = "neighbours ordered by similarity, equal similarities -> lower sample index first"


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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HarnessError(f"--device {name!r}: not a device name") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(f"--device {name}: CUDA is not available here (use --device cpu)")
    return device


def _normalised(path: Path, x: torch.Tensor) -> torch.Tensor:
    norms = x.norm(dim=1)
    zero = (norms == 0).nonzero().flatten()
    if len(zero):
        raise HarnessError(f"{path}: {len(zero)} rows have zero norm (first rows "
                           f"{zero[:5].tolist()}); cannot L2-normalise")
    return x / norms.unsqueeze(1)


def _zscore(path: Path, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    mean, std = x.mean(0), x.std(0)
    const = (std == 0).nonzero().flatten()
    if len(const):
        raise HarnessError(f"{path}: columns {const.tolist()} are constant; cannot z-score")
    return (x - mean) / std, {"mean": mean.tolist(), "std": std.tolist()}


def _labels(paths: list[Path]) -> list[str]:
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
    if args.subsample and max(args.topk) > int(round(args.subsample_fraction * n)) - 1:
        raise HarnessError(f"--subsample_fraction {args.subsample_fraction}: subsets of "
                           f"{int(round(args.subsample_fraction * n))} are too small for k={max(args.topk)}")
    return sorted(set(args.topk))


def _load_all(args):
    """Read and validate every file before any metric is computed."""
    b_path = Path(args.feats_B)
    feats_b = load_features(b_path)
    n = feats_b.shape[0]
    ks = _check_args(args, n)
    a_paths = [Path(p) for p in args.feats_A]
    labels = _labels(a_paths)
    feats_a = []
    for path in a_paths:
        a = load_features(path)
        if a.shape[0] != n:
            raise HarnessError(f"{path}: {a.shape[0]} samples but {b_path} has {n}")
        feats_a.append(_normalised(path, a))
    zscore = None
    if args.zscore_B:
        feats_b, zscore = _zscore(b_path, feats_b)
    return labels, a_paths, feats_a, b_path, _normalised(b_path, feats_b), ks, zscore


def run(args: argparse.Namespace) -> int:
    device = _device(args.device)
    if args.heatmap:
        args.pairwise = True
    if args.output and Path(args.output).is_dir():
        raise HarnessError(f"--output {args.output}: is a directory")
    labels, a_paths, feats_a, b_path, feats_b, ks, zscore = _load_all(args)
    n = feats_b.shape[0]
    feats_b = feats_b.to(device)
    options = {"backend": args.knn_backend}
    k_search = ks[-1]
    if args.subsample:
        k_search = max(k_search, metrics.long_list_length(ks[-1], args.subsample_fraction, n))
    nb = knn(feats_b, k_search, **options)

    models, neighbours = {}, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for label, path, a in zip(labels, a_paths, feats_a):
            print(f"[cknna] {label}: N={n}, D={a.shape[1]}, k={ks}", file=sys.stderr)
            a = a.to(device)
            na = knn(a, k_search, **options)
            neighbours.append(na)
            per_k = metrics.align(a, feats_b, ks, permutations=args.permutations,
                                  subsample_draws=args.subsample,
                                  subsample_fraction=args.subsample_fraction, seed=args.seed,
                                  neighbours_a=na, neighbours_b=nb, **options)
            entry = {"feats_A_path": str(path), "feats_A_dim": a.shape[1]}
            for k, r in per_k.items():
                entry[f"cknna_k{k}"] = r["cknna"]
                if args.also_mutual_knn:
                    entry[f"mutual_knn_k{k}"] = r["mutual_knn"]
                if "permutation" in r:
                    entry[f"p_value_k{k}"] = r["permutation"]["p_value"]
            if args.also_cka:
                entry["cka_unbiased"] = metrics.cka(a, feats_b, unbiased=True)
                entry["cka_biased"] = metrics.cka(a, feats_b, unbiased=False)
            entry["details"] = {f"k{k}": r for k, r in per_k.items()}
            models[label] = entry
        pairwise = _pairwise(labels, neighbours, ks) if args.pairwise else None
    notes = sorted({str(w.message) for w in caught})
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)

    results = {
        "_meta": {
            "timestamp": provenance.now(),
            "feats_B_path": str(b_path),
            "feats_B_shape": [n, int(feats_b.shape[1])],
            "N": n,
            "k_values": ks,
            "metric": "CKNNA (platonic-rep unbiased form, 1e-6 denominator term)",
            "preprocessing": {"row_l2_normalised": True,
                              "feats_B_zscored": zscore is not None,
                              "feats_B_zscore": zscore},
            "knn": {"backend": args.knn_backend, "tie_rule": TIE_RULE,
                    "self_excluded": True, "device": str(device)},
            "permutations": args.permutations,
            "subsample": {"draws": args.subsample, "fraction": args.subsample_fraction}
            if args.subsample else None,
            "seed": args.seed,
            "warnings": notes,
            "command": provenance.command_line(),
            "git": provenance.git_hash(),
            "versions": provenance.versions(),
        },
        "models": models,
    }
    if pairwise:
        results["pairwise"] = pairwise
    table = markdown_table(results)
    if args.heatmap:
        k = 10 if 10 in ks else ks[0]
        heatmap(pairwise[f"cknna_k{k}"], labels, args.heatmap, f"CKNNA(row, column), k={k}")
    if args.output:
        write_json(args.output, results)
        print(f"[cknna] wrote {args.output}", file=sys.stderr)
    print(table, end="")
    return 0


def _pairwise(labels: list[str], neighbours: list, ks: list[int]) -> dict:
    """CKNNA(model_i, model_j) for every ordered pair, from the lists already searched."""
    out = {"labels": labels, "order": "rows are A, columns are B: CKNNA(row, column)"}
    for k in ks:
        out[f"cknna_k{k}"] = [[metrics.scores_from_neighbours(a, b, k).cknna for b in neighbours]
                              for a in neighbours]
    return out
