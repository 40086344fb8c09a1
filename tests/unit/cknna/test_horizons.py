"""Future states (feats_B_seq.pt) and CKNNA against states t..t+a: hand-built examples
for the episode lookup and the slicing, the dense reference for the scores."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from harness.cknna import horizons
from harness.data import synth
from harness.cli import main
from harness.errors import HarnessError
from tests.dense_reference import dense_cknna

# A pool of two episodes, rows deliberately out of order: (episode key, frame, state).
POOL = [(7, 1, [1.0, 10.0]), (3, 0, [30.0, 0.0]), (7, 0, [0.0, 10.0]), (3, 1, [31.0, 0.0]),
        (7, 2, [2.0, 10.0]), (7, 3, [3.0, 10.0])]


def _pool():
    keys, frames, states = zip(*POOL)
    return np.array(keys), np.array(frames), np.array(states)


def test_future_states_follow_the_episode_and_repeat_its_last_state():
    keys, frames, states = _pool()
    # samples: episode 7 frame 1 (pool row 0), episode 3 frame 0 (row 1), episode 7 frame 3 (row 5)
    seq, valid = horizons.from_pool(keys, frames, states, [0, 1, 5], horizon_max=2)
    expected = np.array([
        [[1.0, 10.0], [2.0, 10.0], [3.0, 10.0]],      # frames 1, 2, 3 of episode 7
        [[30.0, 0.0], [31.0, 0.0], [31.0, 0.0]],      # frames 0, 1, then 1 repeated
        [[3.0, 10.0], [3.0, 10.0], [3.0, 10.0]],      # the last frame: all repeats
    ])
    np.testing.assert_array_equal(seq, expected)
    assert valid.tolist() == [3, 2, 1]
    record = horizons.record(valid, 2)
    assert record["padded_per_step"] == [0, 1, 2]  # step 1: sample 2; step 2: samples 1, 2
    assert record["samples_with_padding"] == 2 and record["valid_steps"] == [3, 2, 1]
    assert record["horizon_max"] == 2


def test_horizon_max_zero_is_the_current_state_only():
    keys, frames, states = _pool()
    seq, valid = horizons.from_pool(keys, frames, states, [3, 2], horizon_max=0)
    np.testing.assert_array_equal(seq, [[[31.0, 0.0]], [[0.0, 10.0]]])
    assert valid.tolist() == [1, 1]
    with pytest.raises(HarnessError, match="--horizon_max"):
        horizons.from_pool(keys, frames, states, [0], horizon_max=-1)


def test_horizon_slicing_flattens_states_t_to_t_plus_a_step_major():
    seq = torch.tensor([[[1., 2.], [3., 4.], [5., 6.]],
                        [[7., 8.], [9., 10.], [11., 12.]]])
    assert horizons.horizon_states(seq, 0).tolist() == [[1, 2], [7, 8]]
    assert horizons.horizon_states(seq, 1).tolist() == [[1, 2, 3, 4], [7, 8, 9, 10]]
    assert horizons.horizon_states(seq, 2).tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    with pytest.raises(HarnessError, match=r"--horizon 3: must be in \[0, 2\]"):
        horizons.horizon_states(seq, 3)


@pytest.fixture
def files(tmp_path):
    """A model, current states and (N, 5, 7) future states of smooth random walks."""
    g = torch.Generator().manual_seed(3)
    n = 50
    seq = torch.randn(n, 1, 7, generator=g) + (0.3 * torch.randn(n, 5, 7, generator=g)).cumsum(1)
    feats = torch.cat([seq[:, 2] * 2, torch.randn(n, 5, generator=g)], dim=1)
    (tmp_path / "model").mkdir()
    torch.save(feats, tmp_path / "model" / "feats_A.pt")
    torch.save(seq[:, 0].clone(), tmp_path / "feats_B.pt")
    torch.save(seq, tmp_path / "feats_B_seq.pt")
    return tmp_path, feats, seq


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


def _cli(root, *extra):
    return main(["cknna", "--feats_A", str(root / "model" / "feats_A.pt"), "--feats_B",
                 str(root / "feats_B.pt"), "--topk", "5", "10", "--output", str(root / "r.json"),
                 "--feats_B_seq", str(root / "feats_B_seq.pt"), *map(str, extra)])


def test_cli_horizons_match_the_dense_formula_on_hand_concatenated_states(files):
    root, feats, seq = files
    assert _cli(root, "--horizon", 0, 1, 3) == 0
    res = json.loads((root / "r.json").read_text())
    entry = res["models"]["model"]
    assert sorted(entry["horizons"]) == ["h0", "h1", "h3"]
    concatenated = {0: seq[:, 0], 1: torch.cat([seq[:, 0], seq[:, 1]], dim=1),
                    3: torch.cat([seq[:, 0], seq[:, 1], seq[:, 2], seq[:, 3]], dim=1)}
    for a, states in concatenated.items():
        for k in (5, 10):
            want = dense_cknna(_unit(feats), _unit(states), k)
            assert entry["horizons"][f"h{a}"][f"cknna_k{k}"] == pytest.approx(want, abs=1e-6)
    assert entry["horizons"]["h0"]["cknna_k10"] == pytest.approx(entry["cknna_k10"], abs=1e-12)
    meta = res["_meta"]["horizons"]
    assert meta["horizons"] == [0, 1, 3] and meta["feats_B_seq_shape"] == [50, 5, 7]
    assert meta["zscored_per_column"] is False


def test_cli_zscore_applies_per_column_of_the_flattened_states(files):
    root, feats, seq = files
    assert _cli(root, "--horizon", 2, "--zscore_B") == 0
    res = json.loads((root / "r.json").read_text())
    flat = torch.cat([seq[:, 0], seq[:, 1], seq[:, 2]], dim=1).double()
    z = ((flat - flat.mean(0)) / flat.std(0, unbiased=False)).float()
    want = dense_cknna(_unit(feats), _unit(z), 10)
    assert res["models"]["model"]["horizons"]["h2"]["cknna_k10"] == pytest.approx(want, abs=1e-6)
    assert res["_meta"]["horizons"]["zscored_per_column"] is True


def test_cli_default_horizons_stop_at_h(files):
    root, _, _ = files
    assert _cli(root) == 0  # H = 4: the defaults 0, 1, 2, 4 (8 is beyond H)
    res = json.loads((root / "r.json").read_text())
    assert res["_meta"]["horizons"]["horizons"] == [0, 1, 2, 4]


def test_cli_bad_horizon_input_is_one_line_exit_2(files, capsys, tmp_path):
    root, _, seq = files
    assert _cli(root, "--horizon", 5) == 2
    assert "--horizon 5: must be in [0, 4]" in capsys.readouterr().err
    torch.save(seq[:10], root / "short.pt")
    code = main(["cknna", "--feats_A", str(root / "model" / "feats_A.pt"), "--feats_B",
                 str(root / "feats_B.pt"), "--feats_B_seq", str(root / "short.pt")])
    assert code == 2 and "short.pt: 10 samples, but feats_B has 50" in capsys.readouterr().err
    torch.save(seq[:, 0], root / "flat.pt")
    code = main(["cknna", "--feats_A", str(root / "model" / "feats_A.pt"), "--feats_B",
                 str(root / "feats_B.pt"), "--feats_B_seq", str(root / "flat.pt")])
    assert code == 2 and "expected a float (N, H+1, D) tensor" in capsys.readouterr().err
    code = main(["cknna", "--feats_A", str(root / "model" / "feats_A.pt"), "--feats_B",
                 str(root / "feats_B.pt"), "--horizon", "1"])
    assert code == 2 and "--horizon needs --feats_B_seq" in capsys.readouterr().err
    assert not (root / "r.json").exists()


def test_synthetic_future_states_come_from_each_samples_episode(tmp_path):
    out = tmp_path / "d"
    synth.generate(out, n=60, seed=2, horizon_max=4)
    seq = torch.load(out / "feats_B_seq.pt", weights_only=True)
    states = torch.load(out / "feats_B.pt", weights_only=True)
    meta = json.loads((out / "metadata.json").read_text())
    side = json.loads((out / "feats_B_seq.json").read_text())
    assert seq.shape == (60, 5, 7) and torch.equal(seq[:, 0], states)
    sample = synth.sample_episodes(60, 2)
    lengths = np.bincount(sample["pool_episodes"])
    # where another sample sits h frames later in the same episode, seq holds its state
    where = {(e, f): i for i, (e, f) in enumerate(zip(meta["episode_indices"], meta["frame_indices"]))}
    checked = 0
    for i, (e, f) in enumerate(zip(meta["episode_indices"], meta["frame_indices"])):
        last = lengths[e] - 1
        assert side["valid_steps"][i] == min(4, last - f) + 1
        for h in range(5):
            j = where.get((e, min(f + h, last)))
            if j is not None:
                assert torch.equal(seq[i, h], states[j]), (i, h)
                checked += 1
    assert checked > 60  # more than the h = 0 matches alone


def test_synthetic_files_other_than_the_sequences_are_unchanged(tmp_path):
    """horizon_max only adds feats_B_seq.pt/.json: the other bytes are those of before."""
    synth.generate(tmp_path / "a", n=20, seed=4, horizon_max=0)
    synth.generate(tmp_path / "b", n=20, seed=4, horizon_max=3)
    a = {p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()}
    b = {p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert b - a == {horizons.Path("feats_B_seq.pt"), horizons.Path("feats_B_seq.json")}
    for rel in a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_data_check_validates_the_future_states(tmp_path):
    out = tmp_path / "d"
    synth.generate(out, n=20, seed=1, horizon_max=2)
    assert main(["data", "check", str(out)]) == 0
    seq = torch.load(out / "feats_B_seq.pt", weights_only=True)
    seq[3, 0] += 1
    torch.save(seq, out / "feats_B_seq.pt")
    from harness import data
    report = data.validate(out, images="skip")
    assert report.problems == [f"{out / 'feats_B_seq.pt'}: step 0 is not feats_B.pt (shape (20, 3, 7))"]
    torch.save(seq[:5], out / "feats_B_seq.pt")
    assert "5 samples, but feats_B has 20" in data.validate(out, images="skip").problems[0]
