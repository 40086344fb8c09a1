"""StarVLA (Qwen2.5-VL / Qwen3-VL backbones) and plain HF Qwen-VL: `hidden_states[-1]`
masked mean, fed the way StarVLA feeds its VLM (docs/facts.md §3; upstream
`starVLA/model/modules/vlm/QWen2_5.py`, `QWen3.py`, `framework/QwenGR00T.py`).

What StarVLA does, and so what this extractor does:
- prompt: the checkpoint's `datasets.vla_data.CoT_prompt` with `{instruction}` replaced
  (`str.replace`, as `build_qwenvl_inputs` does); without that key the raw instruction;
  rendered through the chat template (image first, then text), left padding;
- weights: the dtype StarVLA's loader leaves them in (bf16: `torch_dtype="auto"` /
  `dtype=torch.bfloat16`, no later cast), under `torch.autocast("cuda", bf16)` as
  `predict_action` and the seed run them (on CPU that autocast is a no-op, so none here);
- attention: whatever the loader built (framework checkpoints), `sdpa` for hub ids
  (upstream's default since 2026-03; the seed era used flash_attention_2, a flag away);
- images: resized first to the checkpoint config's `datasets.vla_data.image_size` when it
  is set, as `predict_action` does, not at all when it is unset (hub ids, stand-ins), or to
  `--image_size`; or, with
  `--seed_compat`, exactly the seed's path: the PNG through qwen_vl_utils' resize to a
  multiple of 28 (256 px -> 252 px, 81 image tokens on Qwen2.5-VL; Qwen3-VL: no resize
  before its processor, 64 tokens).
In transformers 5 the `mm_token_type_ids` are added (without them Qwen2.5-VL silently
drops to 1-D positions, Qwen3-VL raises). Everything else is `HfVlmExtractor`. What ran
(weights dtype, attention, autocast, image size, image tokens, padding side) is recorded
from the modules and inputs.
"""
from __future__ import annotations

import math
import os

import torch
from PIL import Image

from harness.errors import HarnessError
from harness.extractors import tiny
from harness.extractors.engine.compat import transformers_major
from harness.extractors.hf_vlm import TINY_PREFIX, HfVlmExtractor
from harness.extractors.engine.registry import Common, FamilySpec, Option

IMAGE_SIZE = 224  # what the Bridge checkpoints' configs set (docs/facts.md)
QWEN_TYPES = ("qwen2_5_vl", "qwen3_vl", "qwen2_vl")
RAW_INSTRUCTION = "{instruction}"
AUTOCAST = ("auto", "bfloat16", "off")
# qwen_vl_utils.fetch_image (Qwen2.5-VL): patch 14 x merge 2, pixel bounds of its defaults.
SEED_FACTOR, SEED_MIN_PIXELS, SEED_MAX_PIXELS = 28, 4 * 28 * 28, 16384 * 28 * 28


def is_starvla_checkpoint(ckpt: str) -> bool:
    """StarVLA saves `<run>/checkpoints/steps_N_pytorch_model.pt` (a framework state
    dict); plain HF Qwen-VL checkpoints are directories or hub ids with a config.json."""
    return os.path.isfile(ckpt) and ckpt.endswith((".pt", ".pth", ".safetensors"))


def load_starvla(ckpt: str):
    """(qwen model, processor, the config's `datasets.vla_data` or None) via StarVLA's own
    loader, untouched."""
    try:
        from starVLA.model.framework.base_framework import baseframework
    except ImportError as err:
        raise HarnessError(f"{ckpt}: a StarVLA checkpoint needs the starVLA package importable "
                           f"(pip install -e <starVLA repo>; it pins transformers 4.57.0): {err}") from None
    framework = baseframework.from_pretrained(ckpt)
    interface = framework.qwen_vl_interface
    vla_data = config_section(getattr(framework, "config", None), "datasets", "vla_data")
    return interface.model, interface.processor, vla_data


def config_section(config, *keys):
    """`config.k1.k2...` of a mapping-like (OmegaConf) config, or None where a key is
    absent; an error while reading is not hidden."""
    node = config
    for key in keys:
        if node is None:
            return None
        if hasattr(node, "keys") and callable(node.keys):
            node = node[key] if key in node else None
        else:
            node = getattr(node, key) if key in vars(node) else None
    return node


def square_or_pair(size):
    """A config's image size (int or [w, h]) as an int for a square, else a (w, h) tuple."""
    if size is None or isinstance(size, int):
        return size
    pair = tuple(int(v) for v in size)
    if len(pair) != 2:
        raise HarnessError(f"datasets.vla_data.image_size {size!r}: expected an int or [w, h]")
    return pair[0] if pair[0] == pair[1] else pair


def seed_resize_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) qwen_vl_utils' `smart_resize` gives (round to a multiple of 28,
    kept within its pixel bounds): what the seed's Qwen2.5-VL images were resized to."""
    f = SEED_FACTOR
    h_bar, w_bar = max(f, round(height / f) * f), max(f, round(width / f) * f)
    if h_bar * w_bar > SEED_MAX_PIXELS:
        beta = math.sqrt(height * width / SEED_MAX_PIXELS)
        h_bar, w_bar = math.floor(height / beta / f) * f, math.floor(width / beta / f) * f
    elif h_bar * w_bar < SEED_MIN_PIXELS:
        beta = math.sqrt(SEED_MIN_PIXELS / (height * width))
        h_bar, w_bar = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return w_bar, h_bar


