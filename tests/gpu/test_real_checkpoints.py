"""Real checkpoints -> `<label>/feats_A.pt` in the seed's layout, with the seed's checklist.

For each family whose checkpoint is available (environment variable, else the HF cache;
otherwise a skip saying how to provide it) the extraction runs over the data directory
of `--data-dir` and writes `<HARNESS_FEATS_DIR or data dir>/<label>/feats_A.pt`, resuming
from finished shards. Then: shape (N, 2304) / (N, 2048) / (N, 4096), finite, the first
batch re-run gives identical rows, batched equals single within bf16 tolerance, and each item of the
seed's verification checklist.

Environment: HARNESS_SPATIALVLA_CKPT, HARNESS_PI0_CKPT, HARNESS_STARVLA_CKPT,
HARNESS_OPENVLA_CKPT (path or hub id; SpatialVLA, Pi0 and OpenVLA are also found in the HF
cache under their repo ids),
HARNESS_STARVLA_LABEL (output folder name, e.g. Qwen-GR00T-Bridge), HARNESS_FEATS_DIR
(root of the <label>/ folders; default the data directory, as in the seed),
HARNESS_GPU_LIMIT (first N samples only), HARNESS_GPU_BATCH (default 8).
Example: pytest tests/gpu -m gpu --data-dir cknna/cknna_data

With `--stand-ins` the same tests run against the tiny stand-ins (hidden size 64; on CUDA
when present, else CPU) over a synthetic data directory unless `--data-dir` is given:
that is how CI keeps this module from rotting.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from harness import data as data_mod
from harness.extractors.engine import features
from harness.commands.extract import build_extractor
from harness.errors import HarnessError
from harness.extractors.engine.registry import final_norm_paths
from harness.extractors.engine.hooks import capture

FINAL_NORM_PATHS = final_norm_paths()
from harness.extractors.engine.pooling import masked_mean


@dataclass(frozen=True)
class Target:
    family: str
    env: str
    repo: str | None
    label: str
    dim: int | None  # None: read from the model config (StarVLA backbones differ)


TARGETS = {
    "spatialvla": Target("spatialvla", "HARNESS_SPATIALVLA_CKPT",
                         "IPEC-COMMUNITY/spatialvla-4b-224-sft-bridge", "spatialvla-sft-bridge", 2304),
    "pi0_lerobot": Target("pi0_lerobot", "HARNESS_PI0_CKPT", "HaomingSong/lerobot-pi0-bridge",
                          "pi0-lerobot-bridge", 2048),
    "starvla": Target("starvla", "HARNESS_STARVLA_CKPT", None,
                      os.environ.get("HARNESS_STARVLA_LABEL", "starvla"), None),
    "openvla": Target("openvla", "HARNESS_OPENVLA_CKPT", "openvla/openvla-7b", "openvla-7b-bridge",
                      4096),
}
STAND_IN_DIM = 64
REAL_IMAGE_TOKENS = 256  # SpatialVLA and Pi0 at 224x224 (docs/facts.md §3)
BATCH = int(os.environ.get("HARNESS_GPU_BATCH", 8))
N_CHECK = 3  # samples re-run alone


def _cached(repo: str | None) -> bool:
    if repo is None:
        return False
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(repo, "config.json"), str)


def _checkpoint(target: Target, stand_ins: bool) -> str:
    if stand_ins:
        from harness.extractors import tiny
        reason = tiny.unavailable("qwen2_5_vl") if target.family == "starvla" else None
        if reason:
            pytest.skip(f"starvla stand-in: {reason}")
        return "tiny"
    ckpt = os.environ.get(target.env) or (target.repo if _cached(target.repo) else None)
    if ckpt is None:
        how = f"set {target.env}=<local path or hub id>"
        if target.repo:
            how += f", or download it into the HF cache (huggingface-cli download {target.repo})"
        else:
            how += " (a StarVLA steps_*_pytorch_model.pt or an HF Qwen-VL checkpoint); name " \
                   "its output folder with HARNESS_STARVLA_LABEL"
        pytest.skip(f"no {target.family} checkpoint: {how}")
    return ckpt


@dataclass
class Run:
    target: Target
    extractor: object
    feats: torch.Tensor
    out_dir: Path
    samples: object
    stand_in: bool


@pytest.fixture(scope="module")
def data_dir(request, tmp_path_factory) -> Path:
    given = request.config.getoption("--data-dir")
    if given:
        return Path(given)
    from harness.data.synth import generate
    root = tmp_path_factory.mktemp("gpu_data") / "cknna_data"
    generate(root, n=12, seed=0, progress=False)
    return root


@pytest.fixture(scope="module", params=sorted(TARGETS))
def run(request, data_dir, tmp_path_factory):
    target = TARGETS[request.param]
    stand_ins = request.config.getoption("--stand-ins")
    ckpt = _checkpoint(target, stand_ins)
    cuda = torch.cuda.is_available()  # stand-ins too: exercises the device paths
    args = argparse.Namespace(
        family=target.family, ckpt=ckpt, device="cuda" if cuda else "cpu", dtype="auto",
        layers="last", revision=None, unnorm_key="bridge_orig/1.0.0", image_key=None,
        seed_tokenization=False, allow_missing_keys=[], allow_unexpected_keys=[], pi0_code="auto",
        cot_prompt=None, image_size=224)
    data = data_mod.load(data_dir)
    samples = data_mod.ImageTaskDataset(data)
    limit = os.environ.get("HARNESS_GPU_LIMIT")
    if limit:
        samples = torch.utils.data.Subset(samples, range(min(int(limit), len(samples))))
    root = tmp_path_factory.mktemp("feats") if stand_ins else \
        Path(os.environ.get("HARNESS_FEATS_DIR", data_dir))
    out_dir = root / target.label
    try:
        with build_extractor(args) as extractor:
            layers = features.extract(extractor, samples, out_dir, batch_size=BATCH,
                                      dataset_fingerprint=data_mod.fingerprint(data_dir),
                                      progress=False)
            yield Run(target, extractor, layers["last"], out_dir, samples, stand_ins)
    except HarnessError as err:
        if "transformers >=" in str(err) or "OpenVLA's checkpoint code" in str(err):
            # SpatialVLA / OpenVLA in an environment their remote code cannot run in
            pytest.skip(str(err))
        raise


def _dim(run: Run) -> int:
    if run.stand_in:
        return STAND_IN_DIM
    return run.target.dim or int(run.extractor.hidden_dim)


def _pooled(run: Run, batch) -> torch.Tensor:
    h = run.extractor.forward(run.extractor.build_inputs(batch))
    return masked_mean(h.layers["last"], h.mask).cpu()


def _batch(run: Run, n: int):
    return [run.samples[i] for i in range(min(n, len(run.samples)))]


def _low_precision(run: Run) -> bool:
    return "float32" not in json.loads(
        (run.out_dir / features.METADATA).read_text()).get("dtype", "")


# ---------------------------------------------------------------- the file
def test_feats_file(run):
    feats = torch.load(run.out_dir / features.FEATS, weights_only=True)
    assert isinstance(feats, torch.Tensor) and feats.dtype == torch.float32
    assert feats.shape == (len(run.samples), _dim(run))
    assert torch.isfinite(feats).all()
    assert feats.std(dim=0).max() > 0  # not a constant (e.g. all-padding) feature


def test_rerun_of_first_batch_is_identical(run):
    again = _pooled(run, _batch(run, BATCH))
    assert torch.equal(again, run.feats[: len(again)])


def test_batched_equals_single(run):
    tol = 2e-2 if _low_precision(run) else 1e-5
    for i, sample in enumerate(_batch(run, N_CHECK)):
        single = _pooled(run, [sample])[0]
        err = (single - run.feats[i]).norm() / run.feats[i].norm()
        assert err < tol, f"sample {i}: relative difference {err:.2e} alone vs in a batch"


# ---------------------------------------------------------------- the seed's checklist
def _final_norm_paths(run: Run) -> tuple[str, ...]:
    ex = run.extractor
    if run.target.family == "spatialvla":
        paths = FINAL_NORM_PATHS["paligemma2"]
        return paths + tuple("paligemma." + p for p in paths)  # the stand-in wraps one
    if run.target.family == "starvla":
        return FINAL_NORM_PATHS[ex.model.config.model_type]
    return (ex.norm_path,)


def _hook_root(run: Run):
    ex = run.extractor
    return ex.policy.model.paligemma_with_expert if run.target.family == "pi0_lerobot" else ex.model


def test_1_extraction_point_is_the_final_norm(run):
    """Checklist 1-2: features are the post-final-norm hidden states, of the model's width."""
    ex = run.extractor
    inputs = ex.build_inputs(_batch(run, 2))
    with capture(_hook_root(run), _final_norm_paths(run)) as hooked:
        h = ex.forward(inputs)
    assert hooked.calls >= 1
    torch.testing.assert_close(h.layers["last"], hooked.output, atol=0, rtol=0)
    assert h.layers["last"].shape[-1] == _dim(run)


