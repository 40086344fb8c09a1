"""The run loop: samples -> pooled features in shards -> `<out>/feats_A.pt` + metadata.

Why shards: a 5000-sample extraction on a big model takes long enough to be interrupted;
finished shards are kept and skipped on the next run. A shard carries the provenance it
was made under, and a run refuses to mix shards made differently (another model, layer,
pooling, dtype, dataset...), because a merged file would silently blend two feature spaces.

Shards are fixed ranges of positions in the sample sequence, so the plan does not depend
on how many processes run it: under torchrun each rank takes every W-th shard, and the
merge (rank 0, after a barrier) reads the same files whatever W was.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from harness import provenance as prov
from harness import ranks
from harness.extractors.engine import state_input
from harness.errors import HarnessError
from harness.extractors.engine.extra_outputs import Outputs, merge_extras
from harness.extractors.engine import observed as obs
from harness.extractors.engine.base import FINAL, Sample, check_extractor
from harness.io import save_tensor, write_json
from harness.extractors.engine.pooling import EmptyMaskError, pool
from harness.progress import ProgressLines

SHARD_DIR = "shards"
FEATS = "feats_A.pt"
METADATA = "extraction_metadata.json"
# Recorded but not part of a shard's identity: they change with no effect on the values
# (the git hash moves with every unrelated commit; ranks and batch size only schedule;
# state_in_input derives from the options already in the identity).
VOLATILE = ("git_hash", "created", "batch_size", "world_size", "command", "threads",
            "state_in_input")


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, end) position ranges covering 0..n; independent of the number of ranks."""
    if shard_size < 1:
        raise HarnessError(f"shard size must be >= 1, got {shard_size}")
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def shard_path(out_dir: Path, start: int, end: int) -> Path:
    return Path(out_dir) / SHARD_DIR / f"shard_{start:06d}_{end:06d}.pt"


def identity(record: dict) -> str:
    """Canonical JSON of the provenance fields that define the feature values."""
    core = {k: v for k, v in record.items() if k not in VOLATILE}
    return json.dumps(core, sort_keys=True, default=str)


def _diff(a: str, b: str) -> list[str]:
    a, b = json.loads(a), json.loads(b)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (no-op without it)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    dist = torch.distributed
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
    return rank_and_world()


def run_provenance(extractor, pooling: str, dataset_fingerprint, n: int, shard_size: int,
                   batch_size: int, outputs: Outputs | None = None) -> dict:
    """The extractor's own record plus what the run loop knows (the extra outputs only
    when asked for, so shards of a plain run keep their identity)."""
    record = dict(extractor.provenance())
    record.update(pooling=pooling, dataset_fingerprint=dataset_fingerprint, n_samples=n,
                  shard_size=shard_size, versions=prov.versions(), git_hash=prov.git_hash(),
                  batch_size=batch_size, threads=torch.get_num_threads())
    if outputs is not None:
        record.update(outputs.record(extractor))
    record["state_in_input"] = state_input.record(extractor, outputs.stems() if outputs else [])
    return record


def _load_shard(path: Path, expected_identity: str) -> dict:
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise HarnessError(f"{path}: unreadable shard ({type(err).__name__}: {err}); delete it "
                           "to recompute") from None
    if shard.get("identity") != expected_identity:
        keys = _diff(shard.get("identity", "{}"), expected_identity)
        raise HarnessError(f"{path}: made with a different provenance (differs in {keys}); "
                           f"refusing to mix. Use another output directory or delete {path.parent}")
    return shard


class _Silent:
    """Progress that shows nothing (progress=False)."""

    def update(self, n: int) -> None:
        pass


