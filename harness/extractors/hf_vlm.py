"""Any transformers VLM or LM: `hidden_states` layers, masked-mean pooling mask.

The final layer (`hidden_states[-1]`, the final-norm output in every family we use,
docs/facts.md §4) by default; or any list of `hidden_states` indices; or all of them in one
forward (a layer sweep). Names of the form `tiny:<family>` load the seeded random-weight
stand-ins of `harness.extractors.tiny`, so the whole pipeline runs without a hub.

Batch invariance: position ids are derived from the attention mask for 1-D-rope models
(left padding would otherwise shift every position); Qwen-VL models derive their 3-D
positions from the mask themselves, so nothing is passed for them.
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch

from harness.errors import HarnessError
from harness.extractors.engine.base import FINAL, Extractor, HiddenStates, Sample, to_device
from harness.extractors.engine.compat import attention_in_use, dtype_kwarg
from harness.extractors.engine.observed import Observed, note_token_inputs
from harness.extractors.engine.registry import Common, FamilySpec, Option, parse_layers
from harness.extractors.engine.pooling import TOKENS, token_mask
from harness.extractors.engine.residual_stream import layer_indices

TINY_PREFIX = "tiny:"


def _layer_spec(layers) -> str | list[int]:
    """'last' | 'all' | [int, ...]: parsed by the registry's one parser."""
    return FINAL if layers is None else parse_layers(layers)


