"""The LeRobot builder on a tiny LeRobot v2.1 dataset that the test writes itself.

3 episodes x 10 frames in 2 chunks (chunks_size 2: episodes 0, 1 in chunk 0, episode 2
in chunk 1). Frame f of episode e is a flat colour and its state encodes (e, f), so the
test can tell that each sample got the right picture, state and task."""
from __future__ import annotations

import json
import random
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from harness import data
from harness.cli import main
from harness.errors import HarnessError
from harness.data.lerobot_build import build_from_lerobot

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
av = pytest.importorskip("av")

EPISODES, FRAMES, CHUNK_SIZE = 3, 10, 2
TASKS = {0: "put the cup in the sink", 1: ""}


def colour(e: int, f: int) -> tuple[int, int, int]:
    return 20 + 22 * f, 60 + 70 * e, 128


def state(e: int, f: int, pad: float = 0.0) -> list[float]:
    return [float(e), float(f), 0.01 * f, 0.1, 0.2, 0.3, pad, f / 10]


def _write_video(path, frames):
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for rgb in frames:
            image = np.zeros((48, 64, 3), dtype=np.uint8)
            image[:] = rgb
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def write_lerobot(root, pad_episode=None, short_video=None, version="v2.1"):
    """pad_episode: that episode's pad value is 0.5; short_video: (episode, frames in mp4)."""
    info = {
        "codebase_version": version, "fps": 5, "chunks_size": CHUNK_SIZE,
        "total_episodes": EPISODES, "total_chunks": 2,
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "features": {
            "observation.state": {"dtype": "float32", "shape": [8]},
            "observation.images.image_0": {"dtype": "video", "shape": [48, 64, 3]},
            "episode_index": {"dtype": "int64", "shape": [1]},
        },
    }
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    (root / "meta" / "tasks.jsonl").write_text(
        "".join(json.dumps({"task_index": i, "task": t}) + "\n" for i, t in TASKS.items()))
    for e in range(EPISODES):
        chunk = e // CHUNK_SIZE
        pad = 0.5 if e == pad_episode else 0.0
        table = pa.table({
            "observation.state": pa.array([state(e, f, pad) for f in range(FRAMES)],
                                          type=pa.list_(pa.float32())),
            "timestamp": pa.array([f / 5 for f in range(FRAMES)], type=pa.float32()),
            "frame_index": pa.array(range(FRAMES), type=pa.int64()),
            "episode_index": pa.array([e] * FRAMES, type=pa.int64()),
            "index": pa.array(range(e * FRAMES, (e + 1) * FRAMES), type=pa.int64()),
            "task_index": pa.array([e % 2] * FRAMES, type=pa.int64()),
        })
        path = root / f"data/chunk-{chunk:03d}/episode_{e:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        n_video = short_video[1] if short_video and short_video[0] == e else FRAMES
        _write_video(root / f"videos/chunk-{chunk:03d}/observation.images.image_0/episode_{e:06d}.mp4",
                     [colour(e, f) for f in range(n_video)])
    return root


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_lerobot(tmp_path_factory.mktemp("lerobot") / "bridge")


def _check_samples(out, pairs):
    """Every sample's image, state and task match the (episode, frame) it claims."""
    loaded = data.load(out, images="decode")
    assert list(zip(loaded.episodes, loaded.frames)) == pairs
    expected_states = [state(e, f)[:6] + state(e, f)[7:] for e, f in pairs]
    assert torch.equal(loaded.states, torch.tensor(expected_states, dtype=torch.float32))
    assert loaded.tasks == [TASKS[e % 2] for e, _ in pairs]
    for row, (e, f) in enumerate(pairs):
        with Image.open(loaded.image_path(row)) as im:
            assert im.size == (256, 256) and im.mode == "RGB"
            mean = np.asarray(im, dtype=np.float64).reshape(-1, 3).mean(axis=0)
        assert np.abs(mean - colour(e, f)).max() < 8, (row, e, f, mean)
    return loaded


