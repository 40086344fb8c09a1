"""`python -m harness extract <family>`: write `<out>/feats_A.pt`.

Mirrors the seed's per-model scripts (`--ckpt`, `--data_dir`, `--output_dir`) and adds
batching, dtype/device/layer choice, a sample limit and resume. Sub-commands, flags and
help come from the family registry (`harness.extractors.engine.registry`), the same declaration
the study config's `options` are checked against. `--ckpt tiny` (or a `tiny:` name) runs
the family's tiny random-weight stand-in: a CPU demo, and what CI runs.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterator

from harness.commands import resolve_device
from harness.errors import HarnessError
from harness.extractors.engine.registry import (LAYERS, Common, FamilySpec, Option,
                                         families, get, is_tiny, parse_layers)

__all__ = ["register", "build_extractor", "run", "parse_layers", "is_tiny", "resolve_dtype"]


def register(subparsers) -> None:
    parser = subparsers.add_parser("extract", help="extract pooled VLM features (feats_A.pt)")
    sub = parser.add_subparsers(dest="family", required=True)
    for spec in families().values():
        p = sub.add_parser(spec.name, help=spec.help, description=spec.help)
        add_family_arguments(p, spec)
        p.set_defaults(func=run)


def add_family_arguments(p: argparse.ArgumentParser, spec: FamilySpec) -> None:
    """--ckpt, --data_dir, --output_dir, then one flag per option of the registry."""
    default = spec.default_ckpt
    p.add_argument("--ckpt", "--ckpt_path", dest="ckpt", default=default, required=default is None,
                   help=f"hub id or local path, or {spec.stand_in_help} for the stand-in"
                        f"{f' (default {default})' if default else ''}")
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", required=True,
                   help="data directory (metadata.json, images/, feats_B.pt)")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", required=True,
                   help="where feats_A.pt and extraction_metadata.json go")
    for option in spec.option_fields():
        _add_option(p, option)
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads per process (default: chosen from the CPUs free to "
                        "this process and the ranks on this machine; see README, Threads)")
    add_seed_resume_flags(p)


SEED_RESUME_FLAGS = ("resume_from", "save_every")


def add_seed_resume_flags(p: argparse.ArgumentParser) -> None:
    """The seed scripts' `--resume_from N` / `--save_every N`: parsed only to be refused
    with a pointer (in the seed's newest scripts they do nothing; in older ones they
    resumed from an unchecked partial file). Hidden from --help and from the config."""
    for name in SEED_RESUME_FLAGS:
        p.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, type=int,
                       default=None, help=argparse.SUPPRESS)


def refuse_seed_resume_flags(args: argparse.Namespace) -> None:
    for name in SEED_RESUME_FLAGS:
        if getattr(args, name, None) is not None:
            raise HarnessError(f"--{name} is the seed scripts' flag and is not supported: work is "
                               "saved in shards of 256 samples; rerun the same command with "
                               "--resume to keep finished shards and do the rest")


def _add_option(p: argparse.ArgumentParser, o: Option) -> None:
    flags = [f"--{o.name}"] + ([f"--{o.name.replace('_', '-')}"] if "_" in o.name else [])
    kw: dict = dict(dest=o.name, help=o.help)
    if o.type is bool:
        kw.update(action="store_true")
    elif o.type is list:
        kw.update(nargs="+", default=list(o.default or []), metavar=o.metavar)
    else:
        kw.update(type=str if o.type is LAYERS else o.type, default=o.default,
                  choices=o.choices, metavar=o.metavar)
    p.add_argument(*flags, **kw)


def resolve_dtype(dtype: str, tiny: bool, family: str) -> str | None:
    """The dtype a family's build gets. 'checkpoint': the family's declared dtype policy,
    one dtype when it is uniform; a mixed policy stays 'checkpoint' for a stand-in (its
    build realises the mix as the real loader does) and None (the loader's own) for a
    real checkpoint."""
    spec = get(family)
    if dtype == "checkpoint":
        policy = spec.dtype_policy
        return policy.low if policy.uniform else ("checkpoint" if tiny else None)
    if dtype != "auto":
        return dtype
    return "float32" if tiny else spec.auto_dtype


@contextlib.contextmanager
def build_extractor(args: argparse.Namespace) -> Iterator[object]:
    """The family's extractor, loaded; temporary stand-in checkpoints live as long as it."""
    spec = get(args.family)
    tiny = is_tiny(args.ckpt)
    common = Common(ckpt=args.ckpt, device=str(resolve_device(args.device)),
                    dtype=resolve_dtype(args.dtype, tiny, spec.name),
                    layers=parse_layers(args.layers), revision=args.revision, tiny=tiny)
    opts = {o.name: getattr(args, o.name, o.default) for o in spec.options}
    with contextlib.ExitStack() as stack:
        yield spec.build(common, opts, stack).load()


def run(args: argparse.Namespace) -> int:
    from harness.extractors.engine import features
    from harness import locks, ranks, threads
    from harness.io import check_output_dir

    refuse_seed_resume_flags(args)
    if getattr(args, "action_repr", False) and not get(args.family).action_stream:
        from harness.extractors.engine.extra_outputs import refuse_action_repr
        refuse_action_repr(args.family)
    if args.batch_size < 1:
        raise HarnessError(f"--batch_size must be >= 1, got {args.batch_size}")
    out = check_output_dir(args.output_dir, "--output_dir")
    if args.limit is not None and args.limit < 1:
        raise HarnessError(f"--limit must be >= 1, got {args.limit}")
    apply_threads(threads.choose(args.threads))
    rank, world = features.init_from_env()  # torchrun: each rank takes its share of the shards
    with contextlib.ExitStack() as held:
        def lock() -> None:  # rank 0 holds the folder's lock for the whole job
            if rank == 0:
                held.enter_context(locks.output_lock(out, "--output_dir"))
        ranks.agree(lock, rank, world)  # a refusal on rank 0 stops every rank
        with ranks.fail_together(out, rank, world):  # e.g. one rank cannot load the model
            return _extract_locked(args, out)


def apply_threads(choice) -> None:
    from harness import threads

    threads.apply(choice)
    if choice.source == "auto":  # in a `run`, the parent's choice arrives as HARNESS_THREADS
        print(f"threads: {choice.describe()}", file=sys.stderr, flush=True)


def _extract_locked(args: argparse.Namespace, out) -> int:
    from torch.utils.data import Subset

    from harness import data as data_mod
    from harness.extractors.engine import features

    if not args.resume and any((out / features.SHARD_DIR).glob("shard_*.pt")):
        raise HarnessError(f"{out}: holds shards of an earlier run; pass --resume to finish "
                           "it, or choose an empty output directory")
    data = data_mod.load(args.data_dir)
    samples = data_mod.ImageTaskDataset(data)
    if args.limit is not None:
        samples = Subset(samples, range(min(args.limit, len(samples))))
    with build_extractor(args) as extractor:
        if hasattr(extractor, "set_states"):  # models that can be fed the state
            extractor.set_states(data_mod.policy_states(data), data.indices)
        layers = features.extract(extractor, samples, out, batch_size=args.batch_size,
                                  dataset_fingerprint=data_mod.fingerprint(args.data_dir),
                                  progress=True,  # a bar on a terminal, else lines
                                  split_modalities=args.split_modalities,
                                  action_repr=args.action_repr)
    if layers is not None:
        shape = tuple(layers["last"].shape)
        print(f"{args.family}: wrote {out / features.FEATS} {shape} and {features.METADATA}")
    return 0
