"""A tiny random-weight imitation of OpenVLA (Prismatic) and its processor, for CI.

OpenVLA's modelling code ships inside the checkpoint (`trust_remote_code`) and needs timm
0.9.x, which needs torchvision; neither can be a CI dependency here, and upstream code may
not be copied. So this module imitates the published architecture, written for this
project from its public description (docs/facts.md §3):
- vision: two ViTs fed the two halves of a 6-channel image (DINOv2-style with a class
  token and 4 register tokens and LayerScale; SigLIP-style without prefix tokens). Each
  returns the patch tokens of its SECOND-TO-LAST block, no final norm; the two are
  concatenated along the feature axis (256 patches at 224 px, patch 14);
- projector: fc1 (4x the fused width), GELU, fc2, GELU, fc3;
- language model: transformers' own `LlamaForCausalLM`; the projected patches are inserted
  right after BOS, with mask ones; a one-token forward with a cache continues a generation
  (logits: last position only, all the extractor reads);
- processor: resize-naive 224 bicubic, /255, DINO half ImageNet mean/std, SigLIP half
  0.5/0.5, stacked to 6 channels; a character tokenizer laid out like Llama-2's ids
  (unk 0, BOS 1, EOS 2, "▁" 29871, pad 32000 = vocab 32064), right padding.
Parameter names follow the real checkpoint's state dict (timm's ViT names, LayerScale's
`scale_factor` as Prismatic renames it), so the real weights load into it (the opt-in test
`tests/equivalence/test_openvla_real.py` copies the real classes' tiny weights in and
compares features). Timm's ViT is replaced by plain torch here: timm would be a new
dependency whose data module imports torchvision, which does not install beside CPU torch.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn

SEED = 0
IMAGE = 224
PATCH = 14
N_PATCHES = (IMAGE // PATCH) ** 2  # 256, as the real dinosiglip-224px backbone gives
VOCAB = 32064  # Llama-2's 32000 + the pad token, padded to a multiple of 64
UNK, BOS, EOS, EMPTY, PAD = 0, 1, 2, 29871, 32000
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
DINO = dict(width=32, depth=3, heads=2, mlp=64, n_cls=1, n_reg=4, layer_scale=True)
SIGLIP = dict(width=24, depth=3, heads=2, mlp=48, n_cls=0, n_reg=0, layer_scale=False)


# ---------------------------------------------------------------- vision
class LayerScale(nn.Module):
    """x * per-channel factor (named `scale_factor`, as Prismatic renames timm's gamma)."""

    def __init__(self, width: int, init: float = 1e-5):
        super().__init__()
        self.scale_factor = nn.Parameter(torch.full((width,), init))

    def forward(self, x):
        return x * self.scale_factor


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block, optional LayerScale on both branches."""

    def __init__(self, width: int, heads: int, mlp: int, layer_scale: bool):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.attn, self.mlp = Attention(width, heads), Mlp(width, mlp)
        self.ls1 = LayerScale(width) if layer_scale else nn.Identity()
        self.ls2 = LayerScale(width) if layer_scale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, PATCH, stride=PATCH)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """A ViT that returns the patch tokens after its second-to-last block (prefix tokens
    dropped, no final norm), as Prismatic's featurizers do. Position embeddings cover the
    patches only; class and register tokens are prepended after them (DINOv2-reg style)."""

    def __init__(self, width: int, depth: int, heads: int, mlp: int, n_cls: int, n_reg: int,
                 layer_scale: bool):
        super().__init__()
        self.embed_dim, self.n_prefix = width, n_cls + n_reg
        self.patch_embed = PatchEmbed(width)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 1e-6) if n_cls else None
        self.reg_token = nn.Parameter(torch.randn(1, n_reg, width) * 1e-6) if n_reg else None
        self.pos_embed = nn.Parameter(torch.randn(1, N_PATCHES, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp, layer_scale) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)  # in the checkpoint, unused by the features

    def forward(self, pixels):
        x = self.patch_embed(pixels) + self.pos_embed
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        x = torch.cat([*prefix, x], dim=1)
        for block in self.blocks[:-1]:  # the second-to-last block's output
            x = block(x)
        return x[:, self.n_prefix:]


class VisionBackbone(nn.Module):
    """`featurizer` on channels 0-2, `fused_featurizer` on 3-5, features concatenated."""

    def __init__(self):
        super().__init__()
        self.featurizer, self.fused_featurizer = ViT(**DINO), ViT(**SIGLIP)
        self.embed_dim = self.featurizer.embed_dim + self.fused_featurizer.embed_dim

    def forward(self, pixel_values):
        first, second = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat([self.featurizer(first), self.fused_featurizer(second)], dim=2)


class Projector(nn.Module):
    """The fused-backbone projector: vision -> 4x vision -> LLM width -> LLM width."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)
        self.act_fn1, self.act_fn2 = nn.GELU(), nn.GELU()

    def forward(self, patches):
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(patches)))))


# ---------------------------------------------------------------- model
def llama_config(attn: str = "sdpa"):
    """A 64-wide, 2-layer Llama with Llama-2's token id layout."""
    from transformers import LlamaConfig
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=2048, rms_norm_eps=1e-5, pad_token_id=PAD,
                         bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    config._attn_implementation = attn
    return config