def test_frame_sampling_follows_the_seed_rule(src, tmp_path):
    out = tmp_path / "out"
    meta = build_from_lerobot(src, out, n=12, seed=5, chunks=[0, 1])
    # pool: episode 0, episode 1 (chunk 0), episode 2 (chunk 1), frames in order
    rows = sorted(random.Random(5).sample(range(EPISODES * FRAMES), 12))
    pairs = [(r // FRAMES, r % FRAMES) for r in rows]
    _check_samples(out, pairs)
    assert meta["chunk_indices"] == [0, 1] and meta["num_chunks_used"] == 2
    assert meta["seed"] == 5 and meta["pad_index_dropped"] == 6 and meta["state_dim_raw"] == 8
    assert meta["sampling"]["pool_size"] == 30 and meta["frame_fallbacks"] == []
    assert meta["source"]["image_sizes"] == {"64x48": 12}
    assert json.loads((out / "metadata.json").read_text()) == meta
    assert main(["data", "check", str(out)]) == 0


def test_another_seed_draws_other_frames(src, tmp_path):
    a = build_from_lerobot(src, tmp_path / "a", n=12, seed=5, chunks=[0, 1])
    b = build_from_lerobot(src, tmp_path / "b", n=12, seed=6, chunks=[0, 1])
    assert (a["episode_indices"], a["frame_indices"]) != (b["episode_indices"], b["frame_indices"])


def test_only_the_chosen_chunks_are_used(src, tmp_path):
    meta = build_from_lerobot(src, tmp_path / "out", n=4, seed=0, chunks=[1])
    assert set(meta["episode_indices"]) == {2}
    rows = sorted(random.Random(0).sample(range(FRAMES), 4))
    _check_samples(tmp_path / "out", [(2, r) for r in rows])


def test_chunk_order_sets_the_pool_order(src, tmp_path):
    """As in the seed, the pool is concatenated in the order chunks are given."""
    meta = build_from_lerobot(src, tmp_path / "out", n=30, seed=0, chunks=[1, 0])
    assert meta["episode_indices"] == [2] * 10 + [0] * 10 + [1] * 10


def test_per_episode_takes_one_frame_of_each_episode(src, tmp_path):
    meta = build_from_lerobot(src, tmp_path / "out", n=2, seed=9, chunks=[0, 1], per_episode=True)
    rng = random.Random(9)
    episodes = sorted(rng.sample(range(EPISODES), 2))
    pairs = [(e, rng.randrange(FRAMES)) for e in episodes]
    _check_samples(tmp_path / "out", pairs)
    assert meta["sampling"]["per_episode"] is True
    with pytest.raises(HarnessError, match="exceeds the 3 episodes"):
        build_from_lerobot(src, tmp_path / "more", n=4, seed=9, chunks=[0, 1], per_episode=True)
    assert not (tmp_path / "more").exists()


def test_nonzero_pad_is_warned_and_counted(tmp_path):
    src = write_lerobot(tmp_path / "src", pad_episode=2)
    with pytest.warns(RuntimeWarning, match="pad"):
        meta = build_from_lerobot(src, tmp_path / "out", n=30, seed=0, chunks=[0, 1])
    assert meta["pad_nonzero_samples"] == 10
    assert torch.load(tmp_path / "out" / "feats_B.pt", weights_only=True).shape == (30, 7)


def test_frame_past_the_video_end_falls_back_loudly(tmp_path):
    src = write_lerobot(tmp_path / "src", short_video=(1, 7))
    with pytest.warns(RuntimeWarning, match="past the end"):
        meta = build_from_lerobot(src, tmp_path / "out", n=30, seed=0, chunks=[0, 1])
    assert meta["frame_fallbacks"] == [{"episode_index": 1, "frame_indices": [7, 8, 9]}]
    with Image.open(tmp_path / "out" / "images" / "000019.png") as im:  # episode 1, frame 9
        mean = np.asarray(im, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    assert np.abs(mean - colour(1, 6)).max() < 8


def test_bad_requests_write_nothing(src, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(HarnessError, match="exceeds the 30 frames"):
        build_from_lerobot(src, out, n=31, seed=0, chunks=[0, 1])
    with pytest.raises(HarnessError, match="no parquet files for chunk 7"):
        build_from_lerobot(src, out, n=3, seed=0, chunks=[0, 7])
    with pytest.raises(HarnessError, match="distinct"):
        build_from_lerobot(src, out, n=3, seed=0, chunks=[0, 0])
    with pytest.raises(HarnessError, match="info.json: missing"):
        build_from_lerobot(tmp_path / "nowhere", out, n=3, seed=0, chunks=[0])
    with pytest.raises(HarnessError, match="no feature 'observation.images.wrist'"):
        build_from_lerobot(src, out, n=3, seed=0, chunks=[0], video_key="observation.images.wrist")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_v3_layout_is_refused(tmp_path):
    src = write_lerobot(tmp_path / "src", version="v3.0")
    with pytest.raises(HarnessError, match="v2.x"):
        build_from_lerobot(src, tmp_path / "out", n=3, seed=0, chunks=[0])


def test_missing_video_is_named(tmp_path):
    src = write_lerobot(tmp_path / "src")
    video = src / "videos/chunk-001/observation.images.image_0/episode_000002.mp4"
    video.unlink()
    with pytest.raises(HarnessError, match="episode_000002.mp4: video missing"):
        build_from_lerobot(src, tmp_path / "out", n=30, seed=0, chunks=[0, 1])
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_missing_optional_dependency_names_the_extra(src, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(HarnessError, match=r"'av'.*harness\[lerobot-data\]"):
        build_from_lerobot(src, tmp_path / "out", n=3, seed=0, chunks=[0])


def test_cli_build(src, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["data", "build", "--lerobot", str(src), "--n", "6", "--seed", "1",
            "--chunks", "0", "1", "--dataset-repo", "tiny/bridge", str(out)]
    assert main(argv) == 0
    assert "wrote 6 samples" in capsys.readouterr().out
    assert json.loads((out / "metadata.json").read_text())["dataset_repo"] == "tiny/bridge"
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(argv) == 2  # exists, no --force
    assert main(argv[:-1] + ["--n", "40", str(out)]) == 2
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(argv[:-1] + ["--per-episode", "--n", "3", "--force", str(out)]) == 0
    assert len(set(json.loads((out / "metadata.json").read_text())["episode_indices"])) == 3


def test_future_states_stay_in_the_episode_and_repeat_its_end(src, tmp_path):
    """feats_B_seq.pt[i, h] is the state of frame f+h of sample i's episode (pad column
    dropped), the episode's last frame past its end; padding is counted per step."""
    out = tmp_path / "out"
    build_from_lerobot(src, out, n=12, seed=5, chunks=[0, 1], horizon_max=3)
    loaded = data.load(out)
    seq = torch.load(out / "feats_B_seq.pt", weights_only=True)
    assert seq.shape == (12, 4, 7)
    for i, (e, f) in enumerate(zip(loaded.episodes, loaded.frames)):
        for h in range(4):
            g = min(f + h, FRAMES - 1)
            assert seq[i, h].tolist() == pytest.approx(state(e, g)[:6] + state(e, g)[7:]), (i, h)
    side = json.loads((out / "feats_B_seq.json").read_text())
    assert side["horizon_max"] == 3 and side["padded_per_step"][3] > 0  # the end is exercised
    assert side["padded_per_step"] == [sum(f + h > FRAMES - 1 for f in loaded.frames)
                                       for h in range(4)]
    assert side["valid_steps"] == [min(3, FRAMES - 1 - f) + 1 for f in loaded.frames]
    build_from_lerobot(src, tmp_path / "none", n=12, seed=5, chunks=[0, 1], horizon_max=0)
    assert not (tmp_path / "none" / "feats_B_seq.pt").exists()