class HfVlmExtractor(Extractor):
    """Features from `hidden_states` of a transformers model (or a `tiny:` stand-in)."""

    def __init__(self, model_id: str, *, layers="last", tokens: str = "all",
                 device: str = "cpu", dtype: str | torch.dtype = "float32",
                 attn_implementation: str = "eager", padding_side: str | None = None,
                 prompt_template: str = "{task}", chat_template: bool = False,
                 image_size: int | None = None, revision: str | None = None,
                 positions: str = "mask", seed: int = 0, model=None, processor=None):
        if tokens not in TOKENS:
            raise HarnessError(f"tokens must be one of {TOKENS}, got {tokens!r}")
        if positions not in ("mask", "model"):
            raise HarnessError(f"positions must be 'mask' or 'model', got {positions!r}")
        if "{task}" not in prompt_template:
            raise HarnessError(f"prompt template {prompt_template!r} has no {{task}} field")
        self.model_id, self.revision, self.seed = model_id, revision, seed
        self.layer_spec = _layer_spec(layers)
        self.tokens, self.positions = tokens, positions
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.attn, self.padding_side = attn_implementation, padding_side
        self.prompt_template, self.chat_template = prompt_template, chat_template
        self.image_size = image_size
        self.model, self.processor = model, processor
        self.family = model_id[len(TINY_PREFIX):] if model_id.startswith(TINY_PREFIX) else "hf"
        self.hidden_dim: int | None = None
        self._position_offset: int | None = None
        self.observed = Observed()

    # ------------------------------------------------------------ protocol
    def load(self) -> "HfVlmExtractor":
        if self.model is None and self.model_id.startswith(TINY_PREFIX):
            from harness.extractors import tiny
            self.model, self.processor = tiny.build(
                self.family, seed=self.seed, padding_side=self.padding_side or "right",
                attn=self.attn)
        elif self.model is None:
            self.model, self.processor = self._from_pretrained()
        self._place_model()
        self._position_offset = self._positions_policy()
        return self

    def _place_model(self) -> None:
        """Padding side, dtype, device and eval mode of a loaded model; its hidden size."""
        tok = self.tokenizer
        if self.padding_side is not None and tok is not None:
            tok.padding_side = self.padding_side
        if self.dtype is None:  # keep the dtype the loader gave (e.g. StarVLA's own)
            self.dtype = next(self.model.parameters()).dtype
        # Cast only a model not already in self.dtype: `.to(dtype)` also casts float
        # buffers, and rotary `inv_freq` (kept float32 by from_pretrained) would turn bf16.
        if next(self.model.parameters()).dtype != self.dtype:
            self.model.to(dtype=self.dtype)
        self.model.to(self.device).eval()
        cfg = self.model.config
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.hidden_dim = getattr(text, "hidden_size", None)

    def build_inputs(self, samples: Sequence[Sample]) -> dict:
        texts = [self._prompt(task) for _, _, task in samples]
        kwargs = dict(text=texts, padding=True, return_tensors="pt")
        if self._takes_images():
            kwargs["images"] = self.prepare_images([im for _, im, _ in samples])
            self.observed.note("image_size_fed", *(f"{w}x{h}" for w, h in
                                                   (im.size for im in kwargs["images"])))
        batch = dict(self.processor(**kwargs))
        if self._position_offset is not None:
            mask = batch["attention_mask"].long()
            batch["position_ids"] = (mask.cumsum(-1) - 1 + self._position_offset).clamp(min=0)
        return {k: to_device(v, self.device, self.dtype) for k, v in batch.items()}

    @torch.inference_mode()
    def forward(self, inputs: dict) -> HiddenStates:
        out = self.model(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)
        states = out.hidden_states
        layers = {FINAL: states[-1]}
        for i in self.layer_indices(len(states)):
            layers[str(i)] = states[i]
        mask = token_mask(inputs["attention_mask"], inputs.get("input_ids"),
                          self.image_token_id, self.tokens)
        note_forward(self.observed, inputs, states[-1], self.image_token_id)
        return HiddenStates(layers=layers, mask=mask)

    def modality_masks(self, inputs: dict, tasks, hidden: HiddenStates):
        """Image-token and task-token masks of a batch (`harness.extractors.engine.modality`)."""
        from harness.extractors.engine.modality import hf_masks
        return hf_masks(inputs, tasks, self.tokenizer, self.image_token_id)

    def attention_implementation(self) -> str | None:
        return attention_in_use(self.model)

    def describe(self) -> dict:
        cfg = self.model.config
        return {
            "model": self.model_id, "revision": self.revision,
            "seed": self.seed if self.model_id.startswith(TINY_PREFIX) else None,
            "class": type(self.model).__name__, "model_type": getattr(cfg, "model_type", None),
            "extraction_point": "hidden_states[-1] (post final norm)",
            "layers": self.layer_spec, "hidden_size": self.hidden_dim,
            "pooling_tokens": self.tokens, "dtype": weights_dtype(self.model),
            "padding_side": getattr(self.tokenizer, "padding_side", None),
            "position_ids": "model default" if self._position_offset is None
            else f"cumsum(attention_mask) - 1 + {self._position_offset}",
            "prompt_template": getattr(self.processor, "prompt_template", None) or self.prompt_template,
            "chat_template": self.chat_template, "image_size": self._image_size_fed(),
            "use_cache": False,
        }

    # ------------------------------------------------------------ helpers
    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def image_token_id(self) -> int | None:
        for source in (self.processor, self.model.config):
            for name in ("image_token_id", "image_token_index"):
                value = getattr(source, name, None)
                if isinstance(value, int):
                    return value
        return None

    def layer_indices(self, n_states: int) -> list[int]:
        """Non-negative `hidden_states` indices to return besides the final layer."""
        return layer_indices(self.layer_spec, n_states)

    def prepare_images(self, images: list) -> list:
        """RGB images as handed to the processor: resized to `image_size` if one is set."""
        images = [im.convert("RGB") for im in images]
        if self.image_size:
            images = [im.resize((self.image_size, self.image_size)) for im in images]
        return images

    def fill_prompt(self, task: str) -> str:
        """The text prompt of one task (before any chat template)."""
        return self.prompt_template.format(task=task)

    def _prompt(self, task: str) -> str:
        prompt = self.fill_prompt(task)
        if not self.chat_template:
            return prompt
        content = ([{"type": "image"}] if self._takes_images() else []) + [{"type": "text", "text": prompt}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def _image_size_fed(self):
        """What the model sees: our resize if any, else the processor's own size setting."""
        if self.image_size or not self._takes_images():
            return self.image_size
        size = getattr(self.processor, "image_size", None)
        image_processor = getattr(self.processor, "image_processor", None)
        return size or getattr(image_processor, "size", None)

    def _takes_images(self) -> bool:
        return getattr(self.processor, "image_processor", None) is not None or \
            getattr(self.processor, "kind", "text") != "text"

    def _positions_policy(self) -> int | None:
        """Offset of mask-derived position ids, or None to leave positions to the model."""
        if self.positions == "model":
            return None
        if "position_ids" not in inspect.signature(self.model.forward).parameters:
            return None
        if hasattr(self.model.config, "vision_start_token_id"):  # Qwen-VL: 3-D rope from mask
            return None
        return 1 if getattr(self.model.config, "model_type", "") == "paligemma" else 0


    def _from_pretrained(self):
        import transformers
        common = dict(revision=self.revision)
        try:
            processor = transformers.AutoProcessor.from_pretrained(self.model_id, **common)
        except Exception as err:
            raise HarnessError(f"{self.model_id}: cannot load a processor ({type(err).__name__}: {err})") from None
        errors = []
        for name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM"):
            auto = getattr(transformers, name, None)
            if auto is None:
                continue
            try:
                model = auto.from_pretrained(self.model_id, attn_implementation=self.attn,
                                             **dtype_kwarg(self.dtype or "auto"), **common)
                return model, processor
            except (ValueError, KeyError, OSError) as err:
                errors.append(f"{name}: {err}")
        raise HarnessError(f"{self.model_id}: no auto class could load it ({'; '.join(errors)[:400]})")


def weights_dtype(model: torch.nn.Module) -> torch.dtype | str:
    """The dtype of the model's floating-point weights, read from them ('a+b' if mixed)."""
    found = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                    if p.is_floating_point()})
    return getattr(torch, found[0]) if len(found) == 1 else "+".join(found)


