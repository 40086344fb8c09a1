"""StarVLA (Qwen2.5-VL / Qwen3-VL backbones) and plain HF Qwen-VL: `hidden_states[-1]`
masked mean, fed the way StarVLA feeds its VLM at inference.

What differs from a generic HF VLM (docs/facts.md §3): the CoT grounding prompt through the chat
template, images resized to 224x224 first (256x256 would change the number of image
tokens), left padding, and in transformers 5 the `mm_token_type_ids` without which
Qwen2.5-VL silently drops to 1-D positions (Qwen3-VL raises). A StarVLA framework
checkpoint keeps float32 weights and runs under bf16 autocast, as StarVLA's own
`qwen_vl_interface` does. Everything else is the engine's `HfVlmExtractor`.
"""
from __future__ import annotations

import os

import torch

from harness.errors import HarnessError
from harness.extractors import tiny
from harness.extractors.compat import transformers_major
from harness.extractors.hf_vlm import TINY_PREFIX, HfVlmExtractor
from harness.extractors.registry import Common, FamilySpec, Option

COT_PROMPT = ("Your task is {instruction}. To identify the key objects for your task. "
              "Locate their bounding boxes in [x1,y1,x2,y2] format.")
IMAGE_SIZE = 224
QWEN_TYPES = ("qwen2_5_vl", "qwen3_vl", "qwen2_vl")


def is_starvla_checkpoint(ckpt: str) -> bool:
    """StarVLA saves `<run>/checkpoints/steps_N_pytorch_model.pt` (a framework state
    dict); plain HF Qwen-VL checkpoints are directories or hub ids with a config.json."""
    return os.path.isfile(ckpt) and ckpt.endswith((".pt", ".pth", ".safetensors"))


def load_starvla(ckpt: str):
    """(qwen model, processor, CoT prompt or None) via StarVLA's own loader."""
    try:
        from starVLA.model.framework.base_framework import baseframework
    except ImportError as err:
        raise HarnessError(f"{ckpt}: a StarVLA checkpoint needs the starVLA package importable "
                           f"(pip install -e <starVLA repo>; it pins transformers 4.57.0): {err}") from None
    framework = baseframework.from_pretrained(ckpt)
    interface = framework.qwen_vl_interface
    cot = None
    try:
        vla_data = framework.config.datasets.vla_data
        cot = vla_data.get("CoT_prompt", None) if "CoT_prompt" in vla_data else None
    except AttributeError:
        pass
    return interface.model, interface.processor, cot


class StarVLAExtractor(HfVlmExtractor):
    """`HfVlmExtractor` with StarVLA's prompt, image size and padding side."""

    family = "starvla"

    def __init__(self, ckpt: str, *, device: str = "cpu", dtype: str = "bfloat16",
                 layers="last", cot_prompt: str | None = COT_PROMPT, image_size: int = IMAGE_SIZE,
                 attn_implementation: str = "eager", revision: str | None = None,
                 autocast: bool | None = None, model=None, processor=None):
        self.cot_prompt = cot_prompt
        self.autocast = autocast  # None: only for the starVLA framework, as it runs itself
        self.autocast_dtype: torch.dtype | None = None
        template = cot_prompt.replace("{instruction}", "{task}") if cot_prompt else "{task}"
        super().__init__(ckpt, layers=layers, device=device, dtype=dtype,
                         attn_implementation=attn_implementation, padding_side="left",
                         prompt_template=template, chat_template=True, image_size=image_size,
                         revision=revision, model=model, processor=processor)
        self.family = "starvla"
        self.source = "given" if model is not None else None

    def load(self) -> "StarVLAExtractor":
        ckpt = self.model_id
        if self.model is None and ckpt.startswith(TINY_PREFIX):
            self.model, self.processor = tiny.build(ckpt[len(TINY_PREFIX):], padding_side="left",
                                                    attn=self.attn)
            self.source = "tiny stand-in"
        elif self.model is None and is_starvla_checkpoint(ckpt):
            self.model, self.processor, cot = load_starvla(ckpt)
            if cot and self.cot_prompt == COT_PROMPT and cot != COT_PROMPT:
                self.cot_prompt = cot  # the checkpoint's own training prompt wins
                self.prompt_template = cot.replace("{instruction}", "{task}")
            self.source = "starVLA framework"
        elif self.model is None:
            self.source = "transformers"
        if self.autocast is None:
            self.autocast = self.source == "starVLA framework"
        if self.autocast:  # StarVLA keeps float32 weights and runs under bf16 autocast
            self.autocast_dtype, self.dtype = self.dtype, torch.float32
        super().load()
        model_type = getattr(self.model.config, "model_type", None)
        if model_type not in QWEN_TYPES:
            raise HarnessError(f"{ckpt}: expected a Qwen-VL model, got model_type {model_type!r}")
        # The tiny processor writes its own chat-like prompt; real ones render the template.
        self.chat_template = hasattr(self.processor, "apply_chat_template")
        return self

    def forward(self, inputs: dict):
        if not self.autocast:
            return super().forward(inputs)
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
            return super().forward(inputs)

    def build_inputs(self, samples) -> dict:
        inputs = super().build_inputs(samples)
        if transformers_major() >= 5 and "mm_token_type_ids" not in inputs:
            image = inputs["input_ids"] == self.image_token_id
            inputs["mm_token_type_ids"] = image.long()  # 1 = image token, 0 = text
        return inputs

    def describe(self) -> dict:
        out = super().describe()
        out.update(source=self.source, cot_prompt=self.cot_prompt,
                   prompt_template=self.prompt_template,
                   processor_template=getattr(self.processor, "prompt_template", None)
                   or ("chat template" if self.chat_template else None),
                   image_resize=f"{self.image_size}x{self.image_size} before the processor",
                   autocast=str(self.autocast_dtype).replace("torch.", "") if self.autocast else None)
        return out


def _build(common: Common, opts: dict, stack) -> StarVLAExtractor:
    return StarVLAExtractor(
        SPEC.stand_in if common.ckpt == "tiny" else common.ckpt, device=common.device,
        dtype=common.dtype, layers=common.layers, cot_prompt=opts["cot_prompt"] or COT_PROMPT,
        image_size=opts["image_size"], revision=common.revision)


SPEC = FamilySpec(
    name="starvla",
    help="StarVLA / HF Qwen-VL: CoT prompt, 224x224, left padding",
    build=_build,
    stand_in="tiny:qwen2_5_vl",
    stand_in_help="'tiny' / 'tiny:qwen2_5_vl' or 'tiny:qwen3_vl'",
    options=(
        Option("cot_prompt", str, None,
               "prompt with {instruction} (default: StarVLA's grounding CoT prompt)"),
        Option("image_size", int, IMAGE_SIZE, "images are resized to this square first"),
    ),
    final_norm_paths={"qwen2_5_vl": ("model.language_model.norm",   # 4.52+ and 5.x
                                     "model.norm"),                  # 4.49-4.51
                      "qwen3_vl": ("model.language_model.norm",)},
    demo=(("starvla-qwen2.5-vl-tiny", "tiny:qwen2_5_vl", {"split_modalities": True, "layers": "all"}),
          ("starvla-qwen3-vl-tiny", "tiny:qwen3_vl", {"split_modalities": True, "layers": "all"})),
)
