"""Issue 21, point 3: a resumed extraction says so (console and log), and `run` appends
each attempt to extract.log under its own header instead of overwriting the first."""
import sys

import pytest
import torch

from harness.extractors.engine.features import extract
from harness.study.pipeline import run_logged
from tests.fake_extractor import FakeExtractor, expected, samples


def test_a_resumed_extraction_says_how_much_was_already_done(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        extract(FakeExtractor(fail_at=7), samples(15), tmp_path, shard_size=3, batch_size=1,
                progress=False)
    assert "resuming" not in capsys.readouterr().err  # the first attempt has nothing to reuse
    feats = extract(FakeExtractor(), samples(15), tmp_path, shard_size=3, batch_size=1,
                    progress=False)["last"]
    err = capsys.readouterr().err.splitlines()
    assert "resuming: 6 of 15 samples already extracted (2 shards)" in err
    assert torch.equal(feats, expected(range(15)))


def test_each_attempt_is_appended_to_the_log_under_its_own_header(tmp_path):
    log = tmp_path / "extract.log"
    relayed = []
    script = ("import sys; print('first attempt output'); "
              "print('resuming: 768 of 1500 samples already extracted (3 shards)', file=sys.stderr); "
              "print('progress: 800/1500 samples, 1.0/s, 5s left'); sys.exit(3)")
    assert run_logged([sys.executable, "-c", script], {}, log, relayed.append) == 3
    assert run_logged([sys.executable, "-c", "print('second attempt output')"], {}, log,
                      relayed.append) == 0
    text = log.read_text().splitlines()
    headers = [i for i, line in enumerate(text) if line.startswith("===== attempt started ")]
    assert len(headers) == 2 and headers[0] == 0
    assert text.index("first attempt output") < headers[1] < text.index("second attempt output")
    assert relayed == ["resuming: 768 of 1500 samples already extracted (3 shards)",
                       "progress: 800/1500 samples, 1.0/s, 5s left"]
