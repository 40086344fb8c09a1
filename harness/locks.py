"""One writer per output folder: an exclusive lock held while `extract` or `run` writes.

Two processes writing one folder interleave shards and metadata. The lock is an
`fcntl.flock` on `<folder>/.harness.lock`: the kernel drops it when its holder dies, so
a lock left by a killed process is simply free again (its file, naming the dead holder,
is taken over and a note says so). The file names the holder (PID, host, command, start
time) so that a refused process can say who is in the way. The holder deletes the file
when done (and the folder, when it made it and nothing else was written there).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

from harness import provenance as prov
from harness.errors import HarnessError

LOCK_FILE = ".harness.lock"


def holder_text(info: dict) -> str:
    """'PID 123 on host h (harness run ..., since ...)' from a lock file's record."""
    if not info.get("pid"):
        return "another process (it has not yet written its PID)"
    extra = ", ".join(x for x in (info.get("command"), info.get("since") and
                                  f"since {info['since']}") if x)
    return f"PID {info['pid']} on host {info.get('host', '?')}" + (f" ({extra})" if extra else "")


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        info = json.loads(raw.decode("utf-8", "replace") or "{}")
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _open_locked(path: Path, what: str) -> int:
    """An fd of `path` holding an exclusive flock; HarnessError naming the holder if taken.
    Retries when the file was replaced or removed between open and flock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read(fd)
            os.close(fd)
            raise HarnessError(f"{what} {path.parent}: in use by {holder_text(info)}; wait for "
                               "it to finish or choose another output folder") from None
        except OSError:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed it as we opened it: take the new one


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, what: str = "output folder",
                note=None) -> Iterator[Path]:
    """Hold the folder's lock for the block (the folder is created if missing).

    A second process is refused at once with a HarnessError naming the holder; a lock
    file left by a process that is gone is taken over (`note` gets one line about it)."""
    folder = Path(folder)
    made = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HarnessError(f"{what} {folder}: cannot create ({err.strerror})") from None
    path = folder / LOCK_FILE
    note = note or (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        fd = _open_locked(path, what)
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            note(f"note: {folder} cannot be locked ({err.strerror}); not protected against "
                 "a second writer")
            yield folder
            return
        raise HarnessError(f"{what} {folder}: cannot lock {path} ({err.strerror})") from None
    try:
        old = _read(fd)
        if old.get("pid"):
            note(f"note: took over the lock of {folder} left by {holder_text(old)}, "
                 "which is gone")
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "command": prov.command_line(), "since": prov.now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        yield folder
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still held: a waiting opener retries on the new file
        os.close(fd)
        if made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when nothing else was written
