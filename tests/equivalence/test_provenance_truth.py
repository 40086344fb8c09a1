"""Provenance truth: for every family's stand-in, what the metadata records (weights
dtype, attention implementation, image size, image-token count, prompt, padding side)
equals what the forward pass actually used, read by spies on the modules and on the
inputs they received, never from the arguments the extractor was given."""
from __future__ import annotations

import json
from argparse import Namespace

import pytest
import torch

from harness.commands.extract import build_extractor
from harness.extractors import tiny
from harness.extractors.engine.features import extract
from tests.random_samples import TASKS, random_samples

HF_STAND_INS = [("starvla", "tiny:qwen2_5_vl", {}), ("starvla", "tiny:qwen3_vl", {}),
                ("starvla", "tiny:qwen2_5_vl", {"attn_implementation": "sdpa"}),
                ("starvla", "tiny:qwen2_5_vl", {"seed_compat": True}),
                ("starvla", "tiny:qwen2_5_vl", {"cot_prompt": "Do {instruction} now."}),
                ("hf", "tiny:paligemma", {}), ("spatialvla", "tiny", {})]


def _args(family, ckpt, **opts):
    return Namespace(family=family, ckpt=ckpt, device="cpu", dtype="auto", layers="last",
                     revision=None, **opts)


class Spy:
    """Counts scaled_dot_product_attention calls and the dtypes of every Linear weight
    and input that ran, while it is active."""

    def __init__(self, model, monkeypatch):
        self.sdpa_calls, self.weight_dtypes, self.input_dtypes = 0, set(), set()
        real = torch.nn.functional.scaled_dot_product_attention

        def counting(*a, **k):
            self.sdpa_calls += 1
            return real(*a, **k)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(self._linear)

    def _linear(self, module, args):
        self.weight_dtypes.add(str(module.weight.dtype).removeprefix("torch."))
        self.input_dtypes.add(str(args[0].dtype).removeprefix("torch."))


class ProcessorSpy:
    """Forwards to the real processor; keeps the images it was handed."""

    def __init__(self, inner):
        self.__dict__["inner"], self.__dict__["images"] = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        self.images += [im.size for im in kwargs.get("images") or []]
        return self.inner(*args, **kwargs)


def _meta(out):
    return json.loads((out / "extraction_metadata.json").read_text())


def _side(mask: torch.Tensor) -> str:
    return "left" if (~mask.bool()[:, 0]).any() else "right"


@pytest.mark.parametrize("family,ckpt,opts", HF_STAND_INS)
def test_hf_family_records_what_the_forward_used(family, ckpt, opts, tmp_path, monkeypatch):
    if ckpt.startswith("tiny:") and ckpt[5:] in tiny.FAMILIES and tiny.unavailable(ckpt[5:]):
        pytest.skip(tiny.unavailable(ckpt[5:]))
    fed = []
    with build_extractor(_args(family, ckpt, **opts)) as ex:
        spy = Spy(ex.model, monkeypatch)
        ex.processor = ProcessorSpy(ex.processor)
        ex.model.register_forward_pre_hook(lambda m, a, k: fed.append(k), with_kwargs=True)
        extract(ex, random_samples(4, size=(256, 256)), tmp_path, batch_size=4, progress=False)
        image_token = ex.image_token_id
        tokenizer = ex.tokenizer
        images = ex.processor.images
    meta = _meta(tmp_path)
    ids, mask = fed[0]["input_ids"], fed[0]["attention_mask"]
    # dtype: the weights and activations every Linear ran with
    assert spy.weight_dtypes == spy.input_dtypes == {meta["dtype"]}
    assert meta["observed"]["hidden_dtype"] == [meta["dtype"]]
    # attention: sdpa ran iff it is recorded
    assert meta["attn_implementation"] in ("eager", "sdpa")
    assert (spy.sdpa_calls > 0) == (meta["attn_implementation"] == "sdpa")
    # image size handed to the processor, and image tokens in the ids the model received
    sizes = sorted({f"{w}x{h}" for w, h in images})
    assert meta["observed"]["image_size_fed"] == sizes
    if family == "starvla":  # its own resize: the recorded size; seed_compat: 252; else none
        side = meta["image_size"]
        assert sizes == ([f"{side}x{side}"] if side else
                         ["252x252"] if meta["seed_compat"] else ["256x256"])
    pixels = fed[0].get("pixel_values")
    if pixels is not None and pixels.ndim == 4:  # (B, C, H, W): what the vision tower saw
        assert meta["observed"]["pixel_size"] == [f"{pixels.shape[-1]}x{pixels.shape[-2]}"]
        if isinstance(meta.get("image_size"), int):
            assert pixels.shape[-1] == pixels.shape[-2] == meta["image_size"]
    assert meta["observed"]["image_tokens"] == sorted(set((ids == image_token).sum(1).tolist()))
    # padding side: where the model's attention mask has its zeros
    assert meta["padding_side"] == _side(mask) == meta["observed"]["padding_side"][0]
    # prompt: the recorded template, filled with the task, is in the ids the model got
    text = tokenizer.decode(ids[0][mask[0].bool()])
    template = meta["prompt_template"]
    filled = template.replace("{instruction}", TASKS[0]) if "{instruction}" in template \
        else TASKS[0]
    assert filled in text


@pytest.mark.parametrize("ckpt,opts", [("tiny", {}), ("tiny:new", {}), ("tiny", {"seed_compat": True})])
def test_pi0_records_what_the_prefix_forward_used(ckpt, opts, tmp_path, monkeypatch):
    seen = {}
    with build_extractor(_args("pi0_lerobot", ckpt, **opts)) as ex:
        model = ex.policy.model
        spy = Spy(model, monkeypatch)
        real = model.embed_prefix

        def embed_prefix(images, img_masks, lang_tokens, lang_masks):
            out = real(images, img_masks, lang_tokens, lang_masks)
            seen.update(images=images, tokens=lang_tokens, masks=lang_masks, embs=out[0])
            return out

        monkeypatch.setattr(model, "embed_prefix", embed_prefix)
        extract(ex, random_samples(4), tmp_path, batch_size=4, progress=False)
        tokenizer = ex.tokenizer
    meta = _meta(tmp_path)
    assert spy.weight_dtypes == {meta["dtype"]} and meta["observed"]["hidden_dtype"] == [meta["dtype"]]
    size = seen["images"][0].shape
    assert meta["observed"]["image_size_fed"] == [f"{size[-1]}x{size[-2]}"]
    assert meta["observed"]["image_tokens"] == [seen["embs"].shape[1] - seen["tokens"].shape[1]]
    assert meta["padding_side"] == _side(seen["masks"]) == meta["observed"]["padding_side"][0]
    text = tokenizer.decode(seen["tokens"][0][seen["masks"][0]])
    seed = bool(opts.get("seed_compat"))
    assert meta["seed_compat"] is seed
    # char-level stand-in tokenizer: one token per character after <bos>; the seed
    # truncates to tokenizer_max_length and adds no newline, the policy's path the reverse
    length = meta["tokenizer_max_length"]
    assert text == ("<bos>" + TASKS[0][: length - 1] if seed else "<bos>" + TASKS[0] + "\n")
