"""StarVLA extractor on tiny Qwen2.5-VL / Qwen3-VL: CoT prompt, 224 resize, left padding,
mm_token_type_ids, batch invariance, and the StarVLA loader's error paths."""
from __future__ import annotations

import pytest
import torch

from harness.errors import HarnessError
from harness.extractors import starvla, tiny
from harness.extractors.starvla import COT_PROMPT, StarVLAExtractor
from harness.extractors.registry import final_norm_paths
from harness.hooks import capture

FINAL_NORM_PATHS = final_norm_paths()
from harness.pooling import masked_mean
from tests.random_samples import TASKS, random_samples

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
def samples(n=len(TASKS), side=256):
    return random_samples(n, 0, (side, side))


def extractor(family="qwen2_5_vl", **kw):
    if tiny.unavailable(family):
        pytest.skip(tiny.unavailable(family))
    return StarVLAExtractor(f"tiny:{family}", dtype="float32", **kw).load()


def pooled(ex, batch):
    h = ex.forward(ex.build_inputs(batch))
    return masked_mean(h.layers["last"], h.mask)


class SpyProcessor:
    """Wraps the tiny processor, recording what the extractor hands it."""

    def __init__(self, inner, chat=False):
        self.inner, self.calls, self.messages = inner, [], []
        self.tokenizer, self.kind = inner.tokenizer, inner.kind
        self.image_token_id = inner.image_token_id
        if chat:
            self.apply_chat_template = self._chat

    def _chat(self, messages, add_generation_prompt=False, tokenize=True):
        assert add_generation_prompt and not tokenize
        self.messages.append(messages)
        return messages[0]["content"][-1]["text"]

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.inner(**kwargs)


def test_cot_prompt_reaches_the_tokens():
    ex = extractor()
    inputs = ex.build_inputs(samples(1))
    text = ex.tokenizer.decode(inputs["input_ids"][0][inputs["attention_mask"][0].bool()])
    assert COT_PROMPT.format(instruction=TASKS[0]) in text
    assert ex.provenance()["prompt_template"] == COT_PROMPT.replace("{instruction}", "{task}")


def build(family="qwen2_5_vl"):
    if tiny.unavailable(family):
        pytest.skip(tiny.unavailable(family))
    return tiny.build(family, padding_side="left")


def test_images_resized_to_224_and_left_padding():
    model, processor = build()
    spy = SpyProcessor(processor)
    ex = StarVLAExtractor("given", dtype="float32", model=model, processor=spy).load()
    h = ex.forward(ex.build_inputs(samples()))
    assert [im.size for im in spy.calls[-1]["images"]] == [(224, 224)] * len(TASKS)
    assert h.mask[:, -1].all() and not h.mask[1, 0]  # left padding
    assert ex.tokenizer.padding_side == "left"


def test_chat_template_gets_image_then_cot_text():
    model, processor = build()
    spy = SpyProcessor(processor, chat=True)
    ex = StarVLAExtractor("given", dtype="float32", model=model, processor=spy).load()
    ex.build_inputs(samples(2))
    content = spy.messages[0][0]["content"]
    assert content[0]["type"] == "image"
    assert content[1] == {"type": "text", "text": COT_PROMPT.format(instruction=TASKS[0])}


@pytest.mark.parametrize("family", FAMILIES)
def test_mm_token_type_ids_mark_image_tokens(family):
    if tiny.transformers_major() < 5:
        pytest.skip("mm_token_type_ids exist from transformers 5")
    ex = extractor(family)
    inputs = ex.build_inputs(samples(2))
    assert torch.equal(inputs["mm_token_type_ids"].bool(), inputs["input_ids"] == ex.image_token_id)


