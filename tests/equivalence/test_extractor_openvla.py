"""OpenVLA extractor on its stand-in (`openvla_standin`, checked against the real Prismatic
files by the opt-in tests/equivalence/test_openvla_real.py): what `extract` writes and
records, the modality masks, layers, batching, the final-norm hook, the action path, the
token 29871 option and the bf16 loader policy."""
from __future__ import annotations

import json

import pytest
import torch

from harness.cli import main
from harness.errors import HarnessError
from harness.extractors import openvla, openvla_standin as standin
from harness.extractors.engine.hooks import capture
from harness.extractors.engine.pooling import masked_mean
from tests.random_samples import TASKS, random_samples


@pytest.fixture(scope="module")
def built():
    return standin.tiny_openvla()


def extractor(built, dtype="float32", **kw):
    model, processor = built
    return openvla.OpenVLAExtractor("tiny", dtype=dtype, model=model, processor=processor, **kw).load()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from harness.data.synth import generate
    root = tmp_path_factory.mktemp("data") / "d"
    generate(root, n=5, seed=0, progress=False)
    return root


def run_cli(data_dir, out, *flags):
    return main(["extract", "openvla", "--ckpt", "tiny", "--data_dir", str(data_dir),
                 "--output_dir", str(out), "--batch_size", "2", *flags])


def test_extract_writes_feats_and_records_what_ran(data_dir, tmp_path):
    out = tmp_path / "o"
    assert run_cli(data_dir, out) == 0
    feats = torch.load(out / "feats_A.pt", weights_only=True)
    assert feats.shape == (5, 64) and torch.isfinite(feats).all()
    meta = json.loads((out / "extraction_metadata.json").read_text())
    assert meta["family"] == "openvla" and meta["class"] == "TinyOpenVLA"
    assert meta["prompt_template"] == "In: What action should the robot take to {task}?\nOut:"
    assert meta["append_empty_token"] is False
    assert meta["dtype"] == "float32" and meta["attn_implementation"] == "sdpa"
    assert meta["padding_side"] == "right" and meta["pad_token_id"] == 32000
    assert meta["image_resize_strategy"] == "resize-naive"
    assert meta["image_size"] == [[3, 224, 224], [3, 224, 224]]
    seen = meta["observed"]
    assert seen["image_tokens"] == [256] and seen["pixel_size"] == ["224x224"]
    assert seen["pixel_channels"] == [6] and seen["prompt_ends_with_29871"] == [False]
    assert seen["hidden_dtype"] == ["float32"]


def test_append_empty_token_is_appended_recorded_and_changes_features(built, data_dir, tmp_path):
    ex = extractor(built, append_empty_token=True)
    inputs = ex.build_inputs(random_samples())
    lengths = inputs["attention_mask"].sum(dim=1)
    plain = extractor(built).build_inputs(random_samples())
    assert (lengths == plain["attention_mask"].sum(dim=1) + 1).all()
    assert (inputs["input_ids"][torch.arange(4), lengths - 1] == openvla.EMPTY_TOKEN).all()
    out = tmp_path / "o"
    assert run_cli(data_dir, out, "--append_empty_token") == 0
    meta = json.loads((out / "extraction_metadata.json").read_text())
    assert meta["append_empty_token"] is True
    assert meta["observed"]["prompt_ends_with_29871"] == [True]
    assert run_cli(data_dir, tmp_path / "p") == 0
    assert not torch.equal(torch.load(out / "feats_A.pt"), torch.load(tmp_path / "p" / "feats_A.pt"))


def test_split_masks_select_exactly_the_256_patches_and_the_task(built):
    ex = extractor(built)
    samples = random_samples()
    inputs = ex.build_inputs(samples)
    hidden = ex.forward(inputs)
    masks = ex.modality_masks(inputs, TASKS, hidden)
    ids = inputs["input_ids"]
    assert hidden.mask.shape[1] == ids.shape[1] + 256
    expected_image = torch.zeros_like(hidden.mask)
    expected_image[:, 1:257] = True  # right after BOS
    assert torch.equal(masks.image, expected_image)
    for row, task in enumerate(TASKS):
        picked = masks.text[row].nonzero().flatten()
        if task:  # the task's characters, found in the prompt after the patches
            assert ex.tokenizer.decode(ids[row, picked - 256]) == task
            assert masks.text_fallback[row] is None
        else:
            assert masks.text_fallback[row] == "empty_task"
            assert not (masks.text[row] & masks.image[row]).any()


def test_split_and_layers_all_from_the_cli(data_dir, tmp_path):
    out = tmp_path / "o"
    assert run_cli(data_dir, out, "--split_modalities", "--layers", "all") == 0
    last = torch.load(out / "feats_A.pt")
    layers = sorted(p.name for p in out.glob("feats_A_layer*.pt"))
    assert layers == ["feats_A_layer0.pt", "feats_A_layer1.pt", "feats_A_layer2.pt"]
    assert torch.equal(torch.load(out / "feats_A_layer2.pt"), last)  # hidden_states[-1]
    assert not torch.equal(torch.load(out / "feats_A_layer1.pt"), last)
    img, txt = torch.load(out / "feats_A_img.pt"), torch.load(out / "feats_A_txt.pt")
    assert img.shape == txt.shape == last.shape
    assert run_cli(data_dir, tmp_path / "plain") == 0
    assert torch.equal(torch.load(tmp_path / "plain" / "feats_A.pt"), last)


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_batch_of_one_equals_batch_of_four(dtype, atol):
    ex = extractor(standin.tiny_openvla(), dtype=dtype)
    samples = random_samples()
    h = ex.forward(ex.build_inputs(samples))
    together = masked_mean(h.layers["last"], h.mask)
    for i, sample in enumerate(samples):
        alone = ex.forward(ex.build_inputs([sample]))
        torch.testing.assert_close(masked_mean(alone.layers["last"], alone.mask), together[i:i + 1],
                                   rtol=0, atol=atol)