def test_3_vision_and_text_tokens_no_state(run, monkeypatch):
    """Checklist 3: the pooled tokens hold image and text tokens; no state enters."""
    ex = run.extractor
    if run.target.family == "pi0_lerobot":
        seen = []
        policy = ex.policy
        name = "prepare_images" if hasattr(policy, "prepare_images") else "_preprocess_images"
        original = getattr(policy, name)
        monkeypatch.setattr(policy, name, lambda batch: seen.append(set(batch)) or original(batch))
        inputs = ex.build_inputs(_batch(run, 2))
        h = ex.forward(inputs)
        assert seen == [{ex.image_key}]  # image only: no (dummy) state
        n_lang = inputs["lang_tokens"].shape[1]
        assert h.mask[:, :-n_lang].all() and h.mask[:, -n_lang:].any(dim=1).all()
        if not run.stand_in:  # SigLIP-So400m/14 at 224: 256 image tokens
            assert h.mask.shape[1] - n_lang == REAL_IMAGE_TOKENS
        return
    inputs = ex.build_inputs(_batch(run, 2))
    h = ex.forward(inputs)
    if run.target.family == "openvla":  # patches are inserted after BOS, not token ids
        image = ex.modality_masks(inputs, [s[2] for s in _batch(run, 2)], h).image
        assert (image.sum(dim=1) == REAL_IMAGE_TOKENS).all()  # stand-in too: 224 px, patch 14
        assert (h.mask & ~image).any(dim=1).all()
        return
    image_id = getattr(ex, "image_token_id", None) or getattr(
        ex.model.config, "image_token_index", None) or ex.model.config.image_token_id
    image = (inputs["input_ids"] == image_id) & h.mask
    text = h.mask & ~image
    assert image.any(dim=1).all() and text.any(dim=1).all()
    if run.target.family == "spatialvla" and not run.stand_in:
        assert (image.sum(dim=1) == REAL_IMAGE_TOKENS).all()


