"""Run loop: merge values, resume, provenance refusal, NaN stop, atomic files, ranks."""
from __future__ import annotations

import json

import pytest
import torch

from harness.extractors.engine import features
from harness.errors import HarnessError
from harness.extractors.engine.features import extract, shard_ranges
from tests.fake_extractor import FakeExtractor, expected, samples


def load(path):
    return torch.load(path, weights_only=True)


def test_merged_features_match_closed_form(tmp_path):
    layers = extract(FakeExtractor(), samples(11), tmp_path, batch_size=3, shard_size=4,
                     progress=False)
    feats = load(tmp_path / "feats_A.pt")
    assert type(feats) is torch.Tensor and feats.dtype == torch.float32
    torch.testing.assert_close(feats, expected(range(11)), rtol=0, atol=1e-5)
    assert torch.equal(layers["last"], feats)
    meta = json.loads((tmp_path / "extraction_metadata.json").read_text())
    assert meta["sample_indices"] == list(range(11)) and meta["feats_A_shape"] == [11, 4]
    assert meta["model"] == "fake-model" and meta["pooling"] == "mean"
    assert {"versions", "git_hash", "dataset_fingerprint", "shard_size"} <= set(meta)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "shard_000000_000004.pt", "shard_000004_000008.pt", "shard_000008_000011.pt"]


def test_sample_indices_come_from_the_samples_not_positions(tmp_path):
    extract(FakeExtractor(), samples(5, offset=100), tmp_path, shard_size=2, progress=False)
    torch.testing.assert_close(load(tmp_path / "feats_A.pt"), expected(range(100, 105)))


def test_layer_sweep_writes_one_file_per_layer(tmp_path):
    extract(FakeExtractor(sweep=True), samples(6), tmp_path, shard_size=4, progress=False)
    torch.testing.assert_close(load(tmp_path / "feats_A_layer1.pt"), -expected(range(6)))
    torch.testing.assert_close(load(tmp_path / "feats_A.pt"), expected(range(6)))


def test_resume_skips_finished_shards(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        extract(FakeExtractor(fail_at=9), samples(12), tmp_path, batch_size=2, shard_size=4,
                progress=False)
    assert not (tmp_path / "feats_A.pt").exists()
    done = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert done == ["shard_000000_000004.pt", "shard_000004_000008.pt"]  # no partial shard
    again = FakeExtractor()
    extract(again, samples(12), tmp_path, batch_size=2, shard_size=4, progress=False)
    assert again.seen == [8, 9, 10, 11]
    torch.testing.assert_close(load(tmp_path / "feats_A.pt"), expected(range(12)))


def test_refuses_to_mix_shards_with_other_provenance(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        extract(FakeExtractor(fail_at=5), samples(8), tmp_path, shard_size=4, progress=False)
    with pytest.raises(HarnessError, match=r"shard_000000_000004\.pt.*differs in \['model'\]"):
        extract(FakeExtractor(name="other-model"), samples(8), tmp_path, shard_size=4,
                progress=False)
    with pytest.raises(HarnessError, match=r"differs in \['pooling'\]"):
        extract(FakeExtractor(), samples(8), tmp_path, shard_size=4, pooling="last",
                progress=False)
    with pytest.raises(HarnessError, match=r"dataset_fingerprint"):
        extract(FakeExtractor(), samples(8), tmp_path, shard_size=4, progress=False,
                dataset_fingerprint="abc")


def test_refused_resume_does_no_work_and_writes_nothing(tmp_path):
    """A foreign shard refuses the run before any forward: no new shard is computed and
    written beside it (the refusal would otherwise only come at merge)."""
    with pytest.raises(KeyboardInterrupt):  # shard 0-4 done by one model, then interrupted
        extract(FakeExtractor(fail_at=5), samples(12), tmp_path, shard_size=4, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()}
    assert list(before) == ["shard_000000_000004.pt"]
    other = FakeExtractor(name="other-model")
    with pytest.raises(HarnessError, match="differs in"):
        extract(other, samples(12), tmp_path, shard_size=4, progress=False)
    assert other.seen == []  # no forward ran
    after = {p.name: p.read_bytes() for p in (tmp_path / "shards").iterdir()}
    assert after == before  # nothing new, nothing changed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_batch_size_change_may_resume(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        extract(FakeExtractor(fail_at=5), samples(8), tmp_path, shard_size=4, batch_size=4,
                progress=False)
    extract(FakeExtractor(), samples(8), tmp_path, shard_size=4, batch_size=1, progress=False)
    torch.testing.assert_close(load(tmp_path / "feats_A.pt"), expected(range(8)))


def test_nan_stops_the_run_naming_samples(tmp_path):
    with pytest.raises(HarnessError, match=r"NaN/Inf.*sample\(s\) \[5, 7\]"):
        extract(FakeExtractor(nan_at={5, 7}), samples(8), tmp_path, batch_size=4,
                shard_size=4, progress=False)
    assert not (tmp_path / "feats_A.pt").exists()
    assert not (tmp_path / "shards" / "shard_000004_000008.pt").exists()


def test_merge_is_atomic(tmp_path, monkeypatch):
    extract(FakeExtractor(), samples(4), tmp_path, shard_size=2, progress=False)
    before = (tmp_path / "feats_A.pt").read_bytes()

    def broken_save(obj, f, *a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        features.merge(tmp_path, shard_ranges(4, 2),
                       features.run_provenance(FakeExtractor(), "mean", None, 4, 2, 8))
    assert (tmp_path / "feats_A.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(HarnessError, match="no samples"):
        extract(FakeExtractor(), [], tmp_path, progress=False)
    with pytest.raises(HarnessError, match="batch size"):
        extract(FakeExtractor(), samples(2), tmp_path, batch_size=0, progress=False)
    with pytest.raises(TypeError, match="missing"):
        extract(object(), samples(2), tmp_path, progress=False)


def test_two_gloo_ranks_equal_one_process(tmp_path):
    mp = pytest.importorskip("torch.multiprocessing")
    from tests.fake_extractor import distributed_worker
    single = extract(FakeExtractor(), samples(13), tmp_path / "one", batch_size=2,
                     shard_size=3, progress=False)["last"]
    mp.spawn(distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "two"), "fake",
                                       13, 3, 2), nprocs=2, join=True)
    assert torch.equal(load(tmp_path / "two" / "feats_A.pt"), single)
    meta = json.loads((tmp_path / "two" / "extraction_metadata.json").read_text())
    assert meta["world_size"] == 2 and meta["sample_indices"] == list(range(13))


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[3]
    single = extract(FakeExtractor(), samples(10), tmp_path / "one", batch_size=3, shard_size=3,
                     progress=False)["last"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.fake_extractor", str(tmp_path / "two"), "10", "3", "3"]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank 0/2 done" in done.stdout and "rank 1/2 done" in done.stdout
    assert torch.equal(load(tmp_path / "two" / "feats_A.pt"), single)


def test_without_torchrun_env_there_is_one_rank(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert features.init_from_env() == (0, 1)
