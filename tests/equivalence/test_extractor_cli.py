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
    from harness.data.synth import generate
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
    """Pi0 sweeps its layers through the residual-stream hooks
    (harness.extractors.engine.residual_stream); its last hidden_states index is the final
    norm, so it equals feats_A.pt."""
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


def _meta(out):
    return json.loads((out / "extraction_metadata.json").read_text())


def test_seed_compat_on_every_seed_family(data_dir, tmp_path):
    """--seed_compat: Pi0 = the seed's tokenisation (bit-identical to the older
    --seed_tokenization), StarVLA = the seed's image path, SpatialVLA = recorded only."""
    from PIL import Image

    from harness.extractors import tiny
    from harness.extractors.starvla import seed_resize_size
    runs = [("pi0_seed", "pi0_lerobot", ["--seed_compat"]),
            ("pi0_alias", "pi0_lerobot", ["--seed_tokenization"]),
            ("pi0_default", "pi0_lerobot", []),
            ("sv", "spatialvla", ["--seed_compat"]),
            ("sv_default", "spatialvla", [])]
    with_starvla = not tiny.unavailable("qwen2_5_vl")  # transformers 4.47 has no Qwen2.5-VL
    if with_starvla:
        runs.append(("starvla", "starvla", ["--seed_compat"]))
    feats = {}
    for name, family, flags in runs:
        out = tmp_path / name
        assert main(["extract", family, "--ckpt", "tiny", "--data_dir", str(data_dir),
                     "--output_dir", str(out), *flags]) == 0
        feats[name] = torch.load(out / "feats_A.pt", weights_only=True)
        assert _meta(out)["seed_compat"] is bool(flags and flags[0] == "--seed_compat"
                                                 or name == "pi0_alias")
    assert torch.equal(feats["pi0_seed"], feats["pi0_alias"])
    assert not torch.equal(feats["pi0_seed"], feats["pi0_default"])  # no "\n": other tokens
    assert torch.equal(feats["sv"], feats["sv_default"])  # already the seed's path
    if with_starvla:
        side = Image.open(next((data_dir / "images").iterdir())).size
        w, h = seed_resize_size(*side)
        assert _meta(tmp_path / "starvla")["observed"]["image_size_fed"] == [f"{w}x{h}"]


@pytest.mark.parametrize("flag", ["--resume_from", "--save_every", "--resume-from"])
def test_seed_resume_flags_are_refused_with_a_pointer(flag, tmp_path, capsys):
    """The seed's `--resume_from N` / `--save_every N` parse (so the seed's commands are
    recognised) and are refused in one line pointing at --resume, before anything is
    read or written."""
    out = tmp_path / "out"
    rc = main(["extract", "starvla", "--ckpt", "tiny", "--data_dir", str(tmp_path / "nope"),
               "--output_dir", str(out), flag, "500"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--resume" in err and len(err.splitlines()) == 1
    assert not out.exists()
    with pytest.raises(SystemExit):  # hidden from --help: not an option of this tool
        main(["extract", "starvla", "--help"])
    assert "--resume_from" not in capsys.readouterr().out
