"""Issue 21, point 2: when one rank of a distributed extraction fails, the others end in
seconds with one line naming it, and the finished shards stay for --resume.

Two gloo ranks on CPU, started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) but without torchrun's agent, which would kill the survivor itself: the
survivor must notice on its own (a rank on another machine has no agent beside it)."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.extractors.engine.features import extract, shard_path
from tests.fake_extractor import FakeExtractor, expected, samples

ROOT = Path(__file__).resolve().parents[2]
STOP_S = 10  # the watcher looks twice a second; the rest is slack for a loaded machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(out: Path, args: list[str]) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.fake_extractor", str(out),
                                       *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout: float) -> list[tuple[int, str]]:
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def test_a_failed_rank_stops_the_other_in_seconds_and_shards_stay_for_resume(tmp_path):
    out = tmp_path / "feats"
    # 24 samples in shards of 2: rank 0 holds shards 0, 2, 4, ... and needs 3 s a sample
    # (36 s in all); rank 1 fails at sample 6, its second shard.
    start = time.monotonic()
    procs = start_ranks(out, ["24", "2", "1", "--fail_at", "6", "--delay", "3.0"])
    try:
        _, err1 = procs[1].communicate(timeout=120)
        failed_at = time.monotonic()
        try:
            _, err0 = procs[0].communicate(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 was still running {STOP_S} s after rank 1 failed")
        seconds, total = time.monotonic() - failed_at, time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert procs[1].returncode != 0 and "simulated failure at sample 6" in err1
    assert procs[0].returncode != 0
    lines = [line for line in err0.splitlines() if "rank 1 failed" in line]
    assert len(lines) == 1, err0
    assert "rank 0: stopping because rank 1 failed" in lines[0] and "--resume" in lines[0]
    assert "simulated failure at sample 6" in lines[0]
    assert total < 36, f"rank 0 ran {total:.0f} s: as long as its own work, start-up aside"
    print(f"rank 0 stopped {seconds:.1f} s after rank 1 ended, {total:.1f} s after start")
    kept = sorted(p.name for p in (out / "shards").glob("shard_*.pt"))
    assert "shard_000002_000004.pt" in kept  # rank 1's finished first shard
    assert not (out / "feats_A.pt").exists()

    # --resume (here: one process) reuses the kept shards and finishes the file
    resumed = extract(FakeExtractor(), samples(24), out, shard_size=2, batch_size=1,
                      progress=False)["last"]
    assert torch.equal(resumed, expected(range(24)))


def test_without_failure_two_ranks_still_agree_with_one_process(tmp_path):
    procs = start_ranks(tmp_path / "two", ["10", "3", "2"])
    (rc0, err0), (rc1, err1) = finish(procs, timeout=120)
    assert rc0 == 0 and rc1 == 0, err0[-2000:] + err1[-2000:]
    feats = torch.load(tmp_path / "two" / "feats_A.pt", weights_only=True)
    assert torch.equal(feats, expected(range(10)))
    meta = json.loads((tmp_path / "two" / "extraction_metadata.json").read_text())
    assert meta["world_size"] == 2
    assert shard_path(tmp_path / "two", 0, 3).is_file()
