"""StarVLA extractor on tiny Qwen2.5-VL / Qwen3-VL: prompt as StarVLA builds it (checkpoint's
CoT_prompt, else the raw instruction), 224 resize or the seed's image path, left padding,
loader dtype and autocast, mm_token_type_ids, batch invariance, the loader's error paths."""
from __future__ import annotations

import pytest
import torch

from harness.errors import HarnessError
from harness.extractors import starvla, tiny
from harness.extractors.starvla import StarVLAExtractor
from harness.extractors.engine.registry import final_norm_paths
from harness.extractors.engine.hooks import capture

FINAL_NORM_PATHS = final_norm_paths()
from harness.extractors.engine.pooling import masked_mean
from tests.random_samples import TASKS, random_samples

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
# The CoT_prompt of every shipped StarVLA training yaml (starvla_cotrain_oxe.yaml).
COT_PROMPT = ("Your task is {instruction}. To identify the key objects for your task. "
              "Locate their bounding boxes in [x1,y1,x2,y2] format.")
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


def _decoded(ex, batch):
    inputs = ex.build_inputs(batch)
    return ex.tokenizer.decode(inputs["input_ids"][0][inputs["attention_mask"][0].bool()])


def test_cot_prompt_reaches_the_tokens():
    ex = extractor(cot_prompt=COT_PROMPT)
    assert COT_PROMPT.format(instruction=TASKS[0]) in _decoded(ex, samples(1))
    prov = ex.provenance()
    assert prov["prompt_template"] == COT_PROMPT and prov["prompt_source"] == "--cot_prompt"


def test_without_a_cot_prompt_the_raw_instruction_is_the_prompt():
    """StarVLA's build_qwenvl_inputs: no CoT_prompt key -> prompt = instruction (no
    built-in grounding prompt)."""
    ex = extractor()
    text = _decoded(ex, samples(1))
    assert TASKS[0] in text and "Your task" not in text
    prov = ex.provenance()
    assert prov["prompt_template"] == "{instruction}" and "raw instruction" in prov["prompt_source"]


def test_prompt_is_filled_by_replace_not_format():
    """Braces other than {instruction} stay literal (str.replace), as in StarVLA."""
    ex = extractor(cot_prompt="{x} do {instruction} {}")
    assert ex.fill_prompt("a {b}") == "{x} do a {b} {}"


def test_cot_prompt_without_instruction_is_refused():
    with pytest.raises(HarnessError, match="no \\{instruction\\}"):
        extractor(cot_prompt="")


def build(family="qwen2_5_vl"):
    if tiny.unavailable(family):
        pytest.skip(tiny.unavailable(family))
    return tiny.build(family, padding_side="left")


def test_images_resized_to_image_size_and_left_padding():
    model, processor = build()
    spy = SpyProcessor(processor)
    ex = StarVLAExtractor("given", dtype="float32", model=model, processor=spy,
                          image_size=224).load()
    h = ex.forward(ex.build_inputs(samples()))
    assert [im.size for im in spy.calls[-1]["images"]] == [(224, 224)] * len(TASKS)
    assert ex.provenance()["image_size_source"] == "--image_size"
    assert h.mask[:, -1].all() and not h.mask[1, 0]  # left padding
    assert ex.tokenizer.padding_side == "left"


def test_chat_template_gets_image_then_cot_text():
    model, processor = build()
    spy = SpyProcessor(processor, chat=True)
    ex = StarVLAExtractor("given", dtype="float32", model=model, processor=spy).load()
    ex.build_inputs(samples(2))
    content = spy.messages[0][0]["content"]
    assert content[0]["type"] == "image"
    assert content[1] == {"type": "text", "text": TASKS[0]}


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
    monkeypatch.setattr(starvla, "load_starvla",
                        lambda path: (model, processor, {"CoT_prompt": "Do {instruction} now"}))
    ex = StarVLAExtractor(str(ckpt), dtype="float32").load()
    assert ex.fill_prompt("it") == "Do it now"
    prov = ex.provenance()
    assert prov["source"] == "starVLA framework" and prov["prompt_template"] == "Do {instruction} now"
    assert prov["prompt_source"] == "checkpoint config datasets.vla_data.CoT_prompt"


def _framework(tmp_path, monkeypatch, **kw):
    """A 'framework checkpoint' whose loader returns bf16 weights, as StarVLA's does
    (torch_dtype="auto" / dtype=torch.bfloat16, no later cast)."""
    ckpt = tmp_path / "steps_1_pytorch_model.pt"
    ckpt.write_bytes(b"")
    model, processor = build()
    model.to(torch.bfloat16)
    monkeypatch.setattr(starvla, "load_starvla", lambda path: (model, processor, None))
    return StarVLAExtractor(str(ckpt), **kw).load()