def seed_image(image: Image.Image, model_type: str | None) -> Image.Image:
    """The image the seed's `build_qwenvl_inputs` call handed the HF processor."""
    image = image.convert("RGB")
    if model_type == "qwen3_vl":  # QWen3.py: apply_chat_template only, no qwen_vl_utils
        return image
    size = seed_resize_size(*image.size)
    return image if size == image.size else image.resize(size)  # PIL default: bicubic


class StarVLAExtractor(HfVlmExtractor):
    """`HfVlmExtractor` with StarVLA's prompt, image path, padding side, dtype and autocast."""

    family = "starvla"

    def __init__(self, ckpt: str, *, device: str = "cpu", dtype: str | None = None,
                 layers="last", cot_prompt: str | None = None, image_size: int | None = None,
                 attn_implementation: str | None = None, revision: str | None = None,
                 autocast: str = "auto", seed_compat: bool = False, model=None, processor=None):
        if autocast not in AUTOCAST:
            raise HarnessError(f"autocast must be one of {AUTOCAST}, got {autocast!r}")
        self.cot_prompt = cot_prompt
        self.prompt_source = "--cot_prompt" if cot_prompt is not None else None
        self.autocast_request, self.autocast = autocast, "off"
        self.seed_compat = seed_compat
        self.image_size_source = "--image_size" if image_size is not None else \
            "none: no datasets.vla_data.image_size to follow"
        super().__init__(ckpt, layers=layers, device=device, dtype=dtype,
                         attn_implementation=attn_implementation or "eager",
                         padding_side="left", chat_template=True,
                         image_size=None if seed_compat else image_size,
                         revision=revision, model=model, processor=processor)
        self.attn_request = attn_implementation
        self.family = "starvla"
        self.source = "given" if model is not None else None

    def load(self) -> "StarVLAExtractor":
        ckpt = self.model_id
        if self.model is None and ckpt.startswith(TINY_PREFIX):
            self.model, self.processor = tiny.build(ckpt[len(TINY_PREFIX):], padding_side="left",
                                                    attn=self.attn)
            self.source = "tiny stand-in"
        elif self.model is None and is_starvla_checkpoint(ckpt):
            if self.attn_request is not None:
                raise HarnessError(f"{ckpt}: --attn_implementation is StarVLA's loader's choice "
                                   "for a framework checkpoint (set it in its config.yaml)")
            self.model, self.processor, vla_data = load_starvla(ckpt)
            self.source = "starVLA framework"
            self._follow_config(vla_data)
        elif self.model is None:
            self.attn = self.attn_request or "sdpa"  # upstream StarVLA's default
            self.source = "transformers"
        self._check_prompt()
        self.autocast = self._resolve_autocast()
        super().load()
        model_type = getattr(self.model.config, "model_type", None)
        if model_type not in QWEN_TYPES:
            raise HarnessError(f"{ckpt}: expected a Qwen-VL model, got model_type {model_type!r}")
        # The tiny processor writes its own chat-like prompt; real ones render the template.
        self.chat_template = hasattr(self.processor, "apply_chat_template")
        return self

    def _follow_config(self, vla_data) -> None:
        """Prompt and image size from the checkpoint's `datasets.vla_data`, as StarVLA
        reads them, unless given; says where each came from."""
        where = "checkpoint config datasets.vla_data"
        if vla_data is None:
            why = "none: the checkpoint config has no datasets.vla_data"
            self.prompt_source = self.prompt_source or why + " (raw instruction)"
            self.image_size_source = "--image_size" if self.image_size else why
            return
        if self.cot_prompt is None:
            cot = config_section(vla_data, "CoT_prompt")
            if cot is not None:
                self.cot_prompt, self.prompt_source = cot, f"{where}.CoT_prompt"
            else:
                self.prompt_source = f"none: {where} has no CoT_prompt (raw instruction)"
        if self.image_size is None and not self.seed_compat:
            size = square_or_pair(config_section(vla_data, "image_size"))
            self.image_size = size
            self.image_size_source = f"{where}.image_size" if size else \
                f"none: {where} has no image_size (no resize, as predict_action)"

    def prepare_images(self, images: list) -> list:
        if isinstance(self.image_size, tuple):  # a non-square config size, (w, h)
            return [im.convert("RGB").resize(self.image_size) for im in images]
        if not self.seed_compat:
            return super().prepare_images(images)
        model_type = getattr(self.model.config, "model_type", None)
        return [seed_image(im, model_type) for im in images]

    def _check_prompt(self) -> None:
        if self.cot_prompt is None:
            self.prompt_source = self.prompt_source or \
                "none: the raw instruction (no checkpoint config read)"
        elif "{instruction}" not in self.cot_prompt:
            raise HarnessError(f"CoT_prompt {self.cot_prompt!r} ({self.prompt_source}) has no "
                               "{instruction}: StarVLA would drop the task from the prompt")

    def _resolve_autocast(self) -> str:
        """StarVLA wraps its VLM in `torch.autocast("cuda", bf16)`: active on CUDA only."""
        if self.autocast_request == "auto":
            on = self.source == "starVLA framework" and torch.device(self.device).type == "cuda"
            return "bfloat16" if on else "off"
        return self.autocast_request

    # -- inputs and forward -----------------------------------------------------
    def fill_prompt(self, task: str) -> str:
        """StarVLA's `build_qwenvl_inputs`: `CoT_prompt.replace("{instruction}", task)`."""
        return (self.cot_prompt or RAW_INSTRUCTION).replace("{instruction}", task)

    def forward(self, inputs: dict):
        if self.autocast == "off":
            self.observed.note("autocast", "off")
            return super().forward(inputs)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
            active = torch.is_autocast_enabled(self.device.type)
            self.observed.note("autocast", str(torch.get_autocast_dtype(self.device.type))
                               .removeprefix("torch.") if active else "off")
            return super().forward(inputs)

    def build_inputs(self, samples) -> dict:
        inputs = super().build_inputs(samples)
        if transformers_major() >= 5 and "mm_token_type_ids" not in inputs:
            image = inputs["input_ids"] == self.image_token_id
            inputs["mm_token_type_ids"] = image.long()  # 1 = image token, 0 = text
        return inputs

    def describe(self) -> dict:
        out = super().describe()
        model_type = getattr(self.model.config, "model_type", None)
        if self.seed_compat:
            resize = ("none before the processor (the seed's Qwen3-VL path)"
                      if model_type == "qwen3_vl" else
                      "qwen_vl_utils smart_resize to multiples of 28, PIL bicubic (the seed's path)")
        elif self.image_size:
            w, h = self.image_size if isinstance(self.image_size, tuple) else (self.image_size,) * 2
            resize = f"{w}x{h} PIL bicubic (predict_action)"
        else:
            resize = "none before the processor"
        out.update(source=self.source, cot_prompt=self.cot_prompt,
                   prompt_template=self.cot_prompt or RAW_INSTRUCTION,
                   prompt_source=self.prompt_source, seed_compat=self.seed_compat,
                   processor_template=getattr(self.processor, "prompt_template", None)
                   or ("chat template" if self.chat_template else None),
                   image_resize=resize, image_size_source=None if self.seed_compat
                   else self.image_size_source, autocast=self.autocast,
                   image_size=list(self.image_size) if isinstance(self.image_size, tuple)
                   else self.image_size,  # None: no resize of ours (see image_resize)
                   processor_image_size=HfVlmExtractor._image_size_fed(self) if self.seed_compat
                   else None)
        return out


