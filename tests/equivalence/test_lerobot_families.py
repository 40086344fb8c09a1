"""The LeRobot families beyond Pi0 (smolvla, pi05, pi0_fast) through `harness extract
<family> --ckpt tiny`, on their stand-ins (imitations of LeRobot 0.4.4's classes; the real
classes are checked in tests/equivalence/test_lerobot04_*.py in the LeRobot venv):
feats_A.pt with recorded provenance, and the state-leakage rule: with state_in_input
false, changing the data directory's states leaves feats_A.pt bit-identical; with it
true, the features change."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from harness.cli import main
from harness.data.synth import generate

FAMILIES = ["smolvla", "pi05", "pi0_fast"]


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    """Two data directories equal but for their states."""
    root = tmp_path_factory.mktemp("lerobot_families")
    generate(root / "a", n=6, seed=0, horizon_max=0)  # no future states to keep in step
    shutil.copytree(root / "a", root / "b")
    states = torch.load(root / "a" / "feats_B.pt", weights_only=True)
    torch.save(states.flip(0) * 3 + 0.5, root / "b" / "feats_B.pt")
    return root / "a", root / "b"


def run_extract(family, data_dir, out, *flags):
    code = main(["extract", family, "--ckpt", "tiny", "--data_dir", str(data_dir),
                 "--output_dir", str(out), "--batch_size", "4", *flags])
    assert code == 0
    meta = json.loads((out / "extraction_metadata.json").read_text())
    return torch.load(out / "feats_A.pt", weights_only=True), meta


@pytest.mark.parametrize("family", FAMILIES)
def test_extract_tiny_writes_features_with_provenance(family, data_dirs, tmp_path):
    feats, meta = run_extract(family, data_dirs[0], tmp_path / "out")
    assert feats.shape[0] == 6 and torch.isfinite(feats).all()
    assert meta["family"] == family and meta["model"] == "tiny"
    assert meta["state_in_input"] == {"feats_A.pt": False} and meta["dtype"] == "float32"
    assert meta["feats_A_shape"] == list(feats.shape)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_leakage(family, data_dirs, tmp_path):
    a, _ = run_extract(family, data_dirs[0], tmp_path / "a")
    b, _ = run_extract(family, data_dirs[1], tmp_path / "b")
    assert torch.equal(a, b)
    c, meta = run_extract(family, data_dirs[0], tmp_path / "c", "--state_in_input")
    d, _ = run_extract(family, data_dirs[1], tmp_path / "d", "--state_in_input")
    assert meta["state_in_input"] == {"feats_A.pt": True}  # recorded per file
    assert not torch.equal(c, d)


def test_smolvla_stand_in_takes_the_release_dtype_policy():
    """dtype None (what a contract suite asks for: the checkpoint's own policy) puts the
    stand-in's VLM and expert in bfloat16 but for the cross-attention k/v projections (in
    the release's odd layers), the projections in float32, and it still runs."""
    from harness.extractors.smolvla import DTYPE_POLICY, SmolVLAExtractor
    from harness.extractors.smolvla_standin import tiny_smolvla
    from tests.random_samples import random_samples

    policy, tokenizer = tiny_smolvla()
    ex = SmolVLAExtractor("tiny", policy=policy, tokenizer=tokenizer, dtype=None).load()
    dtypes = ex.provenance()["parameter_dtypes"]
    assert dtypes == {"vlm": ["bfloat16"], "lm_expert": ["bfloat16", "float32"],
                      "state_proj": ["float32"]}
    expert = dict(ex.policy.model.vlm_with_expert.lm_expert.named_parameters())
    assert {n for n, p in expert.items() if p.dtype == torch.float32} == {
        "layers.1.self_attn.k_proj.weight", "layers.1.self_attn.v_proj.weight"}
    assert DTYPE_POLICY.mismatches(ex.policy) == []
    hidden = ex.forward(ex.build_inputs(random_samples(2)))
    assert hidden.layers["last"].dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["pi05", "pi0_fast"])
def test_pi05_stand_ins_load_with_the_checkpoint_dtype_policy(family):
    """dtype None: the stand-in's config says bfloat16, so paligemma is bfloat16 but for
    the norms and SigLIP's embeddings (LeRobot's rule; on CPU its bfloat16 prefill fails
    in SigLIP, as LeRobot's own does: tests/equivalence/test_lerobot04_pi05.py)."""
    from harness.extractors.engine.registry import Common, get
    spec = get(family)
    opts = {o.name: o.default for o in spec.options}
    common = Common(ckpt="tiny", device="cpu", dtype=None, layers="last", revision=None, tiny=True)
    ex = spec.build(common, opts, None).load()
    params = dict(ex.policy.model.paligemma_with_expert.named_parameters())
    norms = [p.dtype for n, p in params.items()
             if "language_model" in n and n.endswith("norm.weight")]  # the Gemma RMSNorms
    others = [p.dtype for n, p in params.items() if "proj" in n]
    assert norms and set(norms) == {torch.float32}
    assert others and set(others) == {torch.bfloat16}
    assert "bfloat16" in ex.provenance()["dtype_policy"]


def test_pi05_refuses_action_repr_with_one_line(data_dirs, tmp_path, capsys):
    code = main(["extract", "pi05", "--ckpt", "tiny", "--data_dir", str(data_dirs[0]),
                 "--output_dir", str(tmp_path / "out"), "--action_repr"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "transformers fork" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out" / "feats_A.pt").exists()