def test_hook_on_the_final_norm_equals_last_hidden_state(built):
    model, processor = built
    inputs = processor([openvla.PROMPT.format(task=t) for t in TASKS],
                       [s[1] for s in random_samples()], padding=True)
    with torch.no_grad(), capture(model, list(openvla.NORM_PATHS)) as hooked:
        out = model(**inputs, output_hidden_states=True, use_cache=False)
    assert hooked.calls == 1
    assert torch.equal(hooked.output, out.hidden_states[-1])
    assert out.hidden_states[-1].abs().sum() > 0


def test_forward_refuses_a_hook_that_is_not_the_final_norm(built, monkeypatch):
    ex = extractor(built)
    monkeypatch.setattr(ex, "norm_path", "language_model.model.layers.0")
    with pytest.raises(HarnessError, match="hidden_states"):
        ex.forward(ex.build_inputs(random_samples(1)))


def _uncached_greedy(model, inputs, row):
    """The seed's action representation computed without a KV cache: the whole sequence
    rerun at every step (an independent check of the cached loop)."""
    n = int(inputs["attention_mask"][row].sum())
    ids = inputs["input_ids"][row:row + 1, :n]
    states = []
    with torch.no_grad():
        for step in range(openvla.N_ACTION_TOKENS):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                        pixel_values=inputs["pixel_values"][row:row + 1], output_hidden_states=True)
            if step:
                states.append(out.hidden_states[-1][0, -1])
            ids = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return torch.stack(states).mean(dim=0)


def test_action_repr_is_the_mean_over_the_six_fed_generated_tokens(built):
    ex = extractor(built)
    inputs = ex.build_inputs(random_samples())
    got = ex.action_features(inputs)
    assert got.shape == (4, 64)
    for row in range(4):
        torch.testing.assert_close(got[row], _uncached_greedy(ex.model, inputs, row), rtol=0, atol=1e-5)
    alone = ex.action_features(ex.build_inputs(random_samples()[1:2]))
    torch.testing.assert_close(alone, got[1:2], rtol=0, atol=1e-5)


def test_action_repr_from_the_cli_leaves_feats_A_unchanged(data_dir, tmp_path):
    assert run_cli(data_dir, tmp_path / "a", "--action_repr") == 0
    assert run_cli(data_dir, tmp_path / "b") == 0
    assert torch.equal(torch.load(tmp_path / "a" / "feats_A.pt"), torch.load(tmp_path / "b" / "feats_A.pt"))
    action = torch.load(tmp_path / "a" / "feats_action.pt")
    assert action.shape == (5, 64) and torch.isfinite(action).all()
    meta = json.loads((tmp_path / "a" / "extraction_metadata.json").read_text())
    assert "generated tokens 1..6" in meta["action_repr"]["tokens"]


def test_bfloat16_is_the_real_loader_policy(data_dir, tmp_path):
    """`--dtype bfloat16` leaves the stand-in as from_pretrained(torch_dtype=bf16) leaves
    the real model (compared tensor by tensor in test_openvla_real.py): every parameter
    bf16, the rotary inv_freq buffer float32; recorded from the modules."""
    ex = extractor(standin.tiny_openvla(), dtype="bfloat16")
    assert {p.dtype for p in ex.model.parameters()} == {torch.bfloat16}
    kept = openvla.float32_tensors(ex.model)  # 4.47: also one per layer; 5.x: original_inv_freq
    assert "language_model.model.rotary_emb.inv_freq" in kept
    assert all(n.startswith("language_model.") and ".rotary_emb." in n and n.endswith("inv_freq")
               for n in kept)
    out = tmp_path / "o"
    assert run_cli(data_dir, out, "--dtype", "bfloat16") == 0
    meta = json.loads((out / "extraction_metadata.json").read_text())
    assert meta["dtype"] == "bfloat16"
    assert meta["float32_tensors"] == kept
    assert meta["observed"]["hidden_dtype"] == ["bfloat16"]


def test_real_checkpoint_environment_is_checked_before_loading(monkeypatch):
    import importlib.metadata as md
    monkeypatch.setattr(md, "version", lambda name: "1.0.9")
    with pytest.raises(HarnessError, match="timm"):
        openvla.check_environment()


def test_append_token_refuses_left_padding():
    batch = {"input_ids": torch.tensor([[0, 1, 5]]), "attention_mask": torch.tensor([[0, 1, 1]])}
    with pytest.raises(HarnessError, match="right-padding"):
        openvla.append_token(batch, openvla.EMPTY_TOKEN, 0)