def note_forward(observed: Observed, inputs: dict, last: torch.Tensor,
                 image_token_id: int | None) -> None:
    """What one forward was fed and gave: image tokens, padding side, pixel size, dtype."""
    note_token_inputs(observed, inputs.get("input_ids"), inputs["attention_mask"], image_token_id)
    pixels = inputs.get("pixel_values")
    if isinstance(pixels, torch.Tensor) and pixels.ndim == 4:
        observed.note("pixel_size", f"{pixels.shape[-1]}x{pixels.shape[-2]}")
    observed.note("hidden_dtype", str(last.dtype).removeprefix("torch."))


def _build(common: Common, opts: dict, stack) -> HfVlmExtractor:
    return HfVlmExtractor(
        SPEC.stand_in if common.ckpt == "tiny" else common.ckpt, layers=common.layers,
        tokens=opts["tokens"], device=common.device, dtype=common.dtype,
        attn_implementation=opts["attn_implementation"], padding_side=opts["padding_side"],
        prompt_template=opts["prompt_template"], chat_template=opts["chat_template"],
        image_size=opts["image_size"], revision=common.revision)


SPEC = FamilySpec(
    name="hf",
    help="any transformers VLM or LM: hidden_states layers",
    build=_build,
    stand_in="tiny:paligemma",
    stand_in_help="'tiny:<gemma|gemma2|paligemma|paligemma2|qwen2_5_vl|qwen3_vl>'",
    options=(
        Option("prompt_template", str, "{task}", "text fed with each image; {task} is replaced"),
        Option("chat_template", bool, False, "render the prompt through the chat template"),
        Option("image_size", int, None, "resize images to this square first"),
        Option("padding_side", str, None, "tokenizer padding side", choices=("left", "right")),
        Option("tokens", str, "all", "tokens the mean pools over", choices=TOKENS),
        Option("attn_implementation", str, "eager", "transformers attention implementation"),
    ),
    final_norm_paths={
        "gemma": ("norm", "model.norm"),                       # bare GemmaModel / ForCausalLM
        "gemma2": ("norm", "model.norm"),
        "paligemma": ("model.language_model.norm",             # 4.52+ and 5.x
                      "language_model.model.norm",             # <= 4.51 (GemmaForCausalLM inside)
                      "language_model.norm"),
        "paligemma2": ("model.language_model.norm", "language_model.model.norm",
                       "language_model.norm"),
        "qwen2_5_vl": ("model.language_model.norm", "model.norm"),
        "qwen3_vl": ("model.language_model.norm",),
    },
    demo=(("paligemma-tiny-layer-sweep", "tiny:paligemma",
           {"layers": "all", "split_modalities": True}),),
)
