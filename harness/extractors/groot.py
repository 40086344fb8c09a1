"""LeRobot GR00T N1.5 (`lerobot.policies.groot`, Eagle 2.5 VLM + a flow-matching action
head): the backbone's features, read at the Eagle language model's final norm.

Traps handled here (docs/facts.md §8):
- `EagleBackbone` cuts the language model to `select_layer` layers and feeds
  `hidden_states[select_layer]` (= the final norm's output after the cut) to
  `eagle_linear`, whose output the action head reads. The hook is on the final norm
  `backbone.eagle_model.language_model.model.norm`; it must equal what `eagle_linear`
  receives in the same forward (checked, else raise). `eagle_linear` itself is left out
  (a projection for the action head, not part of the VLM);
- the backbone never sees the robot state (it goes only to the action head's
  state_encoder): `state_in_input` is always false, and there is no option to change it;
- the prompt is Eagle's chat template over one user turn: the image placeholders, then
  `str([task])` (LeRobot 0.4.4 writes the task as a one-element Python list); each image
  becomes `<image N><img>` + tokens_per_tile x `<IMG_CONTEXT>` + `</img>` (one tile:
  LeRobot asks for min = max = 1 dynamic tiles, no thumbnail); LEFT padding;
- LeRobot's pack step gives a whole batch its FIRST task (`lang = lang[0]`); here each
  sample keeps its own task (recorded);
- images: [0, 1] floats -> uint8 by truncation (`(x.clamp(0, 1) * 255).to(uint8)`, the
  pack step; exact for 8-bit sources in float32), resized bicubic to the tile size when they differ, then (x - 127.5) / 127.5;
- the processor assets (tokenizer, chat template, tile size) live on the hub in LeRobot
  (`lerobot/eagle2hg-processor-groot-n1p5`): here they must be a local directory
  (`--assets`); LeRobot's loader also copies its vendored Eagle code into that directory;
- dtypes: the Eagle model is built by `AutoModel.from_config`, so its weights take the
  dtype the assets' config.json names; `eagle_linear` stays float32; GrootPolicy runs the
  forward under a bfloat16 autocast (`use_bf16`, on by default) with the pixel values cast
  to bfloat16. Both are followed unless `--dtype` is given (then no autocast).
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import numpy as np
import torch

from harness.errors import HarnessError
from harness.extractors.engine.base import Extractor, HiddenStates
from harness.extractors.engine.dtype_policy import DtypePolicy
from harness.extractors.lerobot_state import SPEC_FIELDS, import_lerobot, parameter_dtypes
from harness.extractors.engine.observed import Observed, note_token_inputs
from harness.extractors.pi0_lerobot import resolve_checkpoint
from harness.extractors.engine.registry import Common, FamilySpec, Option
from harness.extractors.engine.hooks import capture
from harness.extractors.engine.residual_stream import capture_residual_stream, layer_indices

DEFAULT_CKPT = "nvidia/GR00T-N1.5-3B"  # GrootConfig.base_model_path in LeRobot 0.4.4
ASSETS_REPO = "lerobot/eagle2hg-processor-groot-n1p5"  # GrootConfig.tokenizer_assets_repo
NORM_PATH = "eagle_model.language_model.model.norm"  # under the backbone
IMAGE_TOKEN = "<IMG_CONTEXT>"
PLACEHOLDER = re.compile(r"<image-(\d+)>")
DTYPE_POLICY = DtypePolicy(
    "the Eagle model in the dtype its config.json names (bf16 in the release; "
    "AutoModel.from_config), eagle_linear float32; forward under a bfloat16 autocast with "
    "bfloat16 pixel values when use_bf16 (GrootPolicy's default)",
    low_modules=("eagle_model",))


def eagle_pixels(image, size: int) -> torch.Tensor:
    """(3, size, size) float32 as LeRobot 0.4.4 + the Eagle image processor make them."""
    x01 = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    pixels = (x01.clamp(0, 1) * 255.0).to(torch.uint8).permute(2, 0, 1)  # the pack step
    if tuple(pixels.shape[1:]) != (size, size):
        resized = torch.nn.functional.interpolate(pixels[None].float(), size=(size, size),
                                                  mode="bicubic", antialias=True,
                                                  align_corners=False)[0]
        pixels = resized.round().clamp(0, 255).to(torch.uint8)
    return (pixels.float() - 127.5) / 127.5


class EagleText:
    """The prompt side of LeRobot's GrootEagleEncodeStep + Eagle25VLProcessor."""

    def __init__(self, tokenizer, chat_template: str, tokens_per_tile: int):
        self.tokenizer, self.chat_template, self.tokens_per_tile = tokenizer, chat_template, tokens_per_tile

    @classmethod
    def from_assets(cls, directory: Path) -> "EagleText":
        from transformers import AutoTokenizer
        try:
            template = json.loads((directory / "chat_template.json").read_text())["chat_template"]
            tiles = int(json.loads((directory / "processor_config.json").read_text())
                        .get("tokens_per_tile", 256))  # Eagle25VLProcessor's default
            tokenizer = AutoTokenizer.from_pretrained(str(directory))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise HarnessError(f"{directory}: not a GR00T processor-assets directory "
                               f"({type(err).__name__}: {err})") from None
        return cls(tokenizer, template, tiles)

    def prompt(self, task: str, n_images: int = 1) -> str:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": str([task])}]
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], chat_template=self.chat_template,
            tokenize=False, add_generation_prompt=True)
        image = IMAGE_TOKEN * self.tokens_per_tile
        return PLACEHOLDER.sub(lambda m: f"<image {m.group(1)}><img>{image}</img>", text)

    def __call__(self, tasks) -> tuple[torch.Tensor, torch.Tensor]:
        self.tokenizer.padding_side = "left"
        out = self.tokenizer([self.prompt(t) for t in tasks], padding=True, return_tensors="pt")
        return out["input_ids"], out["attention_mask"]


