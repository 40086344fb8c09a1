"""Data directory validation, options and loading (harness.data).

Fixtures are written by hand here (not by harness.data.synth) so a bug in the generator
cannot hide a bug in the validator."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from harness import data
from harness.cli import main
from harness.errors import HarnessError
from harness.data.states import zscore

N = 12
TASKS = ["pick up the cup", "", "put the spoon in the pot", "  ", "flip the pot", "",
         "move the corn", "open drawer", "", "close drawer", "wipe", "stack cups"]


def _write_dir(root, n=N, states=None, tasks=None, image_size=(256, 256)):
    """A small valid data directory: image i is a flat colour that encodes i."""
    (root / "images").mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", image_size, (i * 20 % 256, 100, 50)).save(root / "images" / f"{i:06d}.png")
    if states is None:
        states = torch.arange(n * 7, dtype=torch.float32).reshape(n, 7) / 10
    torch.save(states, root / "feats_B.pt")
    meta = {
        "num_samples": n, "state_dim_raw": 8, "state_dim_effective": 7, "pad_index_dropped": 6,
        "state_keys": ["x", "y", "z", "roll", "pitch", "yaw", "gripper"],
        "dataset_repo": "test", "num_chunks_used": 1, "chunk_indices": [0], "seed": 0,
        "task_descriptions": list(tasks if tasks is not None else TASKS[:n]),
        "episode_indices": [i // 4 for i in range(n)],
        "frame_indices": [i % 4 for i in range(n)],
    }
    (root / "metadata.json").write_text(json.dumps(meta))
    return meta


def _edit_meta(root, **changes):
    meta = json.loads((root / "metadata.json").read_text())
    meta.update(changes)
    (root / "metadata.json").write_text(json.dumps(meta))


@pytest.fixture
def good(tmp_path):
    root = tmp_path / "d"
    _write_dir(root)
    return root


def _problems(root):
    return data.validate(root).problems


def test_valid_directory_has_no_problems_and_a_true_summary(good):
    report = data.validate(good)
    assert report.ok, report.problems
    assert report.n == N
    assert report.empty_tasks == 4  # "", "  ", "", ""
    assert report.duplicate_frames == 0 and report.duplicate_states == 0
    assert report.image_sizes == {"256x256 RGB": N}
    assert report.state_min[0] == pytest.approx(0.0) and report.state_max[6] == pytest.approx(8.3)


def test_missing_image_is_named(good):
    (good / "images" / "000007.png").unlink()
    problems = _problems(good)
    assert len(problems) == 1 and "000007.png" in problems[0] and "missing" in problems[0]


def test_every_corrupt_png_is_reported(good):
    for i in (2, 5, 9):
        (good / "images" / f"{i:06d}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    truncated = good / "images" / "000011.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    problems = _problems(good)
    named = sorted(p.split("images/")[1][:6] for p in problems if "cannot decode" in p)
    assert named == ["000002", "000005", "000009", "000011"]


def test_exists_mode_does_not_decode(good):
    (good / "images" / "000003.png").write_bytes(b"garbage")
    assert data.validate(good, images="exists").ok
    assert not data.validate(good, images="decode").ok


def test_count_mismatch_between_lists_states_and_images(good):
    _edit_meta(good, frame_indices=list(range(N - 1)))
    problems = _problems(good)
    assert any("frame_indices=11" in p and "num_samples=12" in p for p in problems)


def test_fewer_state_rows_than_samples(good):
    torch.save(torch.zeros(N - 2, 7), good / "feats_B.pt")
    assert any("feats_B.pt rows=10" in p for p in _problems(good))


def test_extra_images_beyond_num_samples(good):
    Image.new("RGB", (256, 256)).save(good / "images" / f"{N:06d}.png")
    problems = _problems(good)
    assert len(problems) == 1 and "beyond" in problems[0] and f"[{N}]" in problems[0]


def test_nan_state_rows_are_named(good):
    states = torch.ones(N, 7)
    states[4, 2] = math.nan
    states[10, 0] = math.inf
    torch.save(states, good / "feats_B.pt")
    problems = _problems(good)
    assert len(problems) == 1 and "2 rows with NaN/Inf at indices [4, 10]" in problems[0]


@pytest.mark.parametrize("bad, expected", [
    (torch.zeros(N, 6), "has 6 columns but metadata.json names 7"),
    (torch.zeros(N), "expected shape (N, D)"),
    (torch.zeros(N, 7, dtype=torch.int64), "expected a float tensor"),
])
def test_wrong_state_shape_or_dtype(good, bad, expected):
    torch.save(bad, good / "feats_B.pt")
    problems = _problems(good)
    assert any("feats_B.pt" in p and expected in p for p in problems), problems


def test_feats_b_not_a_tensor_or_corrupt(good):
    torch.save({"feats": torch.zeros(N, 7)}, good / "feats_B.pt")
    assert any("expected a tensor" in p for p in _problems(good))
    (good / "feats_B.pt").write_bytes(b"nope")
    assert any("feats_B.pt: is a text file; expected" in p for p in _problems(good))


def test_metadata_problems_name_keys_and_indices(good):
    _edit_meta(good, episode_indices=[0, 1, -3] + [0] * (N - 3), task_descriptions=[None] + TASKS[1:])
    problems = _problems(good)
    assert any("episode_indices" in p and "[2]" in p for p in problems)
    assert any("task_descriptions" in p and "[0]" in p for p in problems)
    (good / "metadata.json").write_text("{broken")
    assert any("metadata.json: not readable JSON" in p for p in _problems(good))


def test_all_problems_collected_at_once(good):
    (good / "images" / "000001.png").unlink()
    (good / "images" / "000002.png").write_bytes(b"bad")
    states = torch.ones(N, 7)
    states[3] = math.nan
    torch.save(states, good / "feats_B.pt")
    _edit_meta(good, task_descriptions=TASKS[: N - 1])
    assert len(_problems(good)) == 4


def test_duplicates_are_counted_not_fatal(tmp_path):
    states = torch.arange(N * 7, dtype=torch.float32).reshape(N, 7)
    states[5] = states[1]
    states[6] = states[1]
    root = tmp_path / "d"
    _write_dir(root, states=states)
    _edit_meta(root, episode_indices=[0] * N, frame_indices=[0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8])
    report = data.validate(root)
    assert report.ok
    assert report.duplicate_states == 2
    assert report.duplicate_frames == 3


def test_not_a_directory_is_an_error(tmp_path):
    with pytest.raises(HarnessError, match="not a directory"):
        data.validate(tmp_path / "absent")


def test_load_raises_one_error_naming_problems(good):
    (good / "images" / "000004.png").unlink()
    with pytest.raises(HarnessError, match=r"1 problem\(s\): .*000004\.png: missing"):
        data.load(good)


def test_drop_empty_tasks_keeps_an_index_map(good):
    loaded = data.load(good)
    kept, record = data.drop_empty_tasks(loaded)
    expected = [i for i, t in enumerate(TASKS) if t.strip()]
    assert kept.indices == expected == record["kept_indices"]
    assert record["n_before"] == N and record["n_after"] == len(expected)
    assert kept.options == (record,)
    assert kept.tasks == [TASKS[i] for i in expected]
    # states and any full-directory features stay row-aligned
    assert torch.equal(kept.states, loaded.states[expected])
    feats = torch.arange(N, dtype=torch.float32)[:, None] * 3
    assert kept.take(feats).flatten().tolist() == [3.0 * i for i in expected]
    assert kept.image_path(1).name == f"{expected[1]:06d}.png"
    with pytest.raises(HarnessError, match="features have 5 rows"):
        kept.take(torch.zeros(5, 2))


def test_drop_empty_tasks_when_all_empty(tmp_path):
    root = tmp_path / "d"
    _write_dir(root, tasks=[""] * N)
    with pytest.raises(HarnessError, match="every task string is empty"):
        data.drop_empty_tasks(data.load(root))


def test_zscore_record_and_values(tmp_path):
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(N, 7)) * [1, 2, 3, 0.1, 0.2, 0.3, 5] + [0, 1, 2, 3, 4, 5, 6]
    raw[:, 6] = 0.5  # a constant column (gripper at rest)
    root = tmp_path / "d"
    _write_dir(root, states=torch.tensor(raw, dtype=torch.float32))
    loaded = data.load(root)
    with pytest.warns(RuntimeWarning, match="gripper"):
        z_states, record = zscore(loaded.states, loaded.metadata["state_keys"])
    assert record["constant_columns"] == ["gripper"]
    raw32 = raw.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(record["mean"], raw32.mean(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(record["std"], raw32.std(axis=0), rtol=1e-6, atol=1e-6)
    out = z_states.numpy()
    np.testing.assert_allclose(out[:, :6].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(out[:, :6].std(axis=0), 1, atol=1e-5)
    np.testing.assert_allclose(out[:, 6], 0, atol=1e-6)
    assert torch.equal(loaded.states, torch.tensor(raw, dtype=torch.float32))  # input untouched


def test_dataset_yields_index_rgb_image_task_in_order(tmp_path):
    root = tmp_path / "d"
    _write_dir(root)
    Image.new("L", (256, 256), 7).save(root / "images" / "000003.png")  # grayscale on disk
    ds = data.ImageTaskDataset(data.load(root))
    index, image, task = ds[3]
    assert (index, task, image.mode, image.size) == (3, TASKS[3], "RGB", (256, 256))
    assert ds[5][1].getpixel((0, 0)) == (100, 100, 50)


@pytest.mark.parametrize("drop", [False, True])
def test_loader_order_does_not_depend_on_workers(good, drop):
    loaded = data.load(good)
    if drop:
        loaded, _ = data.drop_empty_tasks(loaded)

    def run(workers):
        out = []
        for idx, images, tasks in data.make_loader(loaded, batch_size=3, num_workers=workers):
            assert len(idx) == len(images) == len(tasks)
            out += [(int(i), im.getpixel((0, 0)), t) for i, im, t in zip(idx, images, tasks)]
        return out

    serial = run(0)
    assert [i for i, _, _ in serial] == loaded.indices
    assert [px[0] for _, px, _ in serial] == [i * 20 % 256 for i in loaded.indices]
    assert run(2) == serial


def test_dataset_names_corrupt_image(good):
    (good / "images" / "000006.png").write_bytes(b"bad")
    ds = data.ImageTaskDataset(data.load(good))  # existence-only check passes
    with pytest.raises(HarnessError, match="000006.png: cannot decode"):
        ds[6]


def test_fingerprint_changes_with_content_not_with_location(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write_dir(a)
    _write_dir(b)
    assert data.fingerprint(a) == data.fingerprint(b)
    assert data.fingerprint(a).startswith("sha256:")
    _edit_meta(b, task_descriptions=["x"] + TASKS[1:])
    assert data.fingerprint(a) != data.fingerprint(b)
    c = tmp_path / "c"
    _write_dir(c)
    Image.new("RGB", (256, 256), (1, 2, 3)).save(c / "images" / "000000.png")  # other size
    assert data.fingerprint(a) != data.fingerprint(c)
    with pytest.raises(HarnessError, match="feats_B.pt: missing"):
        (a / "feats_B.pt").unlink()
        data.fingerprint(a)


def test_staged_dir_refuses_and_keeps_existing_data(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(HarnessError, match="not empty"):
        with data.staged_dir(out):
            pass
    with pytest.raises(HarnessError, match="not a data directory"):
        with data.staged_dir(out, force=True):
            pass
    assert (out / "keep.txt").read_text() == "mine"


def test_staged_dir_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with data.staged_dir(out) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_cli_check(good, tmp_path, capsys):
    assert main(["data", "check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "samples: 12" in out and "empty tasks: 4" in out and "problems: 0" in out
    (good / "images" / "000008.png").write_bytes(b"bad")
    assert main(["data", "check", str(good)]) == 1
    assert "000008.png: cannot decode" in capsys.readouterr().out
    assert main(["data", "check", "--no-decode", str(good)]) == 0
    assert main(["data", "check", str(tmp_path / "missing")]) == 2


def test_all_zero_state_rows_are_a_problem(good):
    """CKNNA L2-normalises state rows: a zero row must fail `data check`, not `run`."""
    states = torch.ones(N, 7)
    states[2] = 0
    states[7] = 0
    torch.save(states, good / "feats_B.pt")
    problems = _problems(good)
    assert len(problems) == 1 and "2 all-zero rows" in problems[0] and "[2, 7]" in problems[0]