def test_starvla_framework_keeps_the_loaders_bf16_weights(tmp_path, monkeypatch):
    ex = _framework(tmp_path, monkeypatch)  # dtype None: `--dtype auto` on a real checkpoint
    assert {p.dtype for p in ex.model.parameters()} == {torch.bfloat16}
    prov = ex.provenance()
    assert prov["dtype"] == "bfloat16"
    assert prov["autocast"] == "off"  # StarVLA's autocast("cuda") does nothing on CPU
    h = ex.forward(ex.build_inputs(samples(2)))
    assert h.layers["last"].dtype == torch.bfloat16
    assert ex.observed.as_dict()["autocast"] == ["off"]


def test_autocast_on_request_is_active_and_recorded(tmp_path, monkeypatch):
    model, processor = build()
    ex = StarVLAExtractor("given", dtype="float32", model=model, processor=processor,
                          autocast="bfloat16").load()
    inputs = ex.build_inputs(samples(2))
    h = ex.forward(inputs)
    mixed = masked_mean(h.layers["last"], h.mask)
    assert ex.provenance()["autocast"] == "bfloat16"
    assert ex.observed.as_dict()["autocast"] == ["bfloat16"]  # read inside the context
    ex.autocast = "off"  # the same weights in plain float32
    h = ex.forward(inputs)
    full = masked_mean(h.layers["last"], h.mask)
    rel = ((mixed - full).norm() / full.norm()).item()
    assert 0 < rel < 5e-2  # bf16 matmuls ran (autocast active), and only rounding differs


def test_attention_flag_is_refused_for_a_framework_checkpoint(tmp_path, monkeypatch):
    with pytest.raises(HarnessError, match="loader's choice"):
        _framework(tmp_path, monkeypatch, attn_implementation="sdpa")


def test_hub_ids_default_to_sdpa_and_record_what_loaded(tmp_path, monkeypatch):
    import transformers
    model, processor = build()
    model.save_pretrained(tmp_path / "qwen")
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: processor)
    ex = StarVLAExtractor(str(tmp_path / "qwen")).load()  # dtype None -> the checkpoint's own
    assert ex.attn == "sdpa" and ex.provenance()["attn_implementation"] == "sdpa"
    assert ex.provenance()["dtype"] == "float32"  # the saved stand-in is float32


def test_plain_hf_checkpoint_keeps_rotary_buffers_float32(tmp_path, monkeypatch):
    """from_pretrained(dtype=bf16) keeps inv_freq float32; a later .to(bf16) must not
    cast it (that would move every position's rotation)."""
    import transformers
    model, processor = build()
    model.save_pretrained(tmp_path / "qwen")
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: processor)
    ex = StarVLAExtractor(str(tmp_path / "qwen"), dtype="bfloat16").load()
    assert ex.provenance()["source"] == "transformers" and ex.autocast == "off"
    assert next(ex.model.parameters()).dtype == torch.bfloat16
    buffers = {n: b.dtype for n, b in ex.model.named_buffers() if n.endswith("inv_freq")}
    assert buffers and set(buffers.values()) == {torch.float32}
    assert torch.isfinite(pooled(ex, samples(2))).all()


# ---------------------------------------------------------------- --seed_compat image path
def test_seed_resize_matches_hand_computed_sizes():
    """qwen_vl_utils' smart_resize (factor 28): each side to the nearest multiple of 28
    (worked by hand: 256/28 = 9.14 -> 252; 640/28 = 22.9 -> 644; 480/28 = 17.1 -> 476)."""
    assert starvla.seed_resize_size(256, 256) == (252, 252)
    assert starvla.seed_resize_size(224, 224) == (224, 224)
    assert starvla.seed_resize_size(640, 480) == (644, 476)
    assert starvla.seed_resize_size(20, 20) == (56, 56)  # below 4*28*28 pixels: scaled up


@pytest.mark.parametrize("family,fed", [("qwen2_5_vl", (252, 252)), ("qwen3_vl", (256, 256))])
def test_seed_compat_hands_the_processor_the_seeds_image(family, fed):
    model, processor = build(family)
    spy = SpyProcessor(processor)
    ex = StarVLAExtractor("given", dtype="float32", model=model, processor=spy,
                          seed_compat=True).load()
    ex.build_inputs(samples(2, side=256))
    assert [im.size for im in spy.calls[-1]["images"]] == [fed] * 2
    prov = ex.provenance()
    assert prov["seed_compat"] is True and prov["image_size"] is None
    assert ex.observed.as_dict()["image_size_fed"] == [f"{fed[0]}x{fed[1]}"]