def image_size_of(directory: Path) -> int:
    try:
        size = json.loads((directory / "preprocessor_config.json").read_text())["size"]
    except (OSError, ValueError, KeyError) as err:
        raise HarnessError(f"{directory}: no readable preprocessor_config.json size ({err})") from None
    if size.get("height") != size.get("width"):
        raise HarnessError(f"{directory}: non-square tile size {size} is not supported")
    return int(size["height"])


class GrootExtractor(Extractor):
    """GR00T N1.5 backbone extractor; see the module docstring."""

    family = "groot"
    extraction_point = "hook on the cut Eagle language model's final norm (== eagle_linear's input)"
    image_token_rule = "input_ids == <IMG_CONTEXT>"

    def __init__(self, ckpt: str = DEFAULT_CKPT, *, backbone=None, assets: str | None = None,
                 name: str | None = None, device: str = "cpu", dtype: str | None = None,
                 fp32_compute: bool = False, revision: str | None = None, layers="last",
                 assets_label: str | None = None):
        self.ckpt, self.revision, self.name = ckpt, revision, name or ckpt
        self.assets_label = assets_label  # what the record says instead of a temporary path
        self.backbone, self.assets = backbone, Path(assets) if assets else None
        self.device = torch.device(device)
        self.release_mix = dtype == "checkpoint"  # a stand-in put in the release's dtypes
        dtype = None if self.release_mix else dtype
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.use_bf16 = not fp32_compute and self.dtype is None
        self.layer_spec = layers
        self.observed = Observed()
        self.api_source = "given"

    # -- protocol ---------------------------------------------------------------
    def load(self) -> "GrootExtractor":
        if self.assets is None or not self.assets.is_dir():
            raise HarnessError(f"groot: --assets must name a local directory with the Eagle "
                               f"processor files (a copy of {ASSETS_REPO}), got {self.assets}")
        self.text = EagleText.from_assets(self.assets)  # before the model: fail fast
        self.image_size = image_size_of(self.assets)
        if self.backbone is None:
            self.backbone = self._load_lerobot(resolve_checkpoint(self.ckpt, self.revision))
        if self.dtype is not None:
            self.backbone.to(dtype=self.dtype)
        elif self.release_mix:
            DTYPE_POLICY.apply(self.backbone)
        self.backbone = self.backbone.to(self.device).eval()
        eagle = self.backbone.eagle_model
        token = self.text.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if token != eagle.config.image_token_index or self.text.tokens_per_tile != eagle.num_image_token:
            raise HarnessError(f"{self.assets}: {IMAGE_TOKEN} id {token} x {self.text.tokens_per_tile}"
                               f" per image, the model expects id {eagle.config.image_token_index}"
                               f" x {eagle.num_image_token}")
        return self

    @property
    def model(self):
        """The module that runs (where dtype policies apply and provenance is read)."""
        return self.backbone

    def attention_implementation(self) -> str:
        """Read from the modules that run; one name when language and vision agree."""
        eagle = self.backbone.eagle_model
        text = eagle.language_model.config._attn_implementation
        vision = eagle.vision_model.config._attn_implementation
        return text if text == vision else f"language {text}, vision {vision}"

    def _load_lerobot(self, directory: Path):
        groot_n1 = import_lerobot("groot", "lerobot.policies.groot.groot_n1", "GR00TN15",
                                  "install lerobot==0.4.4 with its groot extra")
        try:
            config = groot_n1.GR00TN15Config.from_pretrained(str(directory))
            config.backbone_cfg = {**config.backbone_cfg,
                                   "tokenizer_assets_repo": str(self.assets.resolve())}
            model = groot_n1.GR00TN15.from_pretrained(str(directory), config=config)
        except (OSError, ValueError, TypeError, KeyError, ImportError) as err:
            raise HarnessError(f"{directory}: GR00TN15.from_pretrained failed "
                               f"({type(err).__name__}: {err})") from None
        self.api_source = "lerobot:" + groot_n1.__name__
        return model.backbone

    def build_inputs(self, samples) -> dict:
        pixels = torch.stack([eagle_pixels(image, self.image_size) for _, image, _ in samples])
        ids, mask = self.text([task for _, _, task in samples])
        return {"eagle_input_ids": ids.to(self.device), "eagle_attention_mask": mask.to(self.device),
                "eagle_pixel_values": pixels.to(self.device),
                "eagle_image_sizes": torch.tensor([[self.image_size] * 2] * len(samples))}

    def _compute(self):
        if not self.use_bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @torch.inference_mode()
    def forward(self, inputs: dict) -> HiddenStates:
        backbone = self.backbone
        fed = dict(inputs)
        if self.use_bf16:  # GR00TN15.prepare_input with compute_dtype "bfloat16"
            fed["eagle_pixel_values"] = fed["eagle_pixel_values"].to(torch.bfloat16)
        elif self.dtype is not None:
            fed["eagle_pixel_values"] = fed["eagle_pixel_values"].to(self.dtype)
        projected = []
        handle = backbone.eagle_linear.register_forward_pre_hook(
            lambda module, args: projected.append(args[0].detach()))
        sweep = self.layer_spec != "last"
        decoder = backbone.eagle_model.language_model.model
        try:
            with self._compute(), capture(backbone, [NORM_PATH]) as hooked, (
                    capture_residual_stream(decoder) if sweep else contextlib.nullcontext()) as stream:
                backbone(fed)
        finally:
            handle.remove()
        hidden = hooked.output
        if len(projected) != 1 or not torch.equal(hidden, projected[0]):
            raise HarnessError(f"hook on {NORM_PATH} != eagle_linear's input: the hooked module "
                               "is not the final norm of this forward")
        mask = inputs["eagle_attention_mask"].bool()
        self._note(inputs, hidden)
        layers = {"last": hidden}
        if sweep:
            states = stream.hidden_states()
            layers.update({str(i): states[i] for i in layer_indices(self.layer_spec, len(states))})
        return HiddenStates(layers=layers, mask=mask)

    def _note(self, inputs, hidden) -> None:
        ids = inputs["eagle_input_ids"]
        image_id = self.backbone.eagle_model.config.image_token_index
        self.observed.note("image_size_fed", f"{self.image_size}x{self.image_size}")
        self.observed.note("image_tokens", int((ids[0] == image_id).sum()))
        note_token_inputs(self.observed, None, inputs["eagle_attention_mask"], None)
        self.observed.note("hidden_dtype", str(hidden.dtype).removeprefix("torch."))

    def modality_masks(self, inputs: dict, tasks, hidden: HiddenStates):
        """Image = the <IMG_CONTEXT> tokens; text = the task's tokens inside `['task']`."""
        from harness.extractors.engine.modality import ModalityMasks, task_mask
        valid = hidden.mask
        ids = inputs["eagle_input_ids"].to(valid.device)
        image = (ids == self.backbone.eagle_model.config.image_token_index) & valid
        text, reasons = task_mask(ids, valid, tasks, self.text.tokenizer, image)
        return ModalityMasks(image=image, text=text, text_fallback=reasons)

    def describe(self) -> dict:
        backbone = self.backbone
        lm = backbone.eagle_model.language_model.model
        return {
            "model": self.name, "revision": self.revision, "api_source": self.api_source,
            "class": type(backbone).__name__,
            "extraction_point": f"{self.extraction_point}: backbone.{NORM_PATH}",
            "language_layers_run": len(lm.layers), "select_layer": backbone.select_layer,
            "hidden_size": int(lm.norm.weight.shape[0]),
            "dtype": next(lm.parameters()).dtype,
            "parameter_dtypes": parameter_dtypes(backbone, {"eagle_model": "eagle_model",
                                                            "eagle_linear": "eagle_linear"}),
            "dtype_policy": ("as given: --dtype, no autocast" if self.dtype is not None
                             else DTYPE_POLICY.summary),
            "attn_implementation": self.attention_implementation(),
            "compute": "bfloat16 autocast" if self.use_bf16 else "no autocast",
            "assets": self.assets_label or str(self.assets),
            "image_path": f"[0,1] -> uint8 by truncation, bicubic to {self.image_size} when it "
                          "differs, (x - 127.5) / 127.5; one tile, no thumbnail",
            "prompt_template": "Eagle chat template (assets' chat_template.json) over "
                               "[<image-1>, str([task])], generation prompt on",
            "image_tokens_per_image": self.text.tokens_per_tile,
            "padding_side": self.text.tokenizer.padding_side,
            "task_per_row": "each sample its own task (LeRobot 0.4.4's pack step gives a batch "
                            "its first task)",
            "state_input": "none: GR00T's backbone never sees the state (only the action head "
                           "does)",
            "pooling_mask": "eagle attention_mask (every valid prompt token, images included)",
            **({} if self.layer_spec == "last" else {
                "layers": self.layer_spec,
                "layer_capture": "pre-hook on layers[i].input_layernorm (= hidden_states[i]); "
                                 "final norm output (= hidden_states[L])"}),
        }