def _build(common: Common, opts: dict, stack) -> StarVLAExtractor:
    return StarVLAExtractor(
        SPEC.stand_in if common.ckpt == "tiny" else common.ckpt, device=common.device,
        dtype=common.dtype, layers=common.layers, cot_prompt=opts["cot_prompt"],
        image_size=opts["image_size"], revision=common.revision,
        attn_implementation=opts["attn_implementation"], autocast=opts["autocast"],
        seed_compat=opts["seed_compat"])


SPEC = FamilySpec(
    name="starvla",
    help="StarVLA / HF Qwen-VL: the checkpoint config's CoT prompt and image size, left padding",
    build=_build,
    stand_in="tiny:qwen2_5_vl",
    stand_in_help="'tiny' / 'tiny:qwen2_5_vl' or 'tiny:qwen3_vl'",
    auto_dtype=None,
    options=(
        Option("cot_prompt", str, None,
               "prompt with {instruction} (default: the checkpoint's CoT_prompt, else the "
               "raw instruction, as StarVLA does)"),
        Option("image_size", int, None, "resize images to this square first (default: the "
               "checkpoint config's datasets.vla_data.image_size, as predict_action; no resize "
               "when unset; ignored with --seed_compat)"),
        Option("seed_compat", bool, False, "the seed script's image path: no 224 resize, "
               "qwen_vl_utils' resize (256 px -> 252 px, 81 tokens on Qwen2.5-VL)"),
        Option("attn_implementation", str, None, "default: as StarVLA's loader built it "
               "(framework checkpoints), sdpa (hub ids), eager (stand-ins)"),
        Option("autocast", str, "auto", "auto: bf16 autocast on CUDA for framework "
               "checkpoints, as StarVLA runs them", choices=AUTOCAST),
    ),
    final_norm_paths={"qwen2_5_vl": ("model.language_model.norm",   # 4.52+ and 5.x
                                     "model.norm"),                  # 4.49-4.51
                      "qwen3_vl": ("model.language_model.norm",)},
    demo=(("starvla-qwen2.5-vl-tiny", "tiny:qwen2_5_vl", {"split_modalities": True, "layers": "all"}),
          ("starvla-qwen3-vl-tiny", "tiny:qwen3_vl", {"split_modalities": True, "layers": "all"})),
)
