"""OpenVLA (Prismatic: DINOv2 + SigLIP patches, projector, Llama-2): final-norm features.

What the seed's `extract_features_openvla.py` did, and so what this extractor does
(docs/facts.md §3):
- loads with the checkpoint's own code (`trust_remote_code`, `AutoModelForVision2Seq`)
  in bf16: every parameter bf16; the rotary `inv_freq` buffers stay float32, as
  `from_pretrained(torch_dtype=bfloat16)` leaves them (the SPEC's default dtype policy,
  every parameter bf16; `cast_like_loader` leaves buffers alone); the
  processor's float32 pixels are cast to bf16;
- prompt `"In: What action should the robot take to {task}?\\nOut:"`, NOT followed by the
  token 29871 ("▁") that `predict_action` appends (`--append_empty_token` appends it, as
  predict_action does, with the attention mask extended over it); recorded either way;
- the model inserts 256 projected patch embeddings right after BOS, so the hidden states
  are BOS + 256 patches + prompt tokens and the pooling mask is the tokenizer's mask with
  ones inserted for the patches; `hidden_states[-1]` (== the hooked final norm
  `language_model.model.norm`, checked every batch), masked mean;
- the tokenizer pads right (pad id 32000) and the model leaves position ids to Llama, so
  a sample's feature does not depend on its batch.
`--action_repr`: the seed's `generate(max_new_tokens=7, output_hidden_states=True)` path,
as a greedy loop written here (the real classes have no `generate` from transformers 4.50:
no GenerationMixin): the final-layer states of the generation steps after the prefill
(the first 6 of the 7 generated tokens), mean, one sample at a time as the seed did.
The real modelling code needs timm 0.9.10-0.9.16 (which imports torchvision); CI runs a
stand-in written here (`openvla_standin`), checked against the real files by an opt-in test.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Sequence

import torch

from harness.errors import HarnessError
from harness.extractors.engine.base import FINAL, Extractor, HiddenStates, Sample, to_device
from harness.extractors.engine.compat import attention_in_use, dtype_kwarg, transformers_major
from harness.extractors.hf_vlm import note_forward, weights_dtype
from harness.extractors.engine.observed import Observed
from harness.extractors.engine.registry import Common, FamilySpec, Option
from harness.extractors.engine.hooks import capture, find_module
from harness.extractors.engine.residual_stream import layer_indices

DEFAULT_CKPT = "openvla/openvla-7b"
PROMPT = "In: What action should the robot take to {task}?\nOut:"
EMPTY_TOKEN = 29871  # "▁": predict_action appends it after "Out:"
N_ACTION_TOKENS = 7  # the seed's max_new_tokens (one token per action dimension)
NORM_PATHS = ("language_model.model.norm",)  # LlamaForCausalLM inside the Prismatic model
SUPPORTED_TIMM = ("0.9.10", "0.9.11", "0.9.12", "0.9.16")  # the checkpoint code's own check


def cast_like_loader(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters to `dtype`, buffers untouched: what `from_pretrained(torch_dtype=...)`
    gives (a `.to(dtype)` would also turn the float32 rotary buffers)."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def float32_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the float32 parameters and buffers of a model not run in float32."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return sorted(name for name, t in named if t.dtype == torch.float32)


def check_environment() -> None:
    """Refuse, before loading, an environment the checkpoint's own code cannot run in."""
    try:
        timm = importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        timm = None
    if timm not in SUPPORTED_TIMM:
        raise HarnessError(f"OpenVLA's checkpoint code needs timm in {{{', '.join(SUPPORTED_TIMM)}}}"
                           f" (this environment has {timm or 'none'}): pip install timm==0.9.16")
    if transformers_major() >= 5:
        raise HarnessError("OpenVLA's checkpoint code runs on transformers 4.x (checked 4.40.1, "
                           "4.47.1, 4.57.6); run this family in its own environment")


