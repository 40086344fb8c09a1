"""LeRobot Pi0-FAST (PaliGemma that writes actions as FAST tokens; no action expert):
prefill-only, final-norm features with a state-blind prompt by default.

Shares Pi0.5's prompt handling (harness.extractors.pi05: the processor writes the
discretised state into the prompt, "Task: {task}, State: {bins};\\n" here; default the same
template without the state field, `--state_in_input` the policy's own, both recorded), its
loading, weight audit and dtype policy. What differs is the prefill, written from LeRobot
0.4.4's `sample_actions_fast`: a BOS token is appended after the (padded) prompt, the
prefix is `embed_prefix_fast` (images + language + BOS, bidirectional, a 2-D mask),
embeddings are cast to bfloat16 when the language model is, the 4-D mask takes their dtype,
and the attention is the model's own (no switch to eager). The hook on the final norm must
equal the prefix output (checked). There is no action expert: `--action_repr` is refused.
"""
from __future__ import annotations

import contextlib

import torch

from harness.errors import HarnessError
from harness.extractors.engine.base import HiddenStates
from harness.extractors.engine.observed import note_token_inputs
from harness.extractors.pi0_lerobot import NORM_PATHS, note_prefix
from harness.extractors.lerobot_state import SPEC_FIELDS
from harness.extractors.pi05 import DTYPE_POLICY, Pi05Extractor, build_with, options
from harness.extractors.engine.registry import Common, FamilySpec
from harness.extractors.engine.hooks import capture
from harness.extractors.engine.residual_stream import capture_residual_stream, layer_indices

DEFAULT_CKPT = "lerobot/pi0fast_base"


class Pi0FastExtractor(Pi05Extractor):
    family = "pi0_fast"
    extraction_point = ("hook on the final Gemma norm (== prefix_out) of the first decoding "
                        "step's prefill [images, prompt, BOS]")
    policy_module, policy_class = "lerobot.policies.pi0_fast.modeling_pi0_fast", "PI0FastPolicy"
    prompt_with_state = "Task: {task}, State: {state};\n"
    prompt_blind = "Task: {task};\n"
    eager_prefix = False  # sample_actions_fast keeps the model's own attention

    def build_inputs(self, samples) -> dict:
        """The prompt, then BOS appended after its padding (as sample_actions_fast)."""
        inputs = super().build_inputs(samples)
        tokens, masks = inputs["lang_tokens"], inputs["lang_masks"]
        note_token_inputs(self.observed, None, masks, None)  # the prompt's padding, before BOS
        bos = torch.full((tokens.shape[0], 1), self.tokenizer.bos_token_id, dtype=tokens.dtype,
                         device=tokens.device)
        inputs["lang_tokens"] = torch.cat([tokens, bos], dim=1)
        inputs["lang_masks"] = torch.cat([masks, torch.ones_like(masks[:, :1])], dim=1)
        return inputs

    @torch.inference_mode()
    def forward(self, inputs: dict) -> HiddenStates:
        policy, model = self.policy, self.policy.model
        pwe = model.paligemma_with_expert
        images, img_masks = policy._preprocess_images({self.image_key: inputs["images"]})
        embs, pad_masks, att_2d, _, _ = model.embed_prefix_fast(
            images, img_masks, inputs["lang_tokens"], inputs["lang_masks"],
            fast_action_tokens=None, fast_action_masks=None)
        if self._lm_dtype(pwe) == torch.bfloat16:
            embs = embs.to(torch.bfloat16)
        sweep = self.layer_spec != "last"
        decoder = dict(pwe.named_modules())[self.norm_path.rsplit(".", 1)[0]] if sweep else None
        with capture(pwe, [self.norm_path]) as hooked, (
                capture_residual_stream(decoder) if sweep else contextlib.nullcontext()) as stream:
            (prefix_out, _), _ = pwe.forward(
                attention_mask=model._prepare_attention_masks_4d(att_2d, dtype=embs.dtype),
                position_ids=torch.cumsum(pad_masks, dim=1) - 1, past_key_values=None,
                inputs_embeds=[embs, None], use_cache=False, adarms_cond=[None, None])
        hidden = hooked.output
        if hidden.shape != prefix_out.shape or not torch.equal(hidden, prefix_out):
            raise HarnessError(f"hook on {self.norm_path} != prefix_out: the hooked module is "
                               "not the final norm of this forward")
        note_prefix(self.observed, images, inputs["lang_tokens"], inputs["lang_masks"], hidden)
        layers = {"last": hidden}
        if sweep:
            states = stream.hidden_states()
            layers.update({str(i): states[i] for i in layer_indices(self.layer_spec, len(states))})
        return HiddenStates(layers=layers, mask=pad_masks.bool())

    def action_provenance(self) -> dict:
        raise HarnessError(f"{self.family}: this family has no action stream (its actions "
                           "are FAST tokens, there is no action expert), so --action_repr "
                           "(feats_action.pt) cannot be extracted")

    def describe(self) -> dict:
        record = super().describe()
        record["bos_appended"] = "after the padded prompt, mask 1 (sample_actions_fast)"
        return record


def _build(common: Common, opts: dict, stack) -> Pi0FastExtractor:
    from harness.extractors.pi05_standin import tiny_pi0_fast
    return build_with(Pi0FastExtractor, common, opts, tiny_pi0_fast)


SPEC = FamilySpec(
    name="pi0_fast",
    help="LeRobot Pi0-FAST: prefill [images, prompt, BOS], final-norm hook, state-blind prompt",
    build=_build,
    default_ckpt=DEFAULT_CKPT,
    options=options(),
    final_norm_paths={"pi0_fast": NORM_PATHS},
    action_stream=False,
    dtype_policy=DTYPE_POLICY,
    demo=(("pi0-fast-tiny", "tiny", {"split_modalities": True, "layers": "all"}),),
    **SPEC_FIELDS,
)
