"""Seeded tiny random-weight models of every family, with locally built processors.

Nothing can be downloaded in CI, yet the extraction code must be exercised on the real
transformers architectures. Each `tiny_<family>()` returns `(model, processor)`: the model
built from a config (vocab 1024, hidden 64, 2 layers, 4 heads, head_dim 16; SigLIP /
Qwen vision on 32x32 images, patch 8; docs/facts.md §4), in eval mode with eager attention, and
a `TinyProcessor` that is called like a transformers processor
(`processor(images=..., text=..., padding=True, return_tensors="pt")`).

The processor builds what each family's real processor would (image placeholder tokens,
pixel values, `image_grid_thw`, and for transformers 5 the `token_type_ids` /
`mm_token_type_ids` without which PaliGemma turns causal and Qwen-VL loses its 3-D
positions). Its image preprocessing is written here from explicit parameters (resize,
rescale, normalise, patchify) so it behaves the same in every transformers release.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from harness.errors import HarnessError
from harness.extractors.engine.compat import transformers_major  # noqa: F401  (also tiny.transformers_major)

VOCAB = 1024
HIDDEN = 64
LAYERS = 2
HEADS = 4
HEAD_DIM = 16
IMAGE = 32
PATCH = 8
MERGE = 2  # Qwen spatial merge: 2x2 patches -> one token
TEMPORAL = 2  # Qwen temporal patch (a still image is repeated)
SEED = 0

# Token ids: specials first, then one token per printable character.
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>", "<|vision_start|>",
            "<|vision_end|>", "<|im_start|>", "<|im_end|>"]
PAD, EOS, BOS, UNK, IMAGE_TOKEN, VISION_START, VISION_END, IM_START, IM_END = range(len(SPECIALS))
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]

FAMILIES = ("gemma", "gemma2", "paligemma", "paligemma2", "qwen2_5_vl", "qwen3_vl")
_CLASSES = {  # family -> (config class, model class) names in transformers
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "paligemma": ("PaliGemmaConfig", "PaliGemmaForConditionalGeneration"),
    "paligemma2": ("PaliGemmaConfig", "PaliGemmaForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
}




def unavailable(family: str) -> str | None:
    """Why `family` cannot be built with the installed transformers, or None if it can."""
    import transformers
    missing = [name for name in _CLASSES[family] if not hasattr(transformers, name)]
    if missing:
        return f"transformers {transformers.__version__} has no {', '.join(missing)}"
    return None


def tokenizer(padding_side: str = "right"):
    """A character-level WordLevel tokenizer built in memory (no hub)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<bos>", unk_token="<unk>", padding_side=padding_side)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[4:]})
    return tok


# ------------------------------------------------------------------ processor
def _pixels(image: Image.Image, size: int, mean: float = 0.5, std: float = 0.5) -> np.ndarray:
    """RGB image -> (3, size, size) float32: bilinear resize, /255, (x - mean) / std."""
    image = image.convert("RGB").resize((size, size), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return ((array - mean) / std).transpose(2, 0, 1)


def _qwen_patches(pixels: np.ndarray) -> np.ndarray:
    """(3, H, W) -> (grid_h*grid_w, 3*TEMPORAL*PATCH*PATCH) in Qwen-VL's merge-window order."""
    frames = np.repeat(pixels[None], TEMPORAL, axis=0)  # a still image fills the time patch
    gh, gw = pixels.shape[1] // PATCH, pixels.shape[2] // PATCH
    x = frames.reshape(1, TEMPORAL, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # windows, then patches, then C, T, ph, pw
    return x.reshape(gh * gw, 3 * TEMPORAL * PATCH * PATCH)


class TinyProcessor:
    """Processor-like callable for the tiny models; `kind` is "text", "paligemma" or "qwen"."""

    def __init__(self, kind: str, padding_side: str = "right", image_size: int = IMAGE):
        self.kind = kind
        self.tokenizer = tokenizer(padding_side)
        self.image_size = image_size
        self.image_token_id = IMAGE_TOKEN if kind != "text" else None
        self.prompt_template = {
            "text": "<bos>{task}",
            "paligemma": "<image>*n<bos>{task}\\n",
            "qwen": "<|im_start|><|vision_start|><image>*n<|vision_end|>{task}<|im_end|>",
        }[kind]

    @property
    def n_image_tokens(self) -> int:
        patches = (self.image_size // PATCH) ** 2
        return patches // MERGE ** 2 if self.kind == "qwen" else patches

    def _row(self, task: str) -> tuple[list[int], list[int]]:
        """Token ids of one prompt and its multimodal type (1 = image token)."""
        text = self.tokenizer.encode(task, add_special_tokens=False)
        n = self.n_image_tokens
        if self.kind == "text":
            return [BOS] + text, [0] * (len(text) + 1)
        if self.kind == "paligemma":
            newline = self.tokenizer.convert_tokens_to_ids("\n")
            ids = [IMAGE_TOKEN] * n + [BOS] + text + [newline]
            return ids, [1] * n + [0] * (len(ids) - n)
        ids = [IM_START, VISION_START] + [IMAGE_TOKEN] * n + [VISION_END] + text + [IM_END]
        return ids, [0, 0] + [1] * n + [0] * (len(ids) - n - 2)

    def __call__(self, images=None, text=None, padding=True, return_tensors="pt", **_):
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self._row(t) for t in texts]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long)
        left = self.tokenizer.padding_side == "left"
        for i, (row, kinds) in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span], mask[i, span], types[i, span] = torch.tensor(row), 1, torch.tensor(kinds)
        out = {"input_ids": ids, "attention_mask": mask}
        if self.kind == "text":
            return out
        if images is None or len(images) != len(texts):
            raise HarnessError(f"{self.kind} prompts need one image each, got "
                               f"{0 if images is None else len(images)} for {len(texts)}")
        pixels = [_pixels(im, self.image_size) for im in images]
        if self.kind == "paligemma":
            out["pixel_values"] = torch.from_numpy(np.stack(pixels))
            out["token_type_ids"] = torch.zeros_like(ids)  # 0 = prefix: bidirectional in 5.x
        else:
            out["pixel_values"] = torch.from_numpy(np.concatenate([_qwen_patches(p) for p in pixels]))
            side = self.image_size // PATCH
            out["image_grid_thw"] = torch.tensor([[1, side, side]] * len(texts))
            if transformers_major() >= 5:  # 5.x reads 3-D positions from these
                out["mm_token_type_ids"] = types
        return out


