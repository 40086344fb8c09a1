"""LeRobot SmolVLA (SmolVLM2 cut to `num_vlm_layers` + an action expert): prefill-only,
final-norm features, state-blind by default.

Traps handled here (docs/facts.md §8):
- the language model is cut to `num_vlm_layers` (16 of 32 in the release) and the final
  norm `vlm_with_expert.vlm.model.text_model.norm` runs after the cut: the hook is on it,
  and it must equal the prefix output the forward returns (checked, else raise);
- the prefix ENDS WITH A STATE TOKEN (`state_proj` of the robot state; the data
  directory's states are fed, as the policy's own prefill does). Image and text tokens
  cannot attend to it (it opens a later attention block), so pooling without it gives
  features the state never touched: that is the default (tested: changing the states
  leaves feats_A.pt bit-identical). `--state_in_input` pools it too (recorded as
  `state_in_input: true`); `--action_repr` feeds zeros to the expert unless it is given;
- the prompt is task + "\\n", right-padded as the checkpoint's `pad_language_to` says
  (`max_length` in the release), truncated at `tokenizer_max_length` (48);
- images: resize-with-pad to `resize_imgs_with_padding` (512, zero pad top/left), x2-1,
  by the policy's own `prepare_images`;
- `from_pretrained` loads with strict=False: every weight is audited against the file.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import torch

from harness.errors import HarnessError
from harness.extractors.engine.base import Extractor, HiddenStates
from harness.extractors.engine.dtype_policy import FLOAT32, DtypePolicy
from harness.extractors.lerobot_state import (SPEC_FIELDS, StateInput, build_dtype, family_options,
                                              import_lerobot, parameter_dtypes)
from harness.extractors.engine.observed import Observed, note_token_inputs
from harness.extractors.pi0_lerobot import audit_weights, images_01, resolve_checkpoint
from harness.extractors.engine.registry import Common, FamilySpec
from harness.extractors.engine.hooks import capture
from harness.extractors.engine.residual_stream import capture_residual_stream, layer_indices

DEFAULT_CKPT = "lerobot/smolvla_base"
NORM_PATH = "vlm.model.text_model.norm"  # under policy.model.vlm_with_expert
EXPERT_NORM_PATH = "lm_expert.norm"
ACTION_SEED = 0  # noise of sample i: torch.Generator().manual_seed(ACTION_SEED + i)
SUMMARY = ("with the config's load_vlm_weights true (the release): the VLM and the action "
           "expert in bfloat16 (LeRobot 0.4.4 loads the VLM with torch_dtype=bfloat16 and "
           "builds the expert from its config), except the expert's cross-attention k/v "
           "projections (plain nn.Linear, float32); the state, action and time projections "
           "float32. Else float32 throughout")


def cross_attention_layers(config, n_layers: int) -> list[int]:
    """Expert layers whose k/v projections LeRobot rebuilds for cross-attention."""
    if "cross" not in getattr(config, "attention_mode", "self_attn"):
        return []
    every = getattr(config, "self_attn_every_n_layers", -1)
    return [i for i in range(n_layers) if not (every > 0 and i % every == 0)]


def dtype_policy(cross_layers) -> DtypePolicy:
    """The loader's mix for an expert whose `cross_layers` have float32 k/v projections."""
    return DtypePolicy(SUMMARY, root="model.vlm_with_expert", low_modules=("vlm", "lm_expert"),
                       float32_params=tuple(f"lm_expert.layers.{i}.self_attn.{kv}_proj."
                                            for i in cross_layers for kv in "kv"))


DTYPE_POLICY = dtype_policy(cross_attention_layers(
    SimpleNamespace(attention_mode="cross_attn", self_attn_every_n_layers=2), 16))
"""The release's mix (smolvla_base: 16 expert layers, cross-attention in every odd one)."""


def release_dtype_policy(policy) -> None:
    """Put a policy built here (the stand-in, or LeRobot's built with load_vlm_weights
    false) in the dtypes LeRobot's loader gives the release checkpoint (SUMMARY;
    checked against LeRobot itself in tests/equivalence/test_lerobot04_smolvla.py)."""
    FLOAT32.apply(policy)
    if getattr(policy.config, "load_vlm_weights", False):
        expert = policy.model.vlm_with_expert.lm_expert
        dtype_policy(cross_attention_layers(policy.config, len(expert.layers))).apply(policy)