def _qwen25_image_tokens(images) -> list[int]:
    """Image tokens the real Qwen2.5-VL image processor (patch 14, merge 2, its released
    pixel bounds) makes of each image: grid t*h*w / merge**2."""
    from transformers import Qwen2VLImageProcessor
    proc = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                 min_pixels=3136, max_pixels=12845056)
    grid = proc(images=images, return_tensors="pt")["image_grid_thw"]
    return (grid.prod(dim=1) // 4).tolist()


def test_seed_path_gives_81_image_tokens_and_default_64_on_qwen25():
    """The reason --seed_compat exists: on 256 px PNGs the seed's Qwen2.5-VL features saw
    252 px = 18x18 patches = 81 merged tokens; predict_action's 224 px gives 64."""
    model, processor = build()
    seed = StarVLAExtractor("given", dtype="float32", model=model, processor=processor,
                            seed_compat=True).load()
    default = StarVLAExtractor("given", dtype="float32", model=model, processor=processor,
                               image_size=224).load()
    images = [im for _, im, _ in samples(2, side=256)]
    assert _qwen25_image_tokens(seed.prepare_images(images)) == [81, 81]
    assert _qwen25_image_tokens(default.prepare_images(images)) == [64, 64]


def _fake_starvla(tmp_path, monkeypatch, config):
    """The starVLA package's loader, faked: `baseframework.from_pretrained` returns a
    framework holding a tiny Qwen2.5-VL and `config` (what StarVLA's config.yaml gives)."""
    import sys
    import types
    model, processor = build()
    framework = types.SimpleNamespace(
        qwen_vl_interface=types.SimpleNamespace(model=model, processor=processor), config=config)
    names = ["starVLA", "starVLA.model", "starVLA.model.framework",
             "starVLA.model.framework.base_framework"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[-1]].baseframework = types.SimpleNamespace(
        from_pretrained=lambda path: framework)
    ckpt = tmp_path / "steps_1_pytorch_model.pt"
    ckpt.write_bytes(b"")
    return str(ckpt)


def test_prompt_source_says_which_config_key_was_missing(tmp_path, monkeypatch):
    """No `datasets.vla_data`, or one without CoT_prompt: the raw instruction either way,
    and the record says which; a config that fails to read is an error, not 'no prompt'."""
    from types import SimpleNamespace
    ckpt = _fake_starvla(tmp_path, monkeypatch, SimpleNamespace(framework={}))
    prov = StarVLAExtractor(ckpt, dtype="float32").load().provenance()
    assert prov["prompt_source"] == ("none: the checkpoint config has no datasets.vla_data "
                                     "(raw instruction)")
    ckpt = _fake_starvla(tmp_path, monkeypatch, {"datasets": {"vla_data": {"image_size": None}}})
    prov = StarVLAExtractor(ckpt, dtype="float32").load().provenance()
    assert prov["prompt_source"] == ("none: checkpoint config datasets.vla_data has no "
                                     "CoT_prompt (raw instruction)")

    class Broken(dict):
        def __contains__(self, key):
            raise AttributeError("a bug while reading the config")

    ckpt = _fake_starvla(tmp_path, monkeypatch, Broken())
    with pytest.raises(AttributeError, match="a bug while reading"):
        StarVLAExtractor(ckpt, dtype="float32").load()


@pytest.mark.parametrize("config_size,fed", [([48, 48], (48, 48)), (40, (40, 40)),
                                             (None, (256, 256))])
def test_image_size_follows_the_checkpoint_config(tmp_path, monkeypatch, config_size, fed):
    """predict_action resizes to `datasets.vla_data.image_size` when set and not at all when
    unset; the size fed is recorded (and --seed_compat keeps the seed's 252 px path)."""
    ckpt = _fake_starvla(tmp_path, monkeypatch,
                         {"datasets": {"vla_data": {"image_size": config_size}}})
    ex = StarVLAExtractor(ckpt, dtype="float32").load()
    ex.build_inputs(samples(2, side=256))
    assert ex.observed.as_dict()["image_size_fed"] == [f"{fed[0]}x{fed[1]}"]
    prov = ex.provenance()
    assert prov["image_size"] == (fed[0] if config_size else None)
    assert prov["image_size_source"].startswith(
        "checkpoint config datasets.vla_data.image_size" if config_size else "none:")
    seed = StarVLAExtractor(ckpt, dtype="float32", seed_compat=True).load()
    seed.build_inputs(samples(2, side=256))
    assert seed.observed.as_dict()["image_size_fed"] == ["252x252"]
