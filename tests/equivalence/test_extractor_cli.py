"""`python -m harness extract ...` on the stand-ins: files in the seed's layout, limit,
resume, refusals, and the seed scripts' flag spellings."""
from __future__ import annotations

import json

import pytest
import torch

from harness.cli import main

N = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from harness.synth import generate
    root = tmp_path_factory.mktemp("data") / "cknna_data"
    generate(root, n=N, seed=0, progress=False)
    return root


@pytest.mark.parametrize("family,ckpt", [("spatialvla", "tiny"), ("pi0_lerobot", "tiny"),
                                         ("pi0_lerobot", "tiny:new"), ("starvla", "tiny"),
                                         ("starvla", "tiny:qwen3_vl"), ("hf", "tiny:gemma")])
def test_writes_feats_in_seed_layout(family, ckpt, data_dir, tmp_path):
    from harness.extractors import tiny
    needs = {"starvla": ckpt.replace("tiny:", "") if ":" in ckpt else "qwen2_5_vl"}.get(family)
    if needs and tiny.unavailable(needs):
        pytest.skip(tiny.unavailable(needs))
    out = tmp_path / "model-label"
    rc = main(["extract", family, "--ckpt", ckpt, "--data_dir", str(data_dir),
               "--output_dir", str(out), "--batch_size", "4"])
    assert rc == 0
    feats = torch.load(out / "feats_A.pt", weights_only=True)
    assert isinstance(feats, torch.Tensor) and feats.dtype == torch.float32
    assert feats.shape == (N, 64) and torch.isfinite(feats).all()
    meta = json.loads((out / "extraction_metadata.json").read_text())
    assert meta["feats_A_shape"] == [N, 64] and meta["sample_indices"] == list(range(N))
    assert meta["model"] == ckpt or meta["model"].startswith("tiny")


def test_limit_and_resume(data_dir, tmp_path):
    out = tmp_path / "pi0"
    args = ["extract", "pi0_lerobot", "--ckpt", "tiny", "--data_dir", str(data_dir),
            "--output_dir", str(out), "--batch_size", "2"]
    assert main(args + ["--limit", "3"]) == 0
    first = torch.load(out / "feats_A.pt", weights_only=True)
    assert first.shape[0] == 3
    assert main(args + ["--limit", "3"]) == 2  # shards exist: refuse without --resume
    assert main(args + ["--limit", "3", "--resume"]) == 0
    assert torch.equal(torch.load(out / "feats_A.pt", weights_only=True), first)


def test_resume_refuses_other_settings(data_dir, tmp_path, capsys):
    out = tmp_path / "pi0"
    base = ["extract", "pi0_lerobot", "--ckpt", "tiny", "--data_dir", str(data_dir),
            "--output_dir", str(out)]
    assert main(base) == 0
    assert main(base + ["--seed_tokenization", "--resume"]) == 2
    assert "different provenance" in capsys.readouterr().err


def test_spatialvla_layer_sweep_files(data_dir, tmp_path):
    out = tmp_path / "sv"
    assert main(["extract", "spatialvla", "--ckpt", "tiny", "--data_dir", str(data_dir),
                 "--output_dir", str(out), "--layers", "0,1"]) == 0
    for name in ("feats_A.pt", "feats_A_layer0.pt", "feats_A_layer1.pt"):
        assert torch.load(out / name, weights_only=True).shape == (N, 64)


def test_pi0_layer_sweep_files(data_dir, tmp_path):
    """Pi0 sweeps its layers through the residual-stream hooks (harness.residual_stream);
    its last hidden_states index is the final norm, so it equals feats_A.pt."""
    out = tmp_path / "o"
    assert main(["extract", "pi0_lerobot", "--ckpt", "tiny", "--data_dir", str(data_dir),
                 "--output_dir", str(out), "--layers", "all"]) == 0
    final = torch.load(out / "feats_A.pt", weights_only=True)
    layers = [torch.load(out / f"feats_A_layer{i}.pt", weights_only=True) for i in range(3)]
    assert torch.equal(layers[2], final)
    assert not torch.allclose(layers[1], final)
    meta = json.loads((out / "extraction_metadata.json").read_text())
    assert "input_layernorm" in meta["layer_capture"]
    assert main(["extract", "pi0_lerobot", "--ckpt", "tiny", "--data_dir", str(data_dir),
                 "--output_dir", str(tmp_path / "p"), "--layers", "5"]) == 2


def test_missing_cuda_is_a_clear_error(data_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert main(["extract", "spatialvla", "--ckpt", "tiny", "--data_dir", str(data_dir),
                 "--output_dir", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
