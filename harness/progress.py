"""Progress of long work as plain lines, for logs and for a parent process to relay.

tqdm draws a bar only on a terminal; an extraction run by `harness run` writes to a pipe
and its log, where a bar is one useless final line. These lines say samples done / total,
the rate and the time left, at most every `every_s` seconds and always at the end."""
from __future__ import annotations

import re
import sys
import time

PREFIX = "progress:"
RESUMING = "resuming:"
_LINE = re.compile(r"^progress: (?P<done>\d+)/(?P<total>\d+) samples")


class ProgressLines:
    """`update(n)` after each batch; prints `progress: 64/200 samples, 12.5/s, 11s left`."""

    def __init__(self, total: int, done: int = 0, stream=None, every_s: float = 2.0,
                 clock=time.monotonic):
        self.total, self.done, self.every_s, self.clock = total, done, every_s, clock
        self.stream = stream or sys.stderr
        self.start_done, self.start = done, clock()
        self.last = self.start

    def update(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if self.done >= self.total or now - self.last >= self.every_s:
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

    @staticmethod
    def resuming(done: int, total: int, shards: int) -> str:
        """`resuming: 768 of 1500 samples already extracted (3 shards)`."""
        return (f"{RESUMING} {done} of {total} samples already extracted "
                f"({shards} shard{'s' if shards != 1 else ''})")

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (f"{PREFIX} {self.done}/{self.total} samples, {rate:.1f}/s, "
                f"{format_seconds(left)} left")


def format_seconds(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def relayed(line: str) -> bool:
    """Whether a parent process shows this line of a child's output on its console."""
    return parse(line) is not None or line.startswith(RESUMING)


def parse(line: str) -> tuple[int, int] | None:
    """(done, total) of a progress line, None for any other line."""
    match = _LINE.match(line.strip())
    return (int(match["done"]), int(match["total"])) if match else None
