"""Ranks of a torchrun extraction that fail together, in seconds.

Without this, a rank that fails leaves the others waiting in the next collective for
its timeout (30 minutes by default). Here a failing rank leaves a one-line note in the
shared output folder (`shards/.failed-<run>-rank<r>`, the folder every rank writes its
shards to), and a watcher thread in every other rank reads the notes twice a second: on
one it prints the reason, naming the failed rank, and ends its process at once. Shards
are written atomically, so every finished shard stays for `--resume`. A rank that dies
without a note (killed) breaks the collectives; that error is reported the same way.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import uuid
from pathlib import Path
from typing import Callable, Iterator

from harness.errors import HarnessError

POLL_S = 0.5
EXIT_PEER_FAILED = 1
_active: list[str] = []  # run ids of the fail_together blocks this process is in


def _dist():
    import torch.distributed as dist
    return dist


_GROUP: list = []


def _cpu_group():
    """A gloo group for the small object collectives here: under NCCL they would need
    each rank's CUDA device set, which the run loop does not require. Made on first use,
    which every rank reaches in the same order (agree, then fail_together)."""
    if not _GROUP:
        dist = _dist()
        _GROUP.append(dist.group.WORLD if dist.get_backend() == "gloo"
                      else dist.new_group(backend="gloo"))
    return _GROUP[0]


def agree(step: Callable[[], object], rank: int, world: int) -> object:
    """Run `step` on this rank; if it raised a HarnessError on any rank, raise one naming
    that rank on every rank (so a refusal on rank 0, say a locked folder, stops all)."""
    if world == 1:
        return step()
    result, error = None, None
    try:
        result = step()
    except HarnessError as err:
        error = str(err)
    errors = [None] * world
    _dist().all_gather_object(errors, error, group=_cpu_group())
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        r, e = failed[0]
        raise HarnessError(e if r == rank else f"rank {r} failed: {e}")
    return result


def _note_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "shards"


def _notes(out_dir: Path, run: str, rank: int) -> list[tuple[int, str]]:
    """(rank, reason) of every other rank that left a note in this run."""
    found = []
    for path in sorted(_note_dir(out_dir).glob(f".failed-{run}-rank*")):
        r = int(path.name.rsplit("rank", 1)[1])
        if r != rank:
            with contextlib.suppress(OSError):
                found.append((r, path.read_text(errors="replace").strip()))
    return found


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "no message"
    return f"{type(err).__name__}: {text}" if not isinstance(err, HarnessError) else text


def _leave_note(out_dir: Path, run: str, rank: int, err: BaseException) -> None:
    from harness.io import write_text
    with contextlib.suppress(OSError):
        write_text(_note_dir(out_dir) / f".failed-{run}-rank{rank}", _reason(err) + "\n")


def stop_message(rank: int, failed: int, reason: str, out_dir: Path) -> str:
    return (f"rank {rank}: stopping because rank {failed} failed ({reason}); finished shards "
            f"are kept in {_note_dir(out_dir)}: rerun with --resume to finish")


class _Watcher(threading.Thread):
    """Reads the other ranks' notes; on one, prints why and ends this process at once."""

    def __init__(self, out_dir: Path, run: str, rank: int):
        super().__init__(daemon=True, name="harness-rank-watcher")
        self.out_dir, self.run_id, self.rank = out_dir, run, rank
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(POLL_S):
            notes = _notes(self.out_dir, self.run_id, self.rank)
            if notes and not self.stopped.is_set():
                print(stop_message(self.rank, *notes[0], self.out_dir), file=sys.stderr,
                      flush=True)
                os._exit(EXIT_PEER_FAILED)  # the main thread may sit in a C++ collective


@contextlib.contextmanager
def fail_together(out_dir, rank: int, world: int) -> Iterator[None]:
    """The block is one rank's share of a distributed run (model loading, its shards, the
    final barrier; all ranks enter it together). A failure in it is announced to the other
    ranks, which end within about a second; a collective broken by another rank's death
    names that rank when it can (two ranks)."""
    if world == 1 or _active:  # nested (the command covers model loading too): one watch
        yield
        return
    out_dir = Path(out_dir)
    if rank == 0:  # notes of earlier runs are never read (their run id differs); tidy up
        for old in _note_dir(out_dir).glob(".failed-*"):
            with contextlib.suppress(OSError):
                old.unlink()
    box = [uuid.uuid4().hex[:12] if rank == 0 else None]
    _dist().broadcast_object_list(box, src=0, group=_cpu_group())  # one run id for all ranks
    run = box[0]
    _note_dir(out_dir).mkdir(parents=True, exist_ok=True)
    watcher = _Watcher(out_dir, run, rank)
    watcher.start()
    _active.append(run)
    try:
        yield
    except BaseException as err:
        watcher.stopped.set()
        notes = _notes(out_dir, run, rank)
        if notes:  # our collective broke because another rank failed first
            raise HarnessError(stop_message(rank, *notes[0], out_dir)) from None
        _leave_note(out_dir, run, rank, err)
        if isinstance(err, RuntimeError) and world == 2 and "gloo" in str(err).lower():
            raise HarnessError(stop_message(rank, 1 - rank, "it stopped without a note; "
                                            f"{_reason(err)}", out_dir)) from None
        raise
    finally:
        _active.remove(run)
        watcher.stopped.set()
