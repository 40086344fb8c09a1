"""LeRobot Pi0.5 (PaliGemma + an adaRMS-conditioned action expert): prefill-only,
final-norm features with a STATE-BLIND prompt by default.

Traps handled here (docs/facts.md §8):
- LeRobot 0.4.4's Pi0.5 processor writes the normalised state, padded to max_state_dim and
  discretised into 256 bins, INTO THE PROMPT: "Task: {task}, State: {bins};\\nAction: "
  (task stripped, "_" and "\\n" -> " "), right-padded to max length (200). The prefix is
  bidirectional, so every pooled token would see the state and CKNNA against the same
  state would measure the input, not the model. Default: the same template without the
  state field, "Task: {task};\\nAction: " (recorded); `--state_in_input` writes the data
  directory's states the policy's way (normalised by the checkpoint's saved pre-processor
  when it has one, else as stored; recorded);
- the prefix is stock PaliGemma: the same prefill as LeRobot 0.4.4's Pi0 (`embed_prefix`,
  4-D mask, eager attention as `sample_actions` sets it), run by the Pi0 extractor's code,
  hook on `paligemma.model.language_model.norm` == prefix_out (checked);
- the action expert's norms need LeRobot's git-only transformers fork (adaRMS): on stock
  transformers `--action_repr` is refused with one line, never replaced by something else;
- weights are audited against the file (LeRobot loads with strict=False).
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch

from harness.errors import HarnessError
from harness.extractors.engine.base import HiddenStates
from harness.extractors.engine.dtype_policy import FLOAT32, DtypePolicy
from harness.extractors.lerobot_state import (SPEC_FIELDS, StateInput, build_dtype, family_options,
                                              import_lerobot, parameter_dtypes)
from harness.extractors.pi0_lerobot import (NORM_PATHS, Pi0LeRobotExtractor, audit_weights,
                                            images_01, resolve_checkpoint)
from harness.extractors.engine.registry import Common, FamilySpec, Option

DEFAULT_CKPT = "lerobot/pi05_base"
TOKENIZER = "google/paligemma-3b-pt-224"  # the tokenizer LeRobot 0.4.4's processors load
KEEP_FLOAT32 = ("vision_tower.vision_model.embeddings.patch_embedding.weight",
                "vision_tower.vision_model.embeddings.patch_embedding.bias",
                "vision_tower.vision_model.embeddings.position_embedding.weight",
                "input_layernorm", "post_attention_layernorm", "model.norm")
DTYPE_POLICY = DtypePolicy(
    "the config's `dtype`: bfloat16 (the release) -> paligemma_with_expert in bfloat16 except "
    "the SigLIP patch/position embeddings and every RMSNorm (input_layernorm, "
    "post_attention_layernorm, model.norm), kept float32; the action/time projections "
    "float32. float32 -> float32 throughout (LeRobot 0.4.4's to_bfloat16_for_selected_params)",
    root="model.paligemma_with_expert", float32_params=KEEP_FLOAT32)
"""The checkpoint's dtype mix when its config says bfloat16 (Pi0-FAST's loader applies the
same rule to its PaliGemma)."""


def release_dtype_policy(policy) -> None:
    """Put a policy built here (a stand-in) in the dtypes LeRobot's loader gives a
    checkpoint whose config says `dtype` (DTYPE_POLICY)."""
    FLOAT32.apply(policy)
    if getattr(policy.config, "dtype", "float32") == "bfloat16":
        DTYPE_POLICY.apply(policy)


def discretise(state: torch.Tensor) -> np.ndarray:
    """LeRobot 0.4.4's prompt state: 256 equal bins over [-1, 1] (np.digitize - 1)."""
    return np.digitize(state.cpu().numpy(), bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1


def clean_task(task: str) -> str:
    return task.strip().replace("_", " ").replace("\n", " ")


def stock_transformers_refusal(family: str) -> str | None:
    """Why the action expert cannot run here (stock transformers), or None on the fork:
    the fork's Gemma RMSNorm takes the adaRMS condition `cond`."""
    import transformers
    from transformers.models.gemma import modeling_gemma
    if "cond" in inspect.signature(modeling_gemma.GemmaRMSNorm.forward).parameters:
        return None
    return (f"{family}: --action_repr needs LeRobot's transformers fork (adaRMS-conditioned "
            f"norms in the action expert); stock transformers {transformers.__version__} is "
            "installed, and running the expert without them would be another model")


class Pi05Extractor(Pi0LeRobotExtractor):
    """Pi0.5 prefill over LeRobot 0.4.4's PI05Policy (or a policy given: the stand-in)."""

    family = "pi05"
    extraction_point = "hook on the final Gemma norm (== prefix_out), prefill only"
    policy_module, policy_class = "lerobot.policies.pi05.modeling_pi05", "PI05Policy"
    prompt_with_state = "Task: {task}, State: {state};\nAction: "
    prompt_blind = "Task: {task};\nAction: "

    def __init__(self, ckpt: str = DEFAULT_CKPT, *, policy=None, tokenizer=None,
                 make_att_2d_masks=None, state_in_input: bool = False,
                 tokenizer_name: str = TOKENIZER, **kw):
        super().__init__(ckpt, tokenizer=tokenizer, **kw)
        self.given_policy, self.given_masks = policy, make_att_2d_masks
        self.with_state, self.tokenizer_name = state_in_input, tokenizer_name
        self.states = StateInput()

    def load(self) -> "Pi05Extractor":
        directory = None
        if self.given_policy is not None:
            policy, self.api_source = self.given_policy, "given"
            self.make_att_2d_masks = self.given_masks
            if self.make_att_2d_masks is None:
                from harness.extractors.standins import make_att_2d_masks
                self.make_att_2d_masks = make_att_2d_masks
            if self.dtype is None:
                release_dtype_policy(policy)
        else:
            directory = resolve_checkpoint(self.ckpt, self.revision)
            policy = self._from_pretrained(directory)
        if self.dtype is not None:
            for param in policy.parameters():
                param.data = param.data.to(self.dtype)
        self.policy = policy.to(self.device).eval()
        if self.tokenizer is None:
            self.tokenizer = self._load_tokenizer(directory)
        self._bind(directory)
        return self

    def _from_pretrained(self, directory: Path):
        module = import_lerobot(self.family, self.policy_module, self.policy_class)
        try:
            policy = getattr(module, self.policy_class).from_pretrained(str(directory))
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as err:
            raise HarnessError(f"{directory}: {self.policy_class}.from_pretrained failed "
                               f"({type(err).__name__}: {err})") from None
        self.audit = audit_weights(policy, directory, self.allow_missing, self.allow_unexpected,
                                   self.check_values)
        self.states.use_checkpoint_normaliser(directory)
        self.make_att_2d_masks = getattr(module, "make_att_2d_masks", None)  # none in Pi0-FAST
        self.api_source = "lerobot:" + module.__name__
        return policy

    def _load_tokenizer(self, directory: Path | None):
        """The checkpoint directory's tokenizer if it has one, else --tokenizer (a local
        directory or a hub id in the HF cache)."""
        from transformers import AutoTokenizer
        source = str(directory) if directory is not None and \
            (directory / "tokenizer_config.json").is_file() else self.tokenizer_name
        try:
            tok = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise HarnessError(f"--tokenizer {source}: cannot load ({err}); pass a local "
                               "directory holding the PaliGemma tokenizer") from None
        self.tokenizer_name = source
        return tok

    # -- inputs -----------------------------------------------------------------
    def set_states(self, states: torch.Tensor, indices=None) -> None:
        """The data directory's states (written into the prompt only with --state_in_input)."""
        self.states.set_states(states, indices)

    def state_in_input(self, output: str) -> bool:
        """With --state_in_input the state is in the prompt, and the prefix is
        bidirectional: every prefix token, so every prefix file, sees it."""
        return self.with_state and output != "feats_action"

    def prompts(self, tasks, sample_indices) -> list[str]:
        """The policy's prompt (with the discretised state) or the state-blind one."""
        if not self.with_state:
            return [self.prompt_blind.format(task=clean_task(t)) for t in tasks]
        bins = discretise(self.states.rows(sample_indices, int(self.policy.config.max_state_dim)))
        return [self.prompt_with_state.format(task=clean_task(t), state=" ".join(map(str, row)))
                for t, row in zip(tasks, bins)]

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """As LeRobot's TokenizerProcessorStep here: right pad to max_length, truncation."""
        self.tokenizer.padding_side = "right"
        out = self.tokenizer(list(prompts), max_length=self.max_length, truncation=True,
                             padding="max_length", return_tensors="pt")
        return out["input_ids"], out["attention_mask"].bool()

    def build_inputs(self, samples) -> dict:
        indices = [int(s[0]) for s in samples]
        tokens, masks = self.tokenize(self.prompts([task for _, _, task in samples], indices))
        self.observed.note("state_in_prompt", self.with_state)
        return {"images": images_01(samples).to(self.device), "lang_tokens": tokens.to(self.device),
                "lang_masks": masks.to(self.device), "sample_indices": torch.tensor(indices)}

    def modality_masks(self, inputs: dict, tasks, hidden: HiddenStates):
        """The task is searched as the prompt writes it (cleaned)."""
        return super().modality_masks(inputs, [clean_task(t) for t in tasks], hidden)

    # -- action stream ----------------------------------------------------------
    def action_refusal(self) -> str | None:
        """Why --action_repr is refused on this install, in one line (the contract suite
        asserts this refusal instead of extracting)."""
        return stock_transformers_refusal(self.family) or (
            f"{self.family}: --action_repr on LeRobot's transformers fork is not implemented "
            "in this harness")

    def action_provenance(self) -> dict:
        raise HarnessError(self.action_refusal())

    def action_features(self, inputs: dict) -> torch.Tensor:
        raise HarnessError(self.action_refusal())

    def _padding_side(self) -> str:
        """The side the tokenizer padded on (`tokenize` sets it, as LeRobot's step)."""
        return self.tokenizer.padding_side

    def describe(self) -> dict:
        record = super().describe()
        template = self.prompt_with_state if self.with_state else self.prompt_blind
        record.update({
            "prompt_template": template.replace("\n", "\\n"),
            "tokenization": "LeRobot 0.4.4 processor: cleaned task (strip, '_' and newline -> "
                            "space), right pad to max_length, truncation",
            "padding": "max_length", "tokenizer": self.tokenizer_name,
            "state_in_input": self.with_state,
            "state_input": (f"{self.states.describe()}, discretised into 256 bins over [-1, 1] in "
                            "the prompt") if self.with_state else
            "none: the state-blind prompt (the policy's template without the state field)",
            "seed_compat": False,
            "parameter_dtypes": parameter_dtypes(self.policy.model, {
                "paligemma": "paligemma_with_expert.paligemma",
                "language_model_norm": "paligemma_with_expert." + self.norm_path}),
            "dtype_policy": "as given: --dtype" if self.dtype is not None else DTYPE_POLICY.summary,
        })
        for key in ("stubbed_abstract_methods",):
            record.pop(key, None)
        return record


def build_with(cls, common: Common, opts: dict, stand_in):
    """The extractor of a Pi0.5-like family: the real checkpoint, or `stand_in()`'s
    (policy, tokenizer) for --ckpt tiny."""
    kw = dict(name=common.ckpt, device=common.device, dtype=build_dtype(common.dtype),
              image_key=opts["image_key"], state_in_input=opts["state_in_input"],
              allow_missing=opts["allow_missing_keys"],
              allow_unexpected=opts["allow_unexpected_keys"], revision=common.revision,
              layers=common.layers, tokenizer_name=opts["tokenizer"])
    if common.tiny:
        policy, tokenizer = stand_in()
        return cls(common.ckpt, policy=policy, tokenizer=tokenizer, **kw)
    return cls(common.ckpt, **kw)


def _build(common: Common, opts: dict, stack) -> Pi05Extractor:
    from harness.extractors.pi05_standin import tiny_pi05
    return build_with(Pi05Extractor, common, opts, tiny_pi05)


def options() -> tuple[Option, ...]:
    """The options Pi0.5 and Pi0-FAST share."""
    return (*family_options("write the data directory's states into the prompt as the "
                            "policy's processor does (discretised, 256 bins); recorded. "
                            "Default: the same template without the state field"),
            Option("tokenizer", str, TOKENIZER, "PaliGemma tokenizer (local directory or "
                   "cached hub id) when the checkpoint directory has none"))


SPEC = FamilySpec(
    name="pi05",
    help="LeRobot Pi0.5: prefill-only, final-norm hook, state-blind prompt by default",
    build=_build,
    default_ckpt=DEFAULT_CKPT,
    options=options(),
    final_norm_paths={"pi05": NORM_PATHS},
    action_stream=True,
    dtype_policy=DTYPE_POLICY,
    demo=(("pi05-tiny", "tiny", {"split_modalities": True, "layers": "all"}),),
    **SPEC_FIELDS,
)