def _build(common: Common, opts: dict, stack) -> GrootExtractor:
    kw = dict(name=common.ckpt, device=common.device, dtype=common.dtype,
              fp32_compute=opts["fp32_compute"], revision=common.revision, layers=common.layers)
    if common.tiny:
        import tempfile
        from harness.extractors.groot_standin import tiny_groot
        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="groot-assets-"))
        backbone, assets = tiny_groot(directory)
        return GrootExtractor(common.ckpt, backbone=backbone, assets=str(assets),
                              assets_label="the stand-in's (harness.extractors.groot_standin)", **kw)
    return GrootExtractor(common.ckpt, assets=opts["assets"], **kw)


SPEC = FamilySpec(
    name="groot",
    help="LeRobot GR00T N1.5: Eagle backbone, cut LM's final-norm hook (state-blind by design)",
    build=_build,
    default_ckpt=DEFAULT_CKPT,
    options=(
        Option("assets", str, None, f"local directory with the Eagle processor files (a copy "
               f"of {ASSETS_REPO}: tokenizer, chat_template.json, processor_config.json, "
               "preprocessor_config.json, config.json); required for a real checkpoint",
               metavar="DIR"),
        Option("fp32_compute", bool, False, "run without GrootPolicy's bfloat16 autocast "
               "(its use_bf16=False)"),
    ),
    final_norm_paths={"groot": (NORM_PATH,)},
    dtype_policy=DTYPE_POLICY,
    demo=(("groot-tiny", "tiny", {"split_modalities": True, "layers": "all"}),),
    **SPEC_FIELDS,
)
