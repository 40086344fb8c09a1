"""Issue 21, point 6: torch's thread count follows the CPUs this process may use (affinity,
cgroup quota), those busy with other work, and the worker processes; explicit choices win;
the count is recorded and never part of a shard's identity."""
import pytest
import torch

from harness import threads
from harness.cli import main
from harness.errors import HarnessError
from harness.extractors.engine.features import identity, run_provenance
from tests.fake_extractor import FakeExtractor


@pytest.fixture
def no_env(monkeypatch):
    for name in ("HARNESS_THREADS", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("files,quota", [
    ({"cpu.max": "150000 100000\n"}, 2),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_quota(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert threads.cgroup_quota(tmp_path) == quota


def test_allowed_cpus_is_the_affinity_set_capped_by_the_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    assert threads.allowed_cpus(tmp_path) == 8
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert threads.allowed_cpus(tmp_path) == 3


def test_busy_elsewhere_sums_each_allowed_cpus_busy_share(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})
    readings = iter([{0: (100, 1000), 1: (50, 1000)}, {0: (200, 1100), 1: (60, 1100)}])
    monkeypatch.setattr(threads, "_cpu_times", lambda cpus: next(readings))
    assert threads.busy_elsewhere(look_s=0) == pytest.approx(1.0 + 0.1)


@pytest.mark.parametrize("cpus,busy,workers,expected", [
    (2, 0.0, 1, 2), (2, 1.0, 1, 1), (2, 1.7, 1, 1), (8, 2.2, 2, 3), (16, 0.0, 4, 4), (2, 0.0, 4, 1),
])
def test_auto_shares_the_free_cpus_among_workers(monkeypatch, no_env, cpus, busy, workers, expected):
    monkeypatch.setattr(threads, "allowed_cpus", lambda: cpus)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: busy)
    choice = threads.choose(workers=workers)
    assert (choice.threads, choice.source) == (expected, "auto")
    assert choice.record() == {"threads": expected, "source": "auto", "cpus_allowed": cpus,
                               "cpus_busy_elsewhere": busy, "workers": workers}


def test_torchrun_ranks_on_this_machine_are_the_workers(monkeypatch, no_env):
    monkeypatch.setattr(threads, "allowed_cpus", lambda: 8)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 0.0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.choose().threads == 2


def test_explicit_choices_win_in_order(monkeypatch, no_env):
    monkeypatch.setattr(threads, "allowed_cpus", lambda: pytest.fail("auto path taken"))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose().record() == {"threads": 3, "source": "OMP_NUM_THREADS", "workers": 1}
    monkeypatch.setenv("HARNESS_THREADS", "5")
    assert threads.choose().threads == 5
    assert threads.choose(7, "threads").record()["source"] == "threads"
    with pytest.raises(HarnessError, match="--threads must be >= 1, got 0"):
        threads.choose(0)


def test_apply_sets_torch_and_what_child_processes_read(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("HARNESS_THREADS", str(before))  # restored by monkeypatch
    try:
        threads.apply(threads.Choice(1, "--threads"))
        assert torch.get_num_threads() == 1
        assert threads.os.environ["HARNESS_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


def test_threads_are_recorded_but_not_part_of_a_shards_identity():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_provenance(FakeExtractor(), "mean", None, 4, 2, 8)
        torch.set_num_threads(2)
        two = run_provenance(FakeExtractor(), "mean", None, 4, 2, 8)
    finally:
        torch.set_num_threads(before)
    assert (one["threads"], two["threads"]) == (1, 2)
    assert identity(one) == identity(two)


@pytest.mark.parametrize("argv", [
    ["extract", "hf", "--data_dir", "d", "--output_dir", "o", "--threads", "0", "--ckpt", "tiny"],
    ["run", "--threads", "0"],
])
def test_threads_flag_is_checked(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert "threads must be >= 1, got 0" in capsys.readouterr().err