def append_token(batch: dict, token: int, pad_id: int) -> dict:
    """Each right-padded row's tokens followed by `token` (unless it already ends with it),
    the mask extended over it: predict_action's input under sdpa, for a batch."""
    ids, mask = batch["input_ids"], batch["attention_mask"].long()
    lengths = mask.sum(dim=1)
    if not torch.equal(mask, (torch.arange(ids.shape[1]) < lengths[:, None]).long()):
        raise HarnessError("--append_empty_token needs a right-padding tokenizer")
    new_ids = torch.full((ids.shape[0], ids.shape[1] + 1), pad_id, dtype=ids.dtype)
    new_mask = torch.zeros(new_ids.shape, dtype=mask.dtype)
    for row, n in enumerate(lengths.tolist()):
        tokens = ids[row, :n].tolist()
        tokens += [] if tokens and tokens[-1] == token else [token]
        new_ids[row, :len(tokens)] = torch.tensor(tokens, dtype=ids.dtype)
        new_mask[row, :len(tokens)] = 1
    width = int(new_mask.sum(dim=1).max())
    return dict(batch, input_ids=new_ids[:, :width], attention_mask=new_mask[:, :width])


def multimodal(values: torch.Tensor, n_patches: int, fill) -> torch.Tensor:
    """A (B, T) per-token tensor laid out like the model's sequence: BOS, then `n_patches`
    entries of `fill`, then the rest."""
    patches = values.new_full((values.shape[0], n_patches), fill)
    return torch.cat([values[:, :1], patches, values[:, 1:]], dim=1)


