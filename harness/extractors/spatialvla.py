"""SpatialVLA (PaliGemma2 + ZoeDepth, custom remote code): `hidden_states[-1]` masked mean.

Traps handled here (docs/facts.md §3): the remote code only runs on transformers
[4.47.0, 4.49); eager attention is pinned (flash-attention-2 would make the prompt
causal and change the features); the processor gets `do_normalize=False` (the model
normalises pixels itself) and `unnorm_key` (selects the camera intrinsics);
`use_cache=False`; the tokenizer pads left, so positions are derived from the mask to
keep a sample's feature independent of the batch it is in.
"""
from __future__ import annotations

import inspect


from harness.errors import HarnessError
from harness.extractors.engine.base import FINAL, to_device
from harness.extractors.engine.compat import (attention_in_use, dtype_kwarg, dtype_name,
                                      transformers_version)
from harness.extractors.hf_vlm import HfVlmExtractor, weights_dtype
from harness.extractors.engine.registry import Common, FamilySpec, Option

DEFAULT_CKPT = "IPEC-COMMUNITY/spatialvla-4b-224-sft-bridge"
UNNORM_KEY = "bridge_orig/1.0.0"
HIDDEN_SIZE = 2304
SUPPORTED_TRANSFORMERS = ("4.47.0", "4.49.0")  # [low, high)
ATTN = "eager"
TEXT_MODEL_TYPES = ("gemma2", "gemma")


installed_transformers = transformers_version  # tests replace it


def check_transformers_version(version: str | None = None) -> str:
    """Refuse, before any download or load, a transformers the remote code cannot run on."""
    from packaging.version import Version
    if version is None:
        version = installed_transformers()
    low, high = SUPPORTED_TRANSFORMERS
    if not Version(low) <= Version(version) < Version(high):
        raise HarnessError(
            f"SpatialVLA's remote code needs transformers >={low},<{high}; this environment "
            f"has {version}. Run the spatialvla extractor in its own environment: "
            f"pip install 'transformers>={low},<{high}'")
    return version


def attn_implementation(model) -> str | None:
    """The attention SpatialVLA's Gemma2 decoder actually runs (see compat)."""
    return attention_in_use(model, TEXT_MODEL_TYPES)