def test_4_hooks_do_not_change_outputs(run):
    ex = run.extractor
    inputs = ex.build_inputs(_batch(run, 2))
    plain = ex.forward(inputs).layers["last"].clone()
    with capture(_hook_root(run), _final_norm_paths(run)):
        hooked = ex.forward(inputs).layers["last"]
    assert torch.equal(plain, hooked)


def test_5_aligned_with_the_shared_pipeline(run, data_dir):
    """Checklist 5: same data (fingerprint), masked-mean pooling, a plain float tensor."""
    meta = json.loads((run.out_dir / features.METADATA).read_text())
    assert meta["dataset_fingerprint"] == data_mod.fingerprint(data_dir)
    assert meta["pooling"] == "mean"
    assert meta["feats_A_shape"] == list(run.feats.shape)


@pytest.mark.parametrize("run", ["pi0_lerobot"], indirect=True)
def test_6_pi0_image_key_from_config(run):
    ex = run.extractor
    assert ex.image_key == list(ex.policy.config.image_features)[0]
    assert ex.provenance()["image_key"] == ex.image_key


@pytest.mark.parametrize("run", ["spatialvla"], indirect=True)
def test_7_spatialvla_processor_kwargs(run, monkeypatch):
    ex = run.extractor
    calls = []
    original = ex.processor

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(ex, "processor", spy)
    ex.build_inputs(_batch(run, 1))
    assert calls[0]["do_normalize"] is False and calls[0]["unnorm_key"] == "bridge_orig/1.0.0"
    monkeypatch.setattr(ex, "processor", original)
    assert ex.provenance()["attn_implementation"] == "eager"


@pytest.mark.parametrize("run", ["pi0_lerobot"], indirect=True)
def test_8_pi0_tokens_end_with_newline(run):
    ex = run.extractor
    ids, mask = ex.tokenize(["put the spoon on the towel"])
    newline = ex.tokenizer.encode("\n", add_special_tokens=False)[-1]
    assert ids[0, int(mask[0].sum()) - 1] == newline
    assert mask[0, 0] and ids.shape[1] >= ex.max_length  # right padded to the config length


def test_9_pooling_matches_the_seed_formula(run):
    ex = run.extractor
    h = ex.forward(ex.build_inputs(_batch(run, 3)))
    hidden, m = h.layers["last"].float(), h.mask.unsqueeze(-1).float()
    seed = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
    torch.testing.assert_close(masked_mean(h.layers["last"], h.mask), seed, atol=1e-5, rtol=1e-5)
