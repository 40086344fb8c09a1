"""`python -m harness cknna`: a drop-in for the seed's compute_cknna.py, plus extras.

Same flags and a superset of the same JSON; every input is checked before any work, and
nothing is written unless all of it succeeds."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from harness.cknna import horizons as horizons_mod
from harness.extractors.engine import state_input
from harness.cknna import TIES, all_rows_equal
from harness.commands import resolve_device
from harness.errors import HarnessError
from harness.io import check_output_file, load_features, read_tensor, write_json
from harness.cknna.knn import BACKENDS
from harness.study.report.markdown import comparison_markdown, heatmap, heatmap_k, markdown_table, nan_note
from harness.study.report.horizons import horizon_markdown
from harness.study.results import INDEPENDENT, Settings, compute
from harness.data.states import normalised, standardised
from harness.data.states import record as preprocessing_record


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
    p.add_argument("--subsample_fraction", type=float, default=0.5,
                   help="subsets of this fraction of the samples and of half of it give the "
                        "interval of the full-sample CKNNA (see the README)")
    p.add_argument("--seed", type=int, default=0, help="seed for permutations and subsets")
    p.add_argument("--zscore_B", action="store_true",
                   help="standardise each column of feats_B before L2 normalisation "
                        "(raw states mix metres and radians); recorded in the JSON")
    p.add_argument("--also_cka", action="store_true", help="also linear CKA (unbiased, biased)")
    p.add_argument("--knn_backend", choices=BACKENDS, default="torch")
    p.add_argument("--heatmap", metavar="F.png", help="model x model heatmap (implies --pairwise)")
    p.add_argument("--ties", choices=TIES, default="shared",
                   help="shared (default): neighbours tied at the k-th place share the "
                        "remaining slots, order-invariant; index: lower sample index wins")
    p.add_argument("--groups", metavar="FILE|DIR",
                   help="per-sample group labels (e.g. episode indices): a data directory or "
                        "its metadata.json (its episode_indices), a 1-D integer "
                        ".pt/.npy/.safetensors tensor or a JSON list of length N; permutations "
                        "and subsets then move whole groups (without it, samples are treated "
                        "as independent)")
    p.add_argument("--exclude_same_group", action="store_true",
                   help="pairs in one group are never neighbours, in either space (needs --groups)")
    p.add_argument("--compare", action="store_true",
                   help="paired CKNNA differences between models with intervals from the same "
                        "subsets (implies --subsample 200 unless given)")
    p.add_argument("--feats_B_seq", metavar="F",
                   help="future states (N, H+1, D) from `data build`/`data synth`: also CKNNA "
                        "against states t..t+a for each --horizon a")
    p.add_argument("--horizon", nargs="+", type=int, metavar="A",
                   help="horizons a (states t..t+a, flattened); default 0 1 2 4 8 up to H "
                        "(needs --feats_B_seq)")
    p.set_defaults(func=run)


def distinct(path, x: torch.Tensor) -> torch.Tensor:
    """Normalised rows that are not all one row (then no neighbour graph exists)."""
    if all_rows_equal(x.float()):  # the search's precision (float32), as cknna.Space
        raise HarnessError(f"{path}: all {x.shape[0]} rows are identical after L2 "
                           "normalisation; the neighbour graph (and CKNNA) is undefined")
    return x


def _episodes(path: Path, raw) -> list | None:
    """The episode_indices of a data directory's metadata.json dict, else None."""
    if isinstance(raw, dict):
        if "episode_indices" not in raw:
            raise HarnessError(f"--groups {path}: a JSON object without episode_indices")
        return raw["episode_indices"]
    return None


def load_groups(path, n: int) -> torch.Tensor:
    """Per-sample integer labels: a data directory or its metadata.json (episode_indices),
    a JSON list, or a 1-D integer tensor file."""
    path = Path(path)
    if path.is_dir():
        path = path / "metadata.json"
        if not path.is_file():
            raise HarnessError(f"--groups {path.parent}: a directory without metadata.json "
                               "(give a data directory, its metadata.json or a labels file)")
    if not path.is_file():
        raise HarnessError(f"--groups {path}: file not found")
    if path.suffix == ".json":
        try:
            raw = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise HarnessError(f"--groups {path}: not valid JSON ({err})") from None
        episodes = _episodes(path, raw)
        raw = raw if episodes is None else episodes
        if not isinstance(raw, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                for v in raw):
            raise HarnessError(f"--groups {path}: must be a JSON list of integers "
                               "(or a metadata.json with episode_indices)")
        groups = torch.tensor(raw, dtype=torch.long)
    else:
        try:
            groups = read_tensor(path, expected="a 1-D integer tensor or array of length N")
        except HarnessError as err:
            raise HarnessError(f"--groups {err}") from None
        if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
            raise HarnessError(f"--groups {path}: must hold integers, not {groups.dtype}")
        groups = groups.long()
    if groups.ndim != 1 or len(groups) != n:
        raise HarnessError(f"--groups {path}: shape {tuple(groups.shape)}; need 1-D of length N={n}")
    return groups


