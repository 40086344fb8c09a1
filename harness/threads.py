"""How many threads torch may use: the CPUs this process may really use, shared out.

torch starts one thread per core it sees. On a shared lab machine that oversubscribes
the cores: in a cgroup with a CPU quota it sees the whole host, beside other jobs its
threads spin-wait on cores others hold (measured on a 2-core machine: the demo took
84-144 s with torch's default beside another job, 28.5 s with one thread, same bytes),
and under torchrun every rank starts a full set. So the count is

    CPUs allowed (affinity, cgroup cpu quota) minus CPUs busy with other work right now
    (per-CPU idle time over a short look), divided by the worker processes, at least 1.

An explicit choice wins: `--threads` / config `threads`, else HARNESS_THREADS, else
OMP_NUM_THREADS. Thread count does not change the stored features or metrics beyond
float rounding (recorded, never part of a shard's identity).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LOOK_S = 0.2  # how long idle time is sampled
CGROUP = Path("/sys/fs/cgroup")


@dataclass
class Choice:
    threads: int
    source: str  # "--threads", "config", "HARNESS_THREADS", "OMP_NUM_THREADS" or "auto"
    cpus_allowed: int | None = None
    cpus_busy_elsewhere: float | None = None
    workers: int = 1

    def describe(self) -> str:
        """'1 (auto: 2 CPUs allowed, 1.0 busy elsewhere, 1 worker here)' or '4 (--threads)'."""
        if self.source != "auto":
            return f"{self.threads} ({self.source})"
        return (f"{self.threads} (auto: {self.cpus_allowed} CPUs allowed, "
                f"{self.cpus_busy_elsewhere} busy elsewhere, {self.workers} worker(s) here)")

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def allowed_cpus(cgroup_root: Path = CGROUP) -> int:
    """CPUs this process may run on: its affinity set, capped by a cgroup cpu quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroup_quota(cgroup_root)
    return max(1, min(cpus, quota) if quota else cpus)


def cgroup_quota(root: Path = CGROUP) -> int | None:
    """ceil(quota / period) from cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`; None: none."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return math.ceil(int(text[0]) / int(text[1]))
        if text:
            return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return math.ceil(quota / period) if quota > 0 and period > 0 else None


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]]:
    """{cpu: (busy, total)} jiffies from /proc/stat for the given CPUs."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                values = [int(v) for v in fields[:8]]
                idle = values[3] + values[4]  # idle + iowait
                out[int(name[3:])] = (sum(values) - idle, sum(values))
    return out


def busy_elsewhere(look_s: float = LOOK_S) -> float:
    """CPUs (of those allowed) kept busy by other processes over a short look, e.g. 1.0
    beside one CPU-bound job; 0.0 when unknown. This process sleeps meanwhile."""
    try:
        cpus = os.sched_getaffinity(0)
        before = _cpu_times(cpus)
        time.sleep(look_s)
        after = _cpu_times(cpus)
    except (AttributeError, OSError, ValueError):
        return 0.0
    busy = 0.0
    for cpu, (b1, t1) in after.items():
        b0, t0 = before.get(cpu, (b1, t1))
        if t1 > t0:
            busy += (b1 - b0) / (t1 - t0)
    return busy


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) >= 1 else None


def workers_here() -> int:
    """Worker processes on this machine: torchrun's LOCAL_WORLD_SIZE, else 1."""
    return _env_int("LOCAL_WORLD_SIZE") or 1


def choose(requested: int | None = None, source: str = "--threads",
           workers: int | None = None) -> Choice:
    """The thread count for this process (see the module docstring)."""
    if requested is not None:
        if requested < 1:
            from harness.errors import HarnessError
            raise HarnessError(f"{source} must be >= 1, got {requested}")
        return Choice(requested, source)
    for name in ("HARNESS_THREADS", "OMP_NUM_THREADS"):
        if value := _env_int(name):
            return Choice(value, name)
    workers = workers or workers_here()
    cpus = allowed_cpus()
    busy = busy_elsewhere() if cpus > 1 else 0.0
    free = max(1, round(cpus - busy))
    return Choice(max(1, free // workers), "auto", cpus, round(busy, 2), workers)


def apply(choice: Choice) -> Choice:
    """Set torch's intra-op threads (and the variables a child process reads)."""
    import torch

    torch.set_num_threads(choice.threads)
    os.environ["HARNESS_THREADS"] = str(choice.threads)
    return choice
