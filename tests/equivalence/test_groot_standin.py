"""`harness extract groot --ckpt tiny` on the stand-in (an imitation of LeRobot 0.4.4's
GR00T N1.5 backbone; the real classes are checked in tests/equivalence/test_lerobot04_groot.py
in the LeRobot venv): feats_A.pt with provenance, the backbone's state-blindness, exact
modality masks, the layer sweep, batch-size independence, and the dtype policy."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from harness.cli import main
from harness.extractors import groot_standin as standin
from harness.extractors.groot import GrootExtractor, eagle_pixels
from harness.data.synth import generate
from tests.random_samples import random_samples


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    """Two data directories equal but for their states."""
    root = tmp_path_factory.mktemp("groot")
    generate(root / "a", n=6, seed=0, horizon_max=0)
    shutil.copytree(root / "a", root / "b")
    states = torch.load(root / "a" / "feats_B.pt", weights_only=True)
    torch.save(states.flip(0) * 3 + 0.5, root / "b" / "feats_B.pt")
    return root / "a", root / "b"


def run_extract(data_dir, out, *flags):
    code = main(["extract", "groot", "--ckpt", "tiny", "--data_dir", str(data_dir),
                 "--output_dir", str(out), "--batch_size", "4", *flags])
    assert code == 0
    meta = json.loads((out / "extraction_metadata.json").read_text())
    return torch.load(out / "feats_A.pt", weights_only=True), meta


@pytest.fixture
def extractor(tmp_path):
    backbone, assets = standin.tiny_groot(tmp_path / "assets")
    return GrootExtractor("tiny", backbone=backbone, assets=str(assets), dtype="float32").load()


def test_extract_tiny_writes_features_with_provenance(data_dirs, tmp_path):
    feats, meta = run_extract(data_dirs[0], tmp_path / "out")
    assert feats.shape == (6, 64) and torch.isfinite(feats).all()
    assert meta["family"] == "groot" and meta["model"] == "tiny"
    assert not any(meta["state_in_input"].values()) and meta["dtype"] == "float32"
    assert meta["language_layers_run"] == meta["select_layer"] == standin.SELECT_LAYER
    assert meta["extraction_point"].endswith("backbone.eagle_model.language_model.model.norm")
    assert meta["observed"]["image_tokens"] == [4] and meta["observed"]["padding_side"] == ["left"]


def test_the_state_never_reaches_the_features(data_dirs, tmp_path):
    """The backbone takes no state: other states, bit-identical features; and there is no
    --state_in_input to ask for it (a one-line argparse refusal, exit 2)."""
    a, _ = run_extract(data_dirs[0], tmp_path / "a")
    b, _ = run_extract(data_dirs[1], tmp_path / "b")
    assert torch.equal(a, b)
    with pytest.raises(SystemExit) as stop:
        main(["extract", "groot", "--ckpt", "tiny", "--data_dir", str(data_dirs[0]),
              "--output_dir", str(tmp_path / "c"), "--state_in_input"])
    assert stop.value.code == 2


def test_split_modalities_and_all_layers(data_dirs, tmp_path):
    out = tmp_path / "out"
    feats, meta = run_extract(data_dirs[0], out, "--split_modalities", "--layers", "all")
    assert (out / "feats_A_img.pt").exists() and (out / "feats_A_txt.pt").exists()
    assert meta["layer_files"] == ["feats_A.pt"] + [f"feats_A_layer{i}.pt" for i in range(3)]
    last = torch.load(out / f"feats_A_layer{standin.SELECT_LAYER}.pt", weights_only=True)
    assert torch.equal(last, feats)  # hidden_states[L] is the final norm's output


def test_modality_masks_select_exactly_the_image_slots_and_the_task(extractor):
    samples = random_samples(4)
    inputs = extractor.build_inputs(samples)
    hidden = extractor.forward(inputs)
    masks = extractor.modality_masks(inputs, [t for _, _, t in samples], hidden)
    ids = inputs["eagle_input_ids"]
    image_id = extractor.text.tokenizer.convert_tokens_to_ids(standin.IMAGE_TOKEN)
    assert torch.equal(masks.image, ids == image_id)
    assert masks.image.sum(1).tolist() == [4] * 4
    assert not (masks.image & masks.text).any()
    for row, (_, _, task) in enumerate(samples):
        if task.strip():
            assert masks.text_fallback[row] is None
            assert extractor.text.tokenizer.decode(ids[row][masks.text[row]]) == task


def test_the_prompt_is_the_chat_template_over_the_task_as_a_list(extractor):
    text = extractor.text.prompt("pick up the can")
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<image 1><img>" + "<IMG_CONTEXT>" * 4 + "</img>['pick up the can']<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids, mask = extractor.text(["a", "a longer task"])
    assert mask[0, 0] == 0 and mask[1].all()  # left padding


def test_batch_of_four_equals_one_at_a_time(extractor):
    """Left padding shifts the rows' positions (GR00T passes no position ids); RoPE is
    shift-invariant, so the valid tokens agree to float rounding."""
    samples = random_samples(4)
    inputs = extractor.build_inputs(samples)
    batch = extractor.forward(inputs)
    for row, sample in enumerate(samples):
        one = extractor.forward(extractor.build_inputs([sample]))
        n = int(one.mask.sum())
        assert int(batch.mask[row].sum()) == n
        torch.testing.assert_close(batch.layers["last"][row][batch.mask[row]],
                                   one.layers["last"][0][one.mask[0]], rtol=1e-4, atol=1e-5)


def test_pixels_round_trip_through_uint8_then_map_to_minus_one_one():
    """Every 8-bit value survives LeRobot's /255 -> *255 -> uint8 truncation (float32), and
    the fused rescale + normalise gives (v - 127.5) / 127.5."""
    from PIL import Image
    import numpy as np
    values = np.arange(256, dtype=np.uint8)
    image = Image.fromarray(np.stack([np.tile(values, (256, 1))] * 3, axis=-1))
    pixels = eagle_pixels(image, 256)
    assert pixels.shape == (3, 256, 256)
    want = (torch.arange(256, dtype=torch.float32) - 127.5) / 127.5
    assert torch.equal(pixels[0, 0], want)
    assert eagle_pixels(image, 56).shape == (3, 56, 56)  # resized to the tile


def test_the_dtype_policy_without_dtype_runs_under_bf16_autocast(tmp_path):
    backbone, assets = standin.tiny_groot(tmp_path / "assets")
    ex = GrootExtractor("tiny", backbone=backbone, assets=str(assets)).load()
    record = ex.provenance()
    assert record["compute"] == "bfloat16 autocast" and "autocast" in record["dtype_policy"]
    hidden = ex.forward(ex.build_inputs(random_samples(2))).layers["last"]
    assert torch.isfinite(hidden.float()).all()


def test_a_real_checkpoint_needs_local_assets(tmp_path):
    from harness.errors import HarnessError
    with pytest.raises(HarnessError, match="--assets"):
        GrootExtractor(str(tmp_path)).load()