class SmolVLAExtractor(Extractor):
    """Prefill-only SmolVLA extractor; see the module docstring."""

    family = "smolvla"
    extraction_point = "hook on the cut language model's final norm (== prefix_out), prefill only"
    image_token_rule = "the prefix's image block (before the language tokens)"

    def __init__(self, ckpt: str = DEFAULT_CKPT, *, policy=None, tokenizer=None,
                 make_att_2d_masks=None, name: str | None = None, device: str = "cpu",
                 dtype: str | None = None, image_key: str | None = None,
                 state_in_input: bool = False, allow_missing=(), allow_unexpected=(),
                 check_values: bool = True, revision: str | None = None, layers="last"):
        self.ckpt, self.revision, self.name = ckpt, revision, name or ckpt
        self.policy, self.tokenizer, self.make_att_2d_masks = policy, tokenizer, make_att_2d_masks
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.image_key_override, self.with_state = image_key, state_in_input
        self.allow_missing, self.allow_unexpected = tuple(allow_missing), tuple(allow_unexpected)
        self.check_values, self.layer_spec = check_values, layers
        self.states = StateInput()
        self.observed = Observed()
        self.audit: dict = {}
        self.api_source = "given"

    # -- protocol ---------------------------------------------------------------
    def load(self) -> "SmolVLAExtractor":
        if self.policy is None:
            self._load_lerobot(resolve_checkpoint(self.ckpt, self.revision))
        elif self.dtype is None:  # a policy built here: the release's dtypes
            release_dtype_policy(self.policy)
        if self.dtype is not None:
            for param in self.policy.parameters():
                param.data = param.data.to(self.dtype)
        if self.make_att_2d_masks is None:
            from harness.extractors.standins import make_att_2d_masks
            self.make_att_2d_masks = make_att_2d_masks
        self.policy = self.policy.to(self.device).eval()
        keys = list(self.policy.config.image_features)
        if not keys:
            raise HarnessError("the policy config declares no image feature")
        if self.image_key_override is not None and self.image_key_override not in keys:
            raise HarnessError(f"image key {self.image_key_override!r} not in the config's "
                               f"image features {keys}")
        self.image_key = self.image_key_override or keys[0]
        return self

    def _load_lerobot(self, directory: Path) -> None:
        module = import_lerobot("smolvla", "lerobot.policies.smolvla.modeling_smolvla",
                                "SmolVLAPolicy")
        try:
            policy = module.SmolVLAPolicy.from_pretrained(str(directory))
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise HarnessError(f"{directory}: SmolVLAPolicy.from_pretrained failed "
                               f"({type(err).__name__}: {err})") from None
        self.audit = audit_weights(policy, directory, self.allow_missing, self.allow_unexpected,
                                   self.check_values)
        self.states.use_checkpoint_normaliser(directory)
        self.policy, self.make_att_2d_masks = policy, module.make_att_2d_masks
        self.tokenizer = self.tokenizer or policy.model.vlm_with_expert.processor.tokenizer
        self.api_source = "lerobot:" + module.__name__

    def set_states(self, states: torch.Tensor, indices=None) -> None:
        """The data directory's states (fed only with --state_in_input)."""
        self.states.set_states(states, indices)

    def state_in_input(self, output: str) -> bool:
        """With --state_in_input the state token is pooled into feats_A and the expert
        attends to the real state; the image and text views never see it (later block)."""
        return self.with_state and output in ("feats_A", "feats_action")

    def tokenize(self, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """As LeRobot's SmolVLA pre-processor: task + "\\n", right pad (`pad_language_to`),
        truncation at `tokenizer_max_length`."""
        config = self.policy.config
        texts = [t if t.endswith("\n") else t + "\n" for t in tasks]
        self.tokenizer.padding_side = "right"
        out = self.tokenizer(texts, max_length=int(config.tokenizer_max_length), truncation=True,
                             padding=config.pad_language_to, return_tensors="pt")
        return out["input_ids"], out["attention_mask"].bool()

    def build_inputs(self, samples) -> dict:
        images = images_01(samples)
        tokens, masks = self.tokenize([task for _, _, task in samples])
        indices = [int(s[0]) for s in samples]
        # state-blind: the states as stored (no pooled token sees them, so a normaliser
        # that does not fit the data cannot stop the run); with the state: the policy's way
        state = self.states.rows(indices, int(self.policy.config.max_state_dim),
                                 normalise=self.with_state)
        return {"images": images.to(self.device), "lang_tokens": tokens.to(self.device),
                "lang_masks": masks.to(self.device), "state": state.to(self.device),
                "sample_indices": torch.tensor(indices)}

    def _prefix_inputs(self, inputs: dict):
        policy = self.policy
        images, img_masks = policy.prepare_images({self.image_key: inputs["images"]})
        state = policy.prepare_state({"observation.state": inputs["state"]})
        return images, img_masks, state

    @torch.inference_mode()
    def forward(self, inputs: dict) -> HiddenStates:
        model = self.policy.model
        vwe = model.vlm_with_expert
        images, img_masks, state = self._prefix_inputs(inputs)
        embs, pad_masks, att_masks = model.embed_prefix(
            images, img_masks, inputs["lang_tokens"], inputs["lang_masks"], state=state)
        att_2d = self.make_att_2d_masks(pad_masks, att_masks)
        sweep = self.layer_spec != "last"
        decoder = vwe.vlm.model.text_model if sweep else None
        with capture(vwe, [NORM_PATH]) as hooked, (
                capture_residual_stream(decoder) if sweep else contextlib.nullcontext()) as stream:
            (prefix_out, _), _ = vwe.forward(
                attention_mask=att_2d, position_ids=torch.cumsum(pad_masks, dim=1) - 1,
                past_key_values=None, inputs_embeds=[embs, None],
                use_cache=getattr(self.policy.config, "use_cache", True), fill_kv_cache=True)
        hidden = hooked.output
        if hidden.shape != prefix_out.shape or not torch.equal(hidden, prefix_out):
            raise HarnessError(f"hook on {NORM_PATH} != prefix_out: the hooked module is not "
                               "the final norm of this forward")
        state_pos = inputs["state_positions"] = self.state_positions(att_masks)
        mask = pad_masks.bool().clone()
        if not self.with_state:
            mask[:, state_pos] = False
        self._note(images, inputs, hidden, state_pos)
        layers = {"last": hidden}
        if sweep:
            states = stream.hidden_states()
            layers.update({str(i): states[i] for i in layer_indices(self.layer_spec, len(states))})
        return HiddenStates(layers=layers, mask=mask)

    @staticmethod
    def state_positions(att_masks: torch.Tensor) -> list[int]:
        """Prefix positions of the state token(s): the block that opens with att flag 1
        (LeRobot's embed_prefix gives only the state that flag), read from what ran."""
        flags = att_masks[0].bool()
        if not bool((att_masks.bool() == flags).all()):
            raise HarnessError("the prefix's attention flags differ between rows")
        positions = flags.nonzero().flatten().tolist()
        if len(positions) != 1:
            raise HarnessError(f"expected one state token in the prefix, found att flags at "
                               f"{positions}")
        return positions

    def _note(self, images, inputs, hidden, state_pos) -> None:
        for image in images:
            self.observed.note("image_size_fed", f"{image.shape[-1]}x{image.shape[-2]}")
        n_image = state_pos[0] - inputs["lang_tokens"].shape[1]
        self.observed.note("image_tokens", n_image)
        self.observed.note("state_token_pooled", self.with_state)
        self.observed.note("state_fed_nonzero", bool(inputs["state"].abs().sum() > 0))
        note_token_inputs(self.observed, None, inputs["lang_masks"], None)
        self.observed.note("hidden_dtype", str(hidden.dtype).removeprefix("torch."))

    def modality_masks(self, inputs: dict, tasks, hidden: HiddenStates):
        """Image block first, then the language tokens (the task is searched in them);
        the state token is in neither."""
        from harness.extractors.engine.modality import ModalityMasks, task_mask
        valid = hidden.mask
        lang = inputs["lang_tokens"].to(valid.device)
        n_lang = lang.shape[1]
        n_image = inputs["state_positions"][0] - n_lang  # noted by forward
        ids = torch.full(valid.shape, -1, dtype=lang.dtype, device=valid.device)
        ids[:, n_image:n_image + n_lang] = lang
        image = torch.zeros_like(valid)
        image[:, :n_image] = valid[:, :n_image]
        text, reasons = task_mask(ids, valid, tasks, self.tokenizer, image)
        return ModalityMasks(image=image, text=text, text_fallback=reasons)

    @torch.inference_mode()
    def action_features(self, inputs: dict) -> torch.Tensor:
        """(B, D_expert): the expert's final norm (`lm_expert.norm`) at the LAST denoising
        step of the policy's own `sample_actions`, mean over the chunk's action tokens.
        Noise of sample i is seeded by its index; the expert attends to the state token,
        so its state is zeros unless --state_in_input."""
        config, model = self.policy.config, self.policy.model
        self.policy.reset()
        images, img_masks, state = self._prefix_inputs(inputs)
        if not self.with_state:  # the expert attends to the state token: zeros
            state = torch.zeros_like(state)
        noise = torch.stack([torch.randn(config.chunk_size, config.max_action_dim,
                                         generator=torch.Generator().manual_seed(ACTION_SEED + int(i)))
                             for i in inputs["sample_indices"]]).to(self.device)
        with capture(model.vlm_with_expert, [EXPERT_NORM_PATH]) as hooked:
            model.sample_actions(images, img_masks, inputs["lang_tokens"], inputs["lang_masks"],
                                 state, noise=noise)
        if hooked.calls != config.num_steps:
            raise HarnessError(f"the expert's norm ran {hooked.calls} times for "
                               f"{config.num_steps} denoising steps: not the loop this reads")
        return hooked.output[:, -config.chunk_size:].float().mean(dim=1)

    def action_provenance(self) -> dict:
        config = self.policy.config
        return {"file": "feats_action.pt",
                "point": f"vlm_with_expert.{EXPERT_NORM_PATH} output at the last denoising "
                         "step of sample_actions",
                "tokens": f"the last chunk_size = {config.chunk_size} suffix tokens, mean",
                "denoising_steps": config.num_steps,
                "noise": f"torch.Generator().manual_seed({ACTION_SEED} + sample index)",
                "state_input": self.states.describe() if self.with_state else "zeros"}

    def attention_implementation(self) -> str:
        """Read from the modules that run: the cut language model runs LeRobot's own
        attention (`get_attention_interface`: eager) or, on the stand-in, its config's;
        the vision encoder its config's. One name when they agree."""
        inner = self.policy.model.vlm_with_expert.vlm.model
        interface = getattr(self.policy.model.vlm_with_expert, "get_attention_interface", None)
        text = ("eager" if interface().__name__ == "eager_attention_forward"
                else interface().__name__) if interface else inner.text_model.config._attn_implementation
        vision = inner.vision_model.config._attn_implementation
        return text if text == vision else f"language {text}, vision {vision}"

    def describe(self) -> dict:
        policy = self.policy
        vwe = policy.model.vlm_with_expert
        text = vwe.vlm.model.text_model
        config = policy.config
        return {
            "model": self.name, "revision": self.revision, "api_source": self.api_source,
            "class": type(policy).__name__,
            "extraction_point": f"{self.extraction_point}: vlm_with_expert.{NORM_PATH}",
            "language_layers_run": len(text.layers),
            "num_vlm_layers": getattr(config, "num_vlm_layers", None),
            "hidden_size": int(text.norm.weight.shape[0]),
            "dtype": next(text.parameters()).dtype,
            "parameter_dtypes": parameter_dtypes(policy.model, {
                "vlm": "vlm_with_expert.vlm", "lm_expert": "vlm_with_expert.lm_expert",
                "state_proj": "state_proj"}),
            "dtype_policy": "as given: --dtype" if self.dtype is not None else SUMMARY,
            "image_key": self.image_key, "image_keys_in_config": list(config.image_features),
            "image_path": f"policy.prepare_images: resize_with_pad to "
                          f"{list(config.resize_imgs_with_padding)} (zero pad), x2-1",
            "prompt_template": "{task}\\n",
            "tokenizer_max_length": int(config.tokenizer_max_length),
            "padding": config.pad_language_to, "padding_side": self.tokenizer.padding_side,
            **image_size(config),
            "state_in_input": self.with_state,
            "state_input": self.states.describe(self.with_state) + ", into the prefix's "
                           "state token" + (
                "" if self.with_state else ", which image and text tokens cannot attend "
                "to and pooling leaves out (state-blind)"),
            "pooling_mask": "prefix_pad_masks" + ("" if self.with_state else
                                                  " without the state token"),
            "weight_audit": self.audit,
            **({} if self.layer_spec == "last" else {
                "layers": self.layer_spec,
                "layer_capture": "pre-hook on layers[i].input_layernorm (= hidden_states[i]); "
                                 "final norm output (= hidden_states[L])"}),
        }


def image_size(config) -> dict:
    """{"image_size": side} when the policy resizes (with padding) to a square, else {}."""
    height, width = config.resize_imgs_with_padding or (None, None)
    return {"image_size": int(width)} if width is not None and height == width else {}


def _build(common: Common, opts: dict, stack) -> SmolVLAExtractor:
    kw = dict(name=common.ckpt, device=common.device, dtype=build_dtype(common.dtype),
              image_key=opts["image_key"], state_in_input=opts["state_in_input"],
              allow_missing=opts["allow_missing_keys"],
              allow_unexpected=opts["allow_unexpected_keys"], revision=common.revision,
              layers=common.layers)
    if common.tiny:
        from harness.extractors.smolvla_standin import tiny_smolvla
        policy, tokenizer = tiny_smolvla()
        return SmolVLAExtractor(common.ckpt, policy=policy, tokenizer=tokenizer, **kw)
    return SmolVLAExtractor(common.ckpt, **kw)


SPEC = FamilySpec(
    name="smolvla",
    help="LeRobot SmolVLA: prefill-only, cut LM's final-norm hook, state token left out",
    build=_build,
    default_ckpt=DEFAULT_CKPT,
    options=family_options("pool the prefix's state token too (the data directory's "
                           "states); recorded. Default: state-blind (left out)"),
    final_norm_paths={"smolvla": (NORM_PATH,)},
    action_stream=True,
    dtype_policy=DTYPE_POLICY,
    demo=(("smolvla-tiny", "tiny", {"split_modalities": True, "layers": "all",
                                     "action_repr": True}),),
    **SPEC_FIELDS,
)