def test_mm_token_type_ids_derived_when_processor_omits_them():
    if tiny.transformers_major() < 5:
        pytest.skip("mm_token_type_ids exist from transformers 5")
    ex = extractor()

    class Bare(SpyProcessor):
        def __call__(self, **kwargs):
            out = dict(self.inner(**kwargs))
            out.pop("mm_token_type_ids", None)
            return out

    ex.processor = Bare(ex.processor)
    inputs = ex.build_inputs(samples(2))
    assert torch.equal(inputs["mm_token_type_ids"].bool(), inputs["input_ids"] == ex.image_token_id)
    without = dict(inputs)
    del without["mm_token_type_ids"]  # the trap: Qwen2.5-VL silently drops to 1-D positions
    a = ex.forward(inputs)
    b = ex.forward(without)
    assert not torch.allclose(masked_mean(a.layers["last"], a.mask),
                              masked_mean(b.layers["last"], b.mask), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_invariance(family):
    ex = extractor(family)
    batch = samples()
    together = pooled(ex, batch)
    for i, sample in enumerate(batch):
        torch.testing.assert_close(together[i], pooled(ex, [sample])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_last_layer_is_the_final_norm(family):
    ex = extractor(family)
    inputs = ex.build_inputs(samples(2))
    with capture(ex.model, FINAL_NORM_PATHS[family]) as hooked:
        h = ex.forward(inputs)
    torch.testing.assert_close(h.layers["last"], hooked.output, atol=0, rtol=0)


def test_refuses_a_non_qwen_model():
    with pytest.raises(HarnessError, match="Qwen-VL"):
        StarVLAExtractor("tiny:paligemma", dtype="float32").load()


def test_starvla_checkpoint_needs_the_package(tmp_path):
    ckpt = tmp_path / "steps_45000_pytorch_model.pt"
    ckpt.write_bytes(b"")
    with pytest.raises(HarnessError, match="starVLA package"):
        StarVLAExtractor(str(ckpt)).load()


def test_checkpoint_cot_prompt_wins(tmp_path, monkeypatch):
    ckpt = tmp_path / "steps_1_pytorch_model.pt"
    ckpt.write_bytes(b"")
    model, processor = build()
    monkeypatch.setattr(starvla, "load_starvla", lambda path: (model, processor, "Do {instruction} now"))
    ex = StarVLAExtractor(str(ckpt), dtype="float32").load()
    assert ex.prompt_template == "Do {task} now"
    assert ex.provenance()["source"] == "starVLA framework"


def test_starvla_framework_runs_float32_weights_under_bf16_autocast(tmp_path, monkeypatch):
    ckpt = tmp_path / "steps_1_pytorch_model.pt"
    ckpt.write_bytes(b"")
    model, processor = build()
    monkeypatch.setattr(starvla, "load_starvla", lambda path: (model, processor, None))
    ex = StarVLAExtractor(str(ckpt), dtype="bfloat16").load()
    assert next(ex.model.parameters()).dtype == torch.float32
    assert ex.provenance()["autocast"] == "bfloat16"
    inputs = ex.build_inputs(samples(2))
    h = ex.forward(inputs)
    mixed = masked_mean(h.layers["last"], h.mask)
    ex.autocast = False  # the same weights in plain float32
    h = ex.forward(inputs)
    full = masked_mean(h.layers["last"], h.mask)
    rel = ((mixed - full).norm() / full.norm()).item()
    assert 0 < rel < 5e-2  # bf16 matmuls ran (autocast active), and only rounding differs


def test_plain_hf_checkpoint_keeps_rotary_buffers_float32(tmp_path, monkeypatch):
    """from_pretrained(dtype=bf16) keeps inv_freq float32; a later .to(bf16) must not
    cast it (that would move every position's rotation)."""
    import transformers
    model, processor = build()
    model.save_pretrained(tmp_path / "qwen")
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: processor)
    ex = StarVLAExtractor(str(tmp_path / "qwen"), dtype="bfloat16").load()
    assert ex.provenance()["source"] == "transformers" and ex.autocast is False
    assert next(ex.model.parameters()).dtype == torch.bfloat16
    buffers = {n: b.dtype for n, b in ex.model.named_buffers() if n.endswith("inv_freq")}
    assert buffers and set(buffers.values()) == {torch.float32}
    assert torch.isfinite(pooled(ex, samples(2))).all()