# ------------------------------------------------------------------ configs
def _text_kwargs() -> dict:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128,
                num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                head_dim=HEAD_DIM, max_position_embeddings=512, pad_token_id=PAD,
                bos_token_id=BOS, eos_token_id=EOS)


def _siglip() -> dict:
    from transformers import SiglipVisionConfig
    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=IMAGE, patch_size=PATCH).to_dict()


def _mrope(section: list[int], **extra) -> dict:
    """Rope settings under both names: `rope_scaling` (4.x) and `rope_parameters` (5.x)."""
    if transformers_major() >= 5:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                    "mrope_section": section, **extra}}
    return {"rope_scaling": {"type": "default", "rope_type": "default",
                             "mrope_section": section, **extra}}


def _config(family: str):
    import transformers
    cfg_cls = getattr(transformers, _CLASSES[family][0])
    text = _text_kwargs()
    gemma_text = dict(text, hidden_activation="gelu_pytorch_tanh")
    if family in ("gemma", "gemma2"):
        return cfg_cls(**gemma_text)
    if family in ("paligemma", "paligemma2"):
        text_cls = transformers.Gemma2Config if family == "paligemma2" else transformers.GemmaConfig
        return cfg_cls(vision_config=_siglip(), text_config=text_cls(**gemma_text).to_dict(),
                       image_token_index=IMAGE_TOKEN, projection_dim=HIDDEN, hidden_size=HIDDEN,
                       vocab_size=VOCAB, pad_token_id=PAD)
    ids = dict(image_token_id=IMAGE_TOKEN, video_token_id=UNK, vision_start_token_id=VISION_START,
               vision_end_token_id=VISION_END)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, out_hidden_size=HIDDEN,
                  in_channels=3)
    section = [2, 3, 3]  # sums to head_dim / 2
    if family == "qwen2_5_vl":
        vision.update(window_size=2 * PATCH * MERGE, fullatt_block_indexes=[0])
        text.update(_mrope(section))
        if "text_config" in getattr(cfg_cls, "sub_configs", {}):
            return cfg_cls(text_config=text, vision_config=vision, **ids)
        return cfg_cls(vision_config=vision, **text, **ids)  # 4.49-4.51: flat text keys
    vision.update(num_position_embeddings=(IMAGE // PATCH) ** 2, deepstack_visual_indexes=[0])
    text.update(_mrope(section, mrope_interleaved=True))
    return cfg_cls(text_config=text, vision_config=vision, **ids)


def _set_attn(model, attn: str) -> None:
    """Pin the attention implementation on every (sub-)config, across releases."""
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            try:
                cfg._attn_implementation = attn
            except Exception:  # some releases make it read-only once set
                pass


def build(family: str, seed: int = SEED, padding_side: str = "right", attn: str = "eager",
          image_size: int = IMAGE):
    """(model, processor) for a tiny `family` model; same seed -> same weights."""
    if family not in FAMILIES:
        raise HarnessError(f"unknown tiny family {family!r}; choose from {', '.join(FAMILIES)}")
    reason = unavailable(family)
    if reason:
        raise HarnessError(f"tiny:{family}: {reason}")
    import transformers
    config = _config(family)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = getattr(transformers, _CLASSES[family][1])(config)
    _set_attn(model, attn)
    kind = "text" if family in ("gemma", "gemma2") else (
        "paligemma" if family.startswith("paligemma") else "qwen")
    return model.float().eval(), TinyProcessor(kind, padding_side, image_size)


def tiny_gemma(**kw):
    return build("gemma", **kw)


def tiny_gemma2(**kw):
    return build("gemma2", **kw)


def tiny_paligemma(**kw):
    return build("paligemma", **kw)


def tiny_paligemma2(**kw):
    return build("paligemma2", **kw)


def tiny_qwen2_5_vl(**kw):
    return build("qwen2_5_vl", **kw)


def tiny_qwen3_vl(**kw):
    return build("qwen3_vl", **kw)