def groups_hint(b_path: Path, n: int) -> str | None:
    """When feats_B sits in a data directory whose metadata has episodes: how to use them."""
    meta = b_path.parent / "metadata.json"
    try:
        episodes = json.loads(meta.read_text()).get("episode_indices")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(episodes, list) or len(episodes) != n:
        return None
    return (f"{meta} has episode indices ({len(set(episodes))} episodes for {n} samples): "
            f"pass --groups {b_path.parent} so that permutations and subsets move whole "
            "episodes (and --exclude_same_group to keep same-episode pairs from being neighbours)")


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
    m = int(round(args.subsample_fraction / 2 * n))  # the smaller of the two subset sizes
    if args.subsample and max(args.topk) > m - 1:
        raise HarnessError(f"--subsample_fraction {args.subsample_fraction}: subsets of "
                           f"{m} are too small for k={max(args.topk)}")
    if args.exclude_same_group and not args.groups:
        raise HarnessError("--exclude_same_group needs --groups FILE")
    if args.exclude_same_group and args.knn_backend not in ("torch", "tree"):
        raise HarnessError(f"--exclude_same_group needs --knn_backend torch or tree, not {args.knn_backend}")
    if args.compare and len(args.feats_A) < 2:
        raise HarnessError("--compare needs at least two --feats_A models")
    if args.horizon and not args.feats_B_seq:
        raise HarnessError("--horizon needs --feats_B_seq FILE")
    return sorted(set(args.topk))


def _check_groups(args, groups: torch.Tensor, ks: list[int]) -> None:
    n = len(groups)
    largest = int(torch.unique(groups, return_counts=True)[1].max())
    if args.exclude_same_group and max(ks) > n - largest:
        raise HarnessError(f"--groups {args.groups}: a group of {largest} samples leaves "
                           f"{n - largest} candidates, fewer than k={max(ks)}")
    if args.subsample:
        n_groups = len(groups.unique())
        if round(args.subsample_fraction / 2 * n_groups) < 1:
            raise HarnessError(f"--subsample_fraction {args.subsample_fraction}: draws no "
                               f"whole group of {n_groups}")


def _future_states(args, n: int):
    """(seq, horizons) checked before any metric, or (None, None) without --feats_B_seq."""
    if not args.feats_B_seq:
        return None, None
    seq = horizons_mod.load(args.feats_B_seq, n)
    given = args.horizon or [a for a in horizons_mod.DEFAULT_HORIZONS if a < seq.shape[1]]
    for a in given:
        horizons_mod.horizon_states(seq, a)  # a one-line error for a horizon beyond H
    return seq, sorted(set(given))


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
    groups = load_groups(args.groups, n) if args.groups else None
    if groups is not None:
        _check_groups(args, groups, ks)
    a_paths = [Path(p) for p in args.feats_A]
    models = {}
    for label, path in zip(labels_for(a_paths), a_paths):
        a = load_features(path)
        if a.shape[0] != n:
            raise HarnessError(f"{path}: {a.shape[0]} samples but {b_path} has {n}")
        models[label] = (str(path), distinct(path, normalised(path, a)))
    seq, horizons = _future_states(args, n)
    record = None
    if args.zscore_B:
        feats_b, record = standardised(b_path, feats_b)
    feats_b = distinct(b_path, normalised(b_path, feats_b))
    draws = args.subsample or (200 if args.compare else 0)
    settings = Settings(ks=ks, mutual=args.also_mutual_knn, permutations=args.permutations,
                        subsample_draws=draws, subsample_fraction=args.subsample_fraction,
                        seed=args.seed, pairwise=args.pairwise or bool(args.heatmap),
                        cka=args.also_cka, backend=args.knn_backend, device=device,
                        ties=args.ties, groups=groups, groups_source=args.groups,
                        exclude_same_group=args.exclude_same_group, compare=args.compare)
    preprocessing = preprocessing_record(record)
    hint = groups_hint(b_path, n) if groups is None else None
    if groups is None:
        print(f"[cknna] {INDEPENDENT}" + (f"; {hint}" if hint else ""), file=sys.stderr)
    results = state_input.annotate(compute(models, feats_b, str(b_path), settings, preprocessing,
                                           {"groups_available": hint} if hint else None))
    if seq is not None:
        horizons_mod.add_to_results(results, models, seq, horizons, settings, args.zscore_B,
                                    args.feats_B_seq)
    table = markdown_table(results) + comparison_markdown(results) + horizon_markdown(results)
    if args.heatmap:
        k = heatmap_k(ks)
        heatmap(results["pairwise"][f"cknna_k{k}"], list(models), args.heatmap,
                f"CKNNA(row, column), k={k}")
    if args.output:
        write_json(args.output, results, nan_note=nan_note(results))
        print(f"[cknna] wrote {args.output}", file=sys.stderr)
    print(table, end="")
    return 0