def _pool_batch(extractor, batch: Sequence[Sample], pooling: str,
                outputs: Outputs | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """({layer: pooled}, {extra file stem: pooled, "txt_fallback": [(index, reason)]})."""
    indices = [int(s[0]) for s in batch]
    inputs = extractor.build_inputs(batch)
    hidden = extractor.forward(inputs)
    try:
        feats = {name: pool(h, hidden.mask, pooling).cpu() for name, h in hidden.layers.items()}
    except EmptyMaskError as err:
        raise HarnessError(f"nothing to pool for sample(s) {[indices[r] for r in err.rows]} "
                           "(empty token mask)") from None
    for name, f in feats.items():
        bad = (~torch.isfinite(f).all(dim=1)).nonzero().flatten().tolist()
        if bad:
            raise HarnessError(f"NaN/Inf in layer {name!r} features of sample(s) "
                               f"{[indices[r] for r in bad]}; stopping")
    extra = outputs.pool(extractor, batch, inputs, hidden, pooling) if outputs else {}
    for name, f in extra.items():
        if isinstance(f, torch.Tensor) and not torch.isfinite(f).all():
            raise HarnessError(f"NaN/Inf in {name} of sample(s) {indices}; stopping")
    return feats, extra


def _run_shard(extractor, samples, start: int, end: int, batch_size: int, pooling: str,
               ident: str, path: Path, bar, outputs: Outputs | None = None) -> None:
    parts: dict[str, list[torch.Tensor]] = {}
    extras: dict[str, list[torch.Tensor]] = {}
    fallback: list[list] = []
    indices: list[int] = []
    seen = getattr(extractor, "observed", None)
    if seen is not None:
        seen.clear()
    for b in range(start, end, batch_size):
        batch = [samples[i] for i in range(b, min(b + batch_size, end))]
        feats, extra = _pool_batch(extractor, batch, pooling, outputs)
        for name, f in feats.items():
            parts.setdefault(name, []).append(f)
        fallback += extra.pop("txt_fallback", [])
        for name, f in extra.items():
            extras.setdefault(name, []).append(f)
        indices += [int(s[0]) for s in batch]
        bar.update(len(batch))
    shard = {"indices": torch.tensor(indices, dtype=torch.long), "identity": ident,
             "batch_size": batch_size,
             "layers": {name: torch.cat(fs).float().contiguous() for name, fs in parts.items()}}
    if outputs:  # only then: a plain run's shards stay exactly as before
        shard["extra"] = {name: torch.cat(fs).float().contiguous() for name, fs in extras.items()}
        shard["txt_fallback"] = fallback
    if seen is not None:  # what this shard's forwards were really fed (extractors/observed.py)
        shard["observed"] = seen.as_dict()
    save_tensor(path, shard)


def batch_size_record(shards: list[dict]) -> dict:
    """Batch size per shard: a resumed run may use another batch size (e.g. after running
    out of memory), and batching moves pooled values by up to ~5e-7 (padding), so the
    metadata says which shard was made how (None: a shard older than this record)."""
    sizes = [s.get("batch_size") for s in shards]
    distinct = sorted({b for b in sizes if b is not None})
    if len(distinct) > 1:
        print(f"note: shards were made with batch sizes {distinct} (resumed with another "
              "--batch_size); recorded per shard in shard_batch_sizes", file=sys.stderr)
    return {"batch_size": distinct[0] if len(set(sizes)) == 1 and distinct else distinct,
            "shard_batch_sizes": sizes}


def resume_note(out_dir: Path, ranges: list[tuple[int, int]]) -> None:
    """Say so when finished shards are reused (stderr: the console, and extract.log)."""
    done = [(s, e) for s, e in ranges if shard_path(out_dir, s, e).is_file()]
    if done:
        print(ProgressLines.resuming(sum(e - s for s, e in done), ranges[-1][1], len(done)),
              file=sys.stderr, flush=True)


def merge(out_dir: Path, ranges: list[tuple[int, int]], record: dict) -> dict[str, torch.Tensor]:
    """Concatenate every shard in order into feats_A.pt (+ per-layer files) and metadata."""
    ident = identity(record)
    shards = []
    for start, end in ranges:
        path = shard_path(out_dir, start, end)
        if not path.is_file():
            raise HarnessError(f"{path}: missing shard; run the extraction again to finish it")
        shards.append(_load_shard(path, ident))
    layers = {name: torch.cat([s["layers"][name] for s in shards]) for name in shards[0]["layers"]}
    indices = torch.cat([s["indices"] for s in shards]).tolist()
    for name, feats in layers.items():
        target = FEATS if name == FINAL else f"feats_A_layer{name}.pt"
        save_tensor(Path(out_dir) / target, feats.contiguous())
    extra_meta = merge_extras(out_dir, shards)
    final = layers[FINAL]
    record = dict(record, **batch_size_record(shards), **extra_meta)
    meta = dict(record, created=prov.now(), command=prov.command_line(),
                observed=obs.merge([s.get("observed") for s in shards]),
                feats_A_shape=list(final.shape), layer_files=sorted(
                    FEATS if n == FINAL else f"feats_A_layer{n}.pt" for n in layers),
                shards=[shard_path(out_dir, s, e).name for s, e in ranges], sample_indices=indices)
    write_json(Path(out_dir) / METADATA, json.loads(json.dumps(meta, default=str)))
    return layers


def extract(extractor, samples: Sequence[Sample], out_dir, *, batch_size: int = 8,
            shard_size: int = 256, pooling: str = "mean", dataset_fingerprint=None,
            progress: bool = True, progress_every_s: float = 2.0,
            split_modalities: bool = False, action_repr: bool = False
            ) -> dict[str, torch.Tensor] | None:
    """Pool features of every sample with a loaded `extractor` into `out_dir`.

    Resumes: shards already on disk with the same provenance are skipped. Under
    torch.distributed each rank computes its share of shards and rank 0 merges; it returns
    the merged {layer: (N, D) tensor} there, None on other ranks. Progress is a tqdm bar
    on a terminal, else `harness.progress` lines on stderr (every `progress_every_s`).
    `split_modalities` also writes feats_A_img.pt / feats_A_txt.pt from the same forward,
    `action_repr` feats_action.pt (`extra_outputs`); feats_A.pt is unchanged.
    """
    from tqdm import tqdm

    check_extractor(extractor)
    if batch_size < 1:
        raise HarnessError(f"batch size must be >= 1, got {batch_size}")
    if len(samples) == 0:
        raise HarnessError("no samples to extract")
    out_dir = Path(out_dir)
    rank, world = rank_and_world()
    outputs = Outputs(split_modalities, action_repr) if split_modalities or action_repr else None
    if outputs:
        outputs.check(extractor)
    record = run_provenance(extractor, pooling, dataset_fingerprint, len(samples), shard_size,
                            batch_size, outputs)
    ident = identity(record)
    ranges = shard_ranges(len(samples), shard_size)
    mine = ranges[rank::world]
    todo = []
    for start, end in mine:
        path = shard_path(out_dir, start, end)
        if path.is_file():
            _load_shard(path, ident)  # raises on a provenance mismatch
        else:
            todo.append((start, end))
    total = sum(e - s for s, e in mine)
    already = total - sum(e - s for s, e in todo)
    if rank == 0:
        resume_note(out_dir, ranges)
    if progress and sys.stderr.isatty():
        bar = tqdm(total=total, initial=already, unit="sample", position=rank,
                   desc=f"extract {record.get('model')} [rank {rank}/{world}]")
    else:  # a log or a parent process (`harness run`) reads plain lines
        bar = contextlib.nullcontext(ProgressLines(total, already, every_s=progress_every_s)
                                     if progress else _Silent())
    with ranks.fail_together(out_dir, rank, world), bar as bar:  # a failed rank stops all
        for start, end in todo:
            _run_shard(extractor, samples, start, end, batch_size, pooling, ident,
                       shard_path(out_dir, start, end), bar, outputs)
        if world > 1:
            torch.distributed.barrier()
    if rank != 0:
        return None
    record["world_size"] = world
    return merge(out_dir, ranges, record)
