"""An imitation of LeRobot 0.4.4's GR00T N1.5 backbone (`EagleBackbone` around Eagle 2.5),
tiny and random, with the processor assets it needs, for the main test suite and the demo
(LeRobot cannot share this venv; the real classes are checked in
tests/equivalence/test_lerobot04_groot.py, in the LeRobot venv, on the same weights).

It has the module paths and behaviour the `groot` extractor relies on:
`backbone.eagle_model.{vision_model, mlp1, language_model.model.norm}`, the language model
cut to `select_layer` layers (layers popped from the end, as `EagleBackbone.__init__`
does), the Eagle forward (SigLIP -> pixel shuffle by `downsample_ratio` -> `mlp1`, written
into the embeddings at the `<IMG_CONTEXT>` positions, then the language model with
`output_hidden_states`), and `backbone(vl_input)` returning `backbone_features` =
`eagle_linear(hidden_states[select_layer])` with `backbone_attention_mask`. The language
model is a Llama (the release's is Qwen3, which transformers 4.47 lacks); the real Eagle
class accepts both and the comparison test builds both from one config.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from harness.extractors import tiny

IMAGE, PATCH, VISION_WIDTH = 56, 14, 32  # (56/14)^2 = 16 patches -> 4 tokens after the shuffle
SELECT_LAYER, BUILT_LAYERS = 2, 3  # the language model is built with 3 layers, cut to 2
EAGLE_SPECIALS = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
IMAGE_TOKEN = "<IMG_CONTEXT>"

# Eagle 2.5's chat format as LeRobot's GrootEagleEncodeStep drives it: a system turn, one
# user turn of "<image-N>" placeholders then the text, the assistant prompt. Written here
# for the stand-in; a real checkpoint's text comes from its assets' chat_template.json.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% set seen = namespace(images=0) %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{% set seen.images = seen.images + 1 %}<image-{{ seen.images }}>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def eagle_tokenizer():
    """The character-level stand-in tokenizer with Eagle's special tokens, left padding
    (LeRobot's `_build_eagle_processor` sets it)."""
    tok = tiny.tokenizer("left")
    tok.add_special_tokens({"additional_special_tokens": tiny.SPECIALS[4:] + EAGLE_SPECIALS})
    return tok


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """(n, w, h, c) -> (n, w*ratio, h*ratio, c/ratio^2): neighbouring patches merged into
    channels, first along the third axis, then (after a transpose) along the second."""
    n, w, h, c = x.shape
    step = int(round(1 / ratio))
    x = x.reshape(n, w, h // step, c * step).transpose(1, 2)
    x = x.reshape(n, h // step, w // step, c * step * step).transpose(1, 2)
    return x.contiguous()


class TinyEagle(nn.Module):
    """`Eagle25VLForConditionalGeneration`'s forward path, tiny."""

    def __init__(self, vocab: int, image_token_index: int, width: int, seed: int):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel
        torch.manual_seed(seed)
        vision = SiglipVisionConfig(hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH,
                                    num_hidden_layers=1, num_attention_heads=2, image_size=IMAGE,
                                    patch_size=PATCH)
        vision._attn_implementation = "sdpa"
        self.vision_model = SiglipVisionModel(vision)
        self.downsample_ratio = 0.5
        shuffled = VISION_WIDTH * 4
        self.mlp1 = nn.Sequential(nn.LayerNorm(shuffled), nn.Linear(shuffled, width), nn.GELU(),
                                  nn.Linear(width, width))
        text = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=64,
                           num_hidden_layers=BUILT_LAYERS, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                           rms_norm_eps=1e-6, tie_word_embeddings=False)
        text._attn_implementation = "sdpa"
        self.language_model = LlamaForCausalLM(text)
        self.image_token_index = image_token_index
        self.num_image_token = (IMAGE // PATCH) ** 2 // 4
        self.config = SimpleNamespace(image_token_index=image_token_index)

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_model(pixel_values=pixel_values).last_hidden_state  # select_layer -1
        side = int(out.shape[1] ** 0.5)
        out = pixel_shuffle(out.reshape(out.shape[0], side, side, -1), self.downsample_ratio)
        return self.mlp1(out.reshape(out.shape[0], -1, out.shape[-1]))

    def forward(self, pixel_values, input_ids, attention_mask=None, output_hidden_states=None,
                return_dict=True):
        embeds = self.language_model.get_input_embeddings()(input_ids)
        vision = self.extract_feature(pixel_values)
        slots = input_ids == self.image_token_index
        embeds = embeds.clone()
        embeds[slots] = vision.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                   output_hidden_states=output_hidden_states)


class TinyEagleBackbone(nn.Module):
    """`EagleBackbone`: the Eagle model with its language model cut to `select_layer`
    layers and `eagle_linear` projecting the selected hidden state for the action head."""

    def __init__(self, vocab: int, image_token_index: int, width: int = 64,
                 project_to_dim: int = 48, select_layer: int = SELECT_LAYER, seed: int = tiny.SEED):
        super().__init__()
        self.eagle_model = TinyEagle(vocab, image_token_index, width, seed)
        self.eagle_linear = nn.Linear(width, project_to_dim)
        layers = self.eagle_model.language_model.model.layers
        while len(layers) > select_layer:
            layers.pop(-1)
        self.select_layer = select_layer

    def forward(self, vl_input: dict) -> dict:
        eagle = {k.removeprefix("eagle_"): v for k, v in vl_input.items() if k.startswith("eagle_")}
        eagle.pop("image_sizes")
        out = self.eagle_model(**eagle, output_hidden_states=True, return_dict=True)
        features = self.eagle_linear(out.hidden_states[self.select_layer])
        return {"backbone_features": features, "backbone_attention_mask": eagle["attention_mask"]}


def write_assets(directory, tokenizer, image_size: int = IMAGE, tokens_per_tile: int | None = None,
                 eagle_config: dict | None = None) -> Path:
    """The processor files the `groot` extractor reads from an assets directory (the
    local copy of LeRobot's `tokenizer_assets_repo`): the tokenizer, chat_template.json,
    processor_config.json (tokens_per_tile), preprocessor_config.json (tile size)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    tiles = tokens_per_tile if tokens_per_tile is not None else (image_size // PATCH) ** 2 // 4
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (directory / "processor_config.json").write_text(json.dumps({"tokens_per_tile": tiles}))
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": image_size, "width": image_size}, "image_mean": [0.5] * 3,
         "image_std": [0.5] * 3}))
    if eagle_config is not None:
        (directory / "config.json").write_text(json.dumps(eagle_config))
    return directory


def tiny_groot(directory, seed: int = tiny.SEED, width: int = 64, project_to_dim: int = 48):
    """(backbone, assets directory) of the stand-in; the assets are written to `directory`."""
    tok = eagle_tokenizer()
    backbone = TinyEagleBackbone(len(tok), tok.convert_tokens_to_ids(IMAGE_TOKEN), width,
                                 project_to_dim, seed=seed).eval()
    return backbone, write_assets(directory, tok)