@dataclass
class TinyOpenVLAConfig:
    """The fields of OpenVLAConfig the extractor reads."""
    text_config: object
    model_type: str = "openvla"
    vision_backbone_id: str = "dinosiglip-vit-so-224px"
    llm_backbone_id: str = "llama2-7b-pure"
    use_fused_vision_backbone: bool = True
    image_sizes: list = field(default_factory=lambda: [IMAGE, IMAGE])
    image_resize_strategy: str = "resize-naive"
    pad_token_id: int = PAD
    n_action_bins: int = 256


class TinyOpenVLA(nn.Module):
    """Vision backbone + projector + Llama, called like `OpenVLAForActionPrediction`:
    a multimodal forward (patches after BOS) or a one-token cached step."""

    def __init__(self, seed: int = SEED, attn: str = "sdpa"):
        super().__init__()
        from transformers import LlamaForCausalLM
        torch.manual_seed(seed)
        text = llama_config(attn)
        self.config = TinyOpenVLAConfig(text_config=text)
        self.vision_backbone = VisionBackbone()
        self.projector = Projector(self.vision_backbone.embed_dim, text.hidden_size)
        self.language_model = LlamaForCausalLM(text)

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None,
                past_key_values=None, use_cache=None, output_hidden_states=None,
                return_dict=True, **_):
        lm = self.language_model
        common = dict(use_cache=use_cache, output_hidden_states=output_hidden_states,
                      return_dict=True, **_last_logits_only(lm))
        if input_ids.shape[1] == 1 and past_key_values is not None:  # cached generation step
            cache = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
            return lm(input_ids=input_ids, **{cache: past_key_values}, **common)  # 5.x renamed it
        patches = self.projector(self.vision_backbone(pixel_values))
        embeds = lm.get_input_embeddings()(input_ids)
        embeds = torch.cat([embeds[:, :1], patches, embeds[:, 1:]], dim=1)
        mask = None
        if attention_mask is not None:
            ones = attention_mask.new_ones(patches.shape[:2])
            mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        return lm(inputs_embeds=embeds, attention_mask=mask, **common)


def _last_logits_only(lm) -> dict:
    """Logits of the last position only: the extractor reads no others (the greedy step),
    and the 32064-wide head over every position would be most of the stand-in's time. The
    real model computes them all; the values read are the same."""
    params = inspect.signature(lm.forward).parameters
    return next(({name: 1} for name in ("logits_to_keep", "num_logits_to_keep") if name in params), {})


# ---------------------------------------------------------------- processor
def tokenizer(padding_side: str = "right"):
    """Characters as tokens, ids laid out like Llama-2's (BOS prepended, pad 32000)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    names = [f"<unused{i}>" for i in range(VOCAB)]  # no holes in the id range
    for i, c in enumerate([chr(c) for c in range(32, 127)] + ["\n"]):
        names[3 + i] = c
    for i, name in ((UNK, "<unk>"), (BOS, "<s>"), (EOS, "</s>"), (EMPTY, "▁"), (PAD, "<PAD>")):
        names[i] = name
    vocab = {name: i for i, name in enumerate(names)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                        special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<PAD>", padding_side=padding_side,
                                   model_input_names=["input_ids", "attention_mask"])


class TinyImageProcessor:
    """Resize-naive (square, bicubic), /255, per-view mean/std, views stacked on channels;
    the attribute names are the real PrismaticImageProcessor's."""

    def __init__(self):
        self.image_resize_strategy = "resize-naive"
        self.input_sizes = [[3, IMAGE, IMAGE], [3, IMAGE, IMAGE]]
        self.interpolations = ["bicubic", "bicubic"]
        self.means, self.stds = [IMAGENET_MEAN, SIGLIP_MEAN], [IMAGENET_STD, SIGLIP_STD]

    def view(self, image: Image.Image, index: int) -> np.ndarray:
        size = self.input_sizes[index][-1]
        array = np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        mean = np.asarray(self.means[index], dtype=np.float32)
        std = np.asarray(self.stds[index], dtype=np.float32)
        return ((array - mean) / std).transpose(2, 0, 1)

    def __call__(self, images, return_tensors="pt"):
        images = images if isinstance(images, list) else [images]
        stacked = [np.concatenate([self.view(im.convert("RGB"), i) for i in range(len(self.input_sizes))])
                   for im in images]
        return {"pixel_values": torch.from_numpy(np.stack(stacked))}


class TinyPrismaticProcessor:
    """Called like PrismaticProcessor: `(text, images, padding=...)` -> input_ids,
    attention_mask (from the tokenizer) and pixel_values (float32, 6 channels)."""

    def __init__(self, padding_side: str = "right"):
        self.image_processor, self.tokenizer = TinyImageProcessor(), tokenizer(padding_side)

    def __call__(self, text, images, padding=False, return_tensors="pt", **_):
        from transformers import BatchFeature
        pixels = self.image_processor(images)["pixel_values"]
        tokens = self.tokenizer(text, padding=padding, return_tensors="pt")
        if pixels.shape[0] != tokens["input_ids"].shape[0]:
            raise ValueError("expected as many images as texts")
        return BatchFeature({**tokens, "pixel_values": pixels})


def tiny_openvla(seed: int = SEED, attn: str = "sdpa"):
    """(model, processor): the OpenVLA extractor's stand-in, float32, eval mode."""
    return TinyOpenVLA(seed, attn).float().eval(), TinyPrismaticProcessor()
