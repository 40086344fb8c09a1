"""`python -m harness data {check,synth,build}`: inspect, generate or build a data directory.

Exit codes: 0 ok; 1 `check` found problems; 2 unusable input (printed as one line).
"""
from __future__ import annotations

import argparse
import contextlib
import sys

from harness.errors import HarnessError


@contextlib.contextmanager
def one_line_os_errors(out: str):
    """A write that the file system refuses (read-only, full) as one line naming it."""
    try:
        yield
    except OSError as err:
        raise HarnessError(f"{out}: cannot write {err.filename or ''} ({err.strerror})") from None


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="check, synthesise or build a data directory")
    sub = parser.add_subparsers(dest="data_command", required=True)

    check = sub.add_parser("check", help="validate a data directory and print a summary")
    check.add_argument("dir", help="data directory (metadata.json, images/, feats_B.pt)")
    check.add_argument("--no-decode", action="store_true",
                       help="only check that images exist (skip decoding every PNG)")
    check.set_defaults(func=_check)

    synth = sub.add_parser("synth", help="write a deterministic synthetic data directory")
    synth.add_argument("dir", help="output directory")
    synth.add_argument("--n", type=int, default=200, help="number of samples (default 200)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--force", action="store_true", help="replace an existing data directory")
    synth.add_argument("--horizon_max", type=int, default=10, metavar="H",
                       help="also write feats_B_seq.pt, states t..t+H of each sample's episode "
                            "(default 10; 0: none)")
    synth.set_defaults(func=_synth)

    build = sub.add_parser("build", help="sample a data directory from a local LeRobot dataset")
    build.add_argument("out", help="output directory")
    build.add_argument("--lerobot", required=True, metavar="SRC",
                       help="root of a LeRobot v2.x dataset (meta/, data/, videos/)")
    build.add_argument("--n", type=int, default=5000)
    build.add_argument("--seed", type=int, default=42)
    build.add_argument("--chunks", type=int, nargs="+", default=[0, 18, 36])
    build.add_argument("--per-episode", action="store_true",
                       help="one random frame per episode instead of frames drawn from the pool")
    build.add_argument("--dataset-repo", default=None,
                       help="name recorded as dataset_repo (default: the SRC path)")
    build.add_argument("--force", action="store_true", help="replace an existing data directory")
    build.add_argument("--horizon_max", type=int, default=10, metavar="H",
                       help="also write feats_B_seq.pt, states t..t+H of each sample's episode, "
                            "the last state repeated past its end (default 10; 0: none)")
    build.set_defaults(func=_build)


def _check(args: argparse.Namespace) -> int:
    from harness.data import validate

    report = validate(args.dir, images="exists" if args.no_decode else "decode",
                      progress=sys.stderr.isatty())
    print(report.summary())
    return 0 if report.ok else 1


def _synth(args: argparse.Namespace) -> int:
    from harness.io import check_output_dir
    from harness.data.synth import generate

    check_output_dir(args.dir, "DIR")
    with one_line_os_errors(args.dir):
        meta = generate(args.dir, n=args.n, seed=args.seed, force=args.force,
                        progress=sys.stderr.isatty(), horizon_max=args.horizon_max)
    print(f"wrote {meta['num_samples']} synthetic samples (seed {args.seed}) to {args.dir}")
    return 0


def _build(args: argparse.Namespace) -> int:
    from harness.io import check_output_dir
    from harness.data.lerobot_build import build_from_lerobot

    check_output_dir(args.out, "OUT")
    with one_line_os_errors(args.out):
        meta = build_from_lerobot(args.lerobot, args.out, n=args.n, seed=args.seed,
                                  chunks=args.chunks, per_episode=args.per_episode,
                                  force=args.force, dataset_repo=args.dataset_repo,
                                  progress=sys.stderr.isatty(), horizon_max=args.horizon_max)
    print(f"wrote {meta['num_samples']} samples from {meta['num_episodes_sampled']} episodes "
          f"of chunks {meta['chunk_indices']} to {args.out}")
    return 0