class OpenVLAExtractor(Extractor):
    """Loads the checkpoint with its own code, or takes a ready model + processor (the
    stand-in); see the module docstring."""

    family = "openvla"
    image_token_rule = "the projected patch embeddings the model inserts after BOS"

    def __init__(self, ckpt: str = DEFAULT_CKPT, *, device: str = "cpu",
                 dtype: str | torch.dtype | None = "bfloat16", layers="last",
                 revision: str | None = None, attn_implementation: str | None = None,
                 append_empty_token: bool = False, name: str | None = None,
                 model=None, processor=None):
        self.ckpt, self.name, self.revision = ckpt, name or ckpt, revision
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.layer_spec, self.attn_request = layers, attn_implementation
        self.append_empty_token = append_empty_token
        self.model, self.processor = model, processor
        self.stand_in = model is not None
        self.hidden_dim: int | None = None
        self.observed = Observed()

    # -- protocol ---------------------------------------------------------------
    def load(self) -> "OpenVLAExtractor":
        if self.model is None:
            self.model, self.processor = self._from_pretrained()
        if self.dtype is None:
            self.dtype = next(self.model.parameters()).dtype
        cast_like_loader(self.model, self.dtype)
        self.model.to(self.device).eval()
        self.norm_path, _ = find_module(self.model, NORM_PATHS)
        self.hidden_dim = self.model.config.text_config.hidden_size
        return self

    def _from_pretrained(self):
        check_environment()
        import transformers
        common = dict(trust_remote_code=True, revision=self.revision)
        kwargs = dict(**dtype_kwarg(self.dtype or torch.bfloat16), **common)
        if importlib.util.find_spec("accelerate") is not None:  # the seed's; needs accelerate
            kwargs["low_cpu_mem_usage"] = True  # (memory at load only, not the values)
        if self.attn_request is not None:
            kwargs["attn_implementation"] = self.attn_request
        try:
            processor = transformers.AutoProcessor.from_pretrained(self.ckpt, **common)
            model = transformers.AutoModelForVision2Seq.from_pretrained(self.ckpt, **kwargs)
        except AttributeError as err:
            if "_supports_sdpa" not in str(err):
                raise
            raise HarnessError(f"{self.ckpt}: on transformers {transformers.__version__} OpenVLA's "
                               "code cannot pick its attention (its _supports_sdpa reads the "
                               "language model before it is built): pass --attn_implementation "
                               "eager, or use transformers 4.40.1-4.47.1") from None
        except (OSError, ValueError, ImportError) as err:
            raise HarnessError(f"{self.ckpt}: cannot load OpenVLA ({type(err).__name__}: {err})") from None
        return model, processor

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def build_inputs(self, samples: Sequence[Sample]) -> dict:
        images = [image.convert("RGB") for _, image, _ in samples]
        self.observed.note("image_size_fed", *(f"{w}x{h}" for w, h in (im.size for im in images)))
        texts = [PROMPT.format(task=task) for _, _, task in samples]
        batch = dict(self.processor(texts, images, padding=True, return_tensors="pt"))
        if self.append_empty_token:
            batch = append_token(batch, EMPTY_TOKEN, self.tokenizer.pad_token_id)
        return {k: to_device(v, self.device, self.dtype) for k, v in batch.items()}

    @torch.inference_mode()
    def forward(self, inputs: dict) -> HiddenStates:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        with capture(self.model, [self.norm_path]) as hooked:
            out = self.model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                             output_hidden_states=True, use_cache=False, return_dict=True)
        states = out.hidden_states
        last = states[-1]
        if hooked.output.shape != last.shape or not torch.equal(hooked.output, last):
            raise HarnessError(f"hook on {self.norm_path} != hidden_states[-1]: not the final "
                               "norm of this forward")
        n_patches = last.shape[1] - ids.shape[1]
        self.note_batch(inputs, n_patches, last)
        layers = {FINAL: last}
        layers.update({str(i): states[i] for i in layer_indices(self.layer_spec, len(states))})
        return HiddenStates(layers=layers, mask=multimodal(mask, n_patches, 1).bool())

    def note_batch(self, inputs: dict, n_patches: int, last: torch.Tensor) -> None:
        """Patches per row, padding side, pixel size and channels, hidden dtype, and whether
        each row ended with token 29871: read from the inputs and outputs."""
        note_forward(self.observed, inputs, last, None)
        self.observed.note("image_tokens", n_patches)
        self.observed.note("pixel_channels", int(inputs["pixel_values"].shape[1]))
        ids, lengths = inputs["input_ids"], inputs["attention_mask"].long().sum(dim=1)
        ends = ids[torch.arange(ids.shape[0]), (lengths - 1).clamp(min=0)]
        self.observed.note("prompt_ends_with_29871", *(ends == EMPTY_TOKEN).tolist())

    def modality_masks(self, inputs: dict, tasks, hidden: HiddenStates):
        """Image: the patch positions after BOS; text: the task's tokens, searched in the
        prompt ids laid out like the sequence (`harness.extractors.engine.modality`)."""
        from harness.extractors.engine.modality import ModalityMasks, task_mask
        ids, valid = inputs["input_ids"], hidden.mask
        n_patches = valid.shape[1] - ids.shape[1]
        image = torch.zeros_like(valid)
        image[:, 1:1 + n_patches] = True
        image &= valid
        text, reasons = task_mask(multimodal(ids, n_patches, -1), valid, tasks, self.tokenizer, image)
        return ModalityMasks(image=image, text=text, text_fallback=reasons)

    @torch.inference_mode()
    def action_features(self, inputs: dict) -> torch.Tensor:
        """(B, D): per sample (batch 1, its padding stripped), a greedy generation of
        N_ACTION_TOKENS tokens through the model's own cached one-token step; the mean of
        the final-layer states of the steps after the prefill (what the seed's
        `generate(..., output_hidden_states=True).hidden_states[1:]` holds)."""
        feats = []
        for row in range(inputs["input_ids"].shape[0]):
            n = int(inputs["attention_mask"][row].sum())
            ids = inputs["input_ids"][row:row + 1, :n]
            out = self.model(input_ids=ids, attention_mask=inputs["attention_mask"][row:row + 1, :n],
                             pixel_values=inputs["pixel_values"][row:row + 1], use_cache=True,
                             output_hidden_states=True, return_dict=True)
            steps = []
            for _ in range(N_ACTION_TOKENS - 1):  # the last token is generated, never fed
                token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
                out = self.model(input_ids=token, past_key_values=_cache(out),
                                 use_cache=True, output_hidden_states=True, return_dict=True)
                steps.append(out.hidden_states[-1][:, -1])
            feats.append(torch.cat(steps).float().mean(dim=0))
        return torch.stack(feats)

    def action_provenance(self) -> dict:
        return {"file": "feats_action.pt",
                "point": "hidden_states[-1] (final norm) of each greedy generation step",
                "tokens": f"mean over the states of generated tokens 1..{N_ACTION_TOKENS - 1} "
                          f"(max_new_tokens={N_ACTION_TOKENS}: the last one is never fed), "
                          "as generate(output_hidden_states=True).hidden_states[1:] in the seed",
                "decoding": "greedy, one sample at a time, the model's cached one-token step "
                            "(a loop written here: the checkpoint code has no generate on "
                            "transformers >= 4.50)",
                "prompt_ends_with_29871": self.append_empty_token}

    def attention_implementation(self) -> str | None:
        return attention_in_use(self.model.language_model)

    def describe(self) -> dict:
        cfg, image = self.model.config, self.processor.image_processor
        dtype = weights_dtype(self.model)
        return {
            "model": self.name, "revision": self.revision, "stand_in": self.stand_in,
            "class": type(self.model).__name__, "model_type": getattr(cfg, "model_type", None),
            "vision_backbone_id": getattr(cfg, "vision_backbone_id", None),
            "llm_backbone_id": getattr(cfg, "llm_backbone_id", None),
            "extraction_point": f"hidden_states[-1] (post final norm, == hook on {self.norm_path})",
            "layers": self.layer_spec, "hidden_size": self.hidden_dim, "dtype": dtype,
            "float32_tensors": [] if dtype == torch.float32 else float32_tensors(self.model),
            "pooling_mask": "attention_mask with ones inserted after BOS for the image patches",
            "use_cache": False, "prompt_template": PROMPT,
            "append_empty_token": self.append_empty_token,
            "padding_side": self.tokenizer.padding_side, "pad_token_id": self.tokenizer.pad_token_id,
            "image_resize_strategy": image.image_resize_strategy,
            "image_size": [list(s) for s in image.input_sizes],
            "image_interpolations": list(image.interpolations),
            "image_means": [list(m) for m in image.means], "image_stds": [list(s) for s in image.stds],
        }


