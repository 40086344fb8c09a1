"""The synthetic generator: determinism, schema, visible state dependence and real signal."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageChops

from harness import data
from harness.data import synth
from harness.cknna.significance import permutation_test
from harness.cli import main


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth200(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "d"
    synth.generate(root, n=200, seed=0)
    return root


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synth.generate(a, n=30, seed=7)
    synth.generate(b, n=30, seed=7)
    synth.generate(c, n=30, seed=8)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert len(fa) == 34 and fa == fb  # 30 images, metadata, states, future states + sidecar
    assert fa.keys() == fc.keys()
    for name in ("metadata.json", "feats_B.pt", "images/000000.png"):
        assert fa[name] != fc[name], name


def test_output_is_a_valid_directory_in_the_real_schema(synth200):
    report = data.validate(synth200)
    assert report.ok, report.problems
    assert report.image_sizes == {"256x256 RGB": 200}
    meta = json.loads((synth200 / "metadata.json").read_text())
    expected = {"num_samples": 200, "state_dim_raw": 8, "state_dim_effective": 7,
                "pad_index_dropped": 6, "dataset_repo": "synthetic", "seed": 0, "synthetic": True,
                "state_keys": ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]}
    assert {k: meta[k] for k in expected} == expected
    for key in ("num_chunks_used", "chunk_indices", "task_descriptions", "episode_indices",
                "frame_indices"):
        assert key in meta
    states = torch.load(synth200 / "feats_B.pt", weights_only=True)
    assert states.dtype == torch.float32 and states.shape == (200, 7)


def test_samples_look_like_the_real_draw(synth200):
    """Sorted by (episode, frame), several frames per episode, roughly a third empty tasks,
    states within the declared ranges."""
    loaded = data.load(synth200)
    pairs = list(zip(loaded.episodes, loaded.frames))
    assert pairs == sorted(set(pairs))
    assert len(set(loaded.episodes)) < 200 / 2
    empty = sum(1 for t in loaded.tasks if not t)
    assert 0.1 * 200 < empty < 0.6 * 200
    assert all(t == "" or t[0].isalpha() for t in loaded.tasks)
    for j, key in enumerate(data.STATE_KEYS):
        lo, hi = synth.RANGES[key]
        assert lo - 1e-6 <= loaded.states[:, j].min() and loaded.states[:, j].max() <= hi + 1e-6, key


@pytest.mark.parametrize("key", data.STATE_KEYS)
def test_each_state_key_visibly_changes_the_picture(key):
    middle = [sum(synth.RANGES[k]) / 2 for k in data.STATE_KEYS]
    j = data.STATE_KEYS.index(key)
    low, high = list(middle), list(middle)
    low[j], high[j] = synth.RANGES[key]
    diff = np.asarray(ImageChops.difference(synth.render(low), synth.render(high)).convert("L"))
    assert (diff > 30).sum() > 200, f"{key}: only {(diff > 30).sum()} pixels changed"


def _pixel_features(loaded: data.BridgeData) -> torch.Tensor:
    rows = []
    for i in range(loaded.n):
        with Image.open(loaded.image_path(i)) as im:
            small = im.convert("L").resize((16, 16), Image.BILINEAR)
        rows.append(np.asarray(small, dtype=np.float32).ravel())
    return torch.nn.functional.normalize(torch.tensor(np.stack(rows)), dim=1)


def test_pixels_align_with_states_above_the_null_and_not_when_shuffled(synth200):
    """The generator must carry real signal: 16x16 grey pixels vs raw states (both rows
    L2-normalised) beat the permutation null; shuffling the states removes it."""
    loaded = data.load(synth200)
    pixels = _pixel_features(loaded)
    states = torch.nn.functional.normalize(loaded.states, dim=1)
    real = permutation_test(pixels, states, topk=10, n_permutations=200, seed=0)
    assert real["p_value"] < 0.01
    assert real["observed"] > real["null_mean"] + 10 * real["null_std"]

    shuffled_states = states[torch.randperm(200, generator=torch.Generator().manual_seed(1))]
    shuffled = permutation_test(pixels, shuffled_states, topk=10, n_permutations=200, seed=0)
    assert shuffled["observed"] < shuffled["null_mean"] + 3 * shuffled["null_std"]
    assert shuffled["observed"] < real["observed"] / 3


def test_cli_synth_then_check_and_refusals(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["data", "synth", str(out), "--n", "20", "--seed", "3"]) == 0
    assert main(["data", "check", str(out)]) == 0
    before = _files(out)
    assert main(["data", "synth", str(out), "--n", "25", "--seed", "4"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert _files(out) == before
    assert main(["data", "synth", str(out), "--n", "25", "--seed", "4", "--force"]) == 0
    assert json.loads((out / "metadata.json").read_text())["num_samples"] == 25
    assert len(list((out / "images").iterdir())) == 25
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]  # no temp leftovers


def test_cli_synth_bad_input_writes_nothing(tmp_path):
    assert main(["data", "synth", str(tmp_path / "x"), "--n", "2"]) == 2
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    assert main(["data", "synth", str(other), "--n", "10", "--force"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
    assert [p.name for p in other.iterdir()] == ["todo.txt"]
