"""Progress of extractions: plain lines (done/total, rate, time left) in logs, relayed by
`harness run` per model; resumed runs record the batch size of every shard."""
from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from harness import progress
from harness.extractors.engine.features import extract
from tests.fake_extractor import FakeExtractor, expected, samples

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_lines_give_done_total_rate_and_time_left():
    clock, out = Clock(), io.StringIO()
    bar = progress.ProgressLines(100, done=20, stream=out, every_s=2.0, clock=clock)
    clock.now = 1.0
    bar.update(10)          # 1 s since the start: too soon for a line
    clock.now = 4.0
    bar.update(20)          # 50 done in this run over 4 s: 12.5/s, 50 left -> 4 s
    clock.now = 5.0
    bar.update(50)          # the end is always reported
    assert out.getvalue().splitlines() == [
        "progress: 50/100 samples, 7.5/s, 7s left",
        "progress: 100/100 samples, 16.0/s, 0s left"]
    assert progress.parse("progress: 50/100 samples, 7.5/s, 7s left") == (50, 100)
    assert progress.parse("loading weights") is None


def test_format_seconds():
    assert [progress.format_seconds(s) for s in (0, 59.4, 61, 3 * 3600 + 120, float("inf"))] == [
        "0s", "59s", "1m01s", "3h02m", "?"]


def test_extract_writes_progress_lines_when_not_on_a_terminal(tmp_path, capsys):
    extract(FakeExtractor(), samples(10), tmp_path, batch_size=3, shard_size=4,
            progress_every_s=0)
    lines = [progress.parse(x) for x in capsys.readouterr().err.splitlines()]
    assert lines == [(3, 10), (4, 10), (7, 10), (8, 10), (10, 10)]


def test_resumed_progress_counts_finished_shards(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        extract(FakeExtractor(fail_at=9), samples(12), tmp_path, batch_size=2, shard_size=4,
                progress=False)
    extract(FakeExtractor(), samples(12), tmp_path, batch_size=2, shard_size=4,
            progress_every_s=0)
    lines = [progress.parse(x) for x in capsys.readouterr().err.splitlines()]
    assert [x for x in lines if x] == [(10, 12), (12, 12)]


def test_resume_with_another_batch_size_is_recorded_per_shard(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        extract(FakeExtractor(fail_at=9), samples(12), tmp_path, batch_size=2, shard_size=4,
                progress=False)
    extract(FakeExtractor(), samples(12), tmp_path, batch_size=3, shard_size=4, progress=False)
    meta = json.loads((tmp_path / "extraction_metadata.json").read_text())
    assert meta["shard_batch_sizes"] == [2, 2, 3]
    assert meta["batch_size"] == [2, 3]
    assert "batch sizes [2, 3]" in capsys.readouterr().err
    torch.testing.assert_close(torch.load(tmp_path / "feats_A.pt", weights_only=True),
                               expected(range(12)))


def test_one_batch_size_is_recorded_as_a_number(tmp_path):
    extract(FakeExtractor(), samples(6), tmp_path, batch_size=4, shard_size=4, progress=False)
    meta = json.loads((tmp_path / "extraction_metadata.json").read_text())
    assert meta["batch_size"] == 4 and meta["shard_batch_sizes"] == [4, 4]


def test_run_logged_relays_progress_and_keeps_every_line(tmp_path):
    from harness.study.pipeline import run_logged
    script = ("import sys\n"
              "print('loading model', flush=True)\n"
              "for i in (2, 4):\n"
              "    print(f'progress: {i}/4 samples, 1.0/s, 0s left', file=sys.stderr, flush=True)\n"
              "print('done')\n")
    relayed = []
    code = run_logged([sys.executable, "-c", script], {}, tmp_path / "x.log", relayed.append)
    assert code == 0
    assert relayed == ["progress: 2/4 samples, 1.0/s, 0s left",
                       "progress: 4/4 samples, 1.0/s, 0s left"]
    lines = (tmp_path / "x.log").read_text().splitlines()
    assert lines[0].startswith("===== attempt started ")  # issue 21: one header per attempt
    assert lines[1:] == ["loading model", *relayed, "done"]