def _cache(out):
    """The KV cache of a forward's output (`cache` in transformers 5, else `past_key_values`)."""
    return out["cache"] if "cache" in out.keys() else out.past_key_values


def _build(common: Common, opts: dict, stack) -> OpenVLAExtractor:
    kw = dict(device=common.device, dtype=common.dtype, layers=common.layers,
              revision=common.revision, attn_implementation=opts["attn_implementation"],
              append_empty_token=opts["append_empty_token"], name=common.ckpt)
    if common.tiny:
        from harness.extractors.openvla_standin import tiny_openvla
        model, processor = tiny_openvla(attn=opts["attn_implementation"] or "sdpa")
        kw.update(model=model, processor=processor)
    return OpenVLAExtractor(common.ckpt, **kw)


SPEC = FamilySpec(
    name="openvla",
    help="OpenVLA (Prismatic): hidden_states[-1] over BOS + 256 patches + prompt, bf16",
    build=_build,
    default_ckpt=DEFAULT_CKPT,
    stand_in="tiny",
    stand_in_help="'tiny' (an imitation of the Prismatic classes and processor)",
    options=(
        Option("append_empty_token", bool, False, "append token 29871 after 'Out:' as "
               "predict_action does (default: the seed's features, without it)"),
        Option("attn_implementation", str, None, "default: the loader's (sdpa, as the seed "
               "ran it)"),
    ),
    final_norm_paths={"openvla": NORM_PATHS, "prismatic": NORM_PATHS},
    action_stream=True,
    demo=(("openvla-tiny", "tiny", {"split_modalities": True, "layers": "all",
                                    "action_repr": True}),),
)