class SpatialVLAExtractor(HfVlmExtractor):
    """`HfVlmExtractor` (hidden_states of a PaliGemma-style model, layer sweeps, pooling
    mask) with SpatialVLA's loading, version gate, processor call and attention check.
    Loads the checkpoint, or takes a ready model + processor as the stand-ins do."""

    extraction_point = "hidden_states[-1] (post final norm, Gemma2)"

    def __init__(self, ckpt: str = DEFAULT_CKPT, *, device: str = "cpu", dtype: str = "bfloat16",
                 unnorm_key: str = UNNORM_KEY, revision: str | None = None,
                 positions: str = "mask", layers=(), seed_compat: bool = False,
                 model=None, processor=None):
        if not isinstance(layers, str):  # () or indices: the final layer plus those
            layers = list(layers) or FINAL
        super().__init__(ckpt, layers=layers, device=device,
                         dtype=dtype, attn_implementation=ATTN, revision=revision,
                         positions=positions, model=model, processor=processor)
        self.family, self.ckpt = "spatialvla", ckpt
        self.unnorm_key = unnorm_key
        self.seed_compat = seed_compat  # recorded only: the seed's path is the default
        self.stand_in = model is not None
        self._takes_positions = False

    # -- protocol ---------------------------------------------------------------
    def load(self) -> "SpatialVLAExtractor":
        if self.model is None:
            version = check_transformers_version()
            from transformers import AutoModel, AutoProcessor
            common = dict(trust_remote_code=True, revision=self.revision)
            self.processor = AutoProcessor.from_pretrained(self.ckpt, **common)
            self.model = AutoModel.from_pretrained(
                self.ckpt, attn_implementation=ATTN, **dtype_kwarg(self.dtype, version), **common)
        self._place_model()
        if getattr(self.model.config, "use_cache", None):
            self.model.config.use_cache = False
        impl = attn_implementation(self.model)
        if impl != ATTN:
            raise HarnessError(f"SpatialVLA loaded with attention {impl!r}; features are defined "
                               f"with {ATTN!r} (bidirectional prompt, soft-capping)")
        params = inspect.signature(self.model.forward).parameters
        self._takes_positions = "position_ids" in params
        return self

    def build_inputs(self, samples) -> dict:
        images = [image.convert("RGB") for _, image, _ in samples]
        texts = [task for _, _, task in samples]
        self.observed.note("image_size_fed", *(f"{w}x{h}" for w, h in (im.size for im in images)))
        batch = self.processor(images=images, text=texts, unnorm_key=self.unnorm_key,
                               do_normalize=False, padding="longest", return_tensors="pt")
        inputs = {k: to_device(v, self.device, self.dtype) for k, v in batch.items()}
        if self.positions == "mask" and self._takes_positions:
            # 1-indexed like PaliGemma's default; identical to it for an unpadded row.
            mask = inputs["attention_mask"].long()
            inputs["position_ids"] = mask.cumsum(-1).clamp(min=1)
        return inputs

    def attention_implementation(self) -> str | None:
        return attn_implementation(self.model)

    def describe(self) -> dict:
        cfg = self.model.config
        text = getattr(cfg, "text_config", cfg)
        return {
            "model": self.ckpt, "revision": self.revision,
            "stand_in": self.stand_in, "class": type(self.model).__name__,
            "extraction_point": self.extraction_point, "layers": self.layer_spec,
            "pooling_mask": "attention_mask",
            "hidden_size": getattr(text, "hidden_size", None), "dtype": weights_dtype(self.model),
            "use_cache": False,
            "padding_side": getattr(getattr(self.processor, "tokenizer", None), "padding_side", None),
            "processor_kwargs": {"unnorm_key": self.unnorm_key, "do_normalize": False},
            "position_ids": self.positions if self._takes_positions else "model default",
            "prompt_template": "<image>*n <bos>{task}\\n (SpatialVLA processor)",
            "seed_compat": self.seed_compat,
            "seed_path": "default: the seed's processor call (raw task, native image, "
                         "do_normalize=False); --seed_compat changes nothing",
            "runs_as_the_seed_did": dtype_name(weights_dtype(self.model)) == "bfloat16"
            and attn_implementation(self.model) == ATTN,  # the seed: bf16 weights, eager
        }


def _build(common: Common, opts: dict, stack) -> SpatialVLAExtractor:
    kw = dict(device=common.device, dtype=common.dtype, unnorm_key=opts["unnorm_key"],
              revision=common.revision, layers=common.layers, seed_compat=opts["seed_compat"])
    if common.tiny:
        from harness.extractors.standins import tiny_spatialvla
        model, processor = tiny_spatialvla()
        kw.update(model=model, processor=processor)
    return SpatialVLAExtractor(common.ckpt, **kw)


SPEC = FamilySpec(
    name="spatialvla",
    help="SpatialVLA: hidden_states[-1], eager attention, do_normalize=False",
    build=_build,
    default_ckpt=DEFAULT_CKPT,
    stand_in="tiny",
    stand_in_help="'tiny' (PaliGemma2 + SpatialVLA-style processor)",
    options=(Option("unnorm_key", str, UNNORM_KEY,
                    "dataset key selecting the camera intrinsics (ZoeDepth)"),
             Option("seed_compat", bool, False, "the seed script's path; already the "
                    "default, so this only records it")),
    final_norm_paths={"paligemma2": ("model.language_model.norm", "language_model.model.norm",
                                     "language_model.norm")},
    demo=(("spatialvla-tiny", "tiny", {"split_modalities": True, "layers": "all"}),),
)
