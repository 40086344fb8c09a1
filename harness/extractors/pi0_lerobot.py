"""LeRobot Pi0 (PaliGemma + Gemma action expert): prefill-only, final-norm features.

Traps handled here (docs/facts.md §3):
- never `select_action` (its action queue skips the model on most calls); run the prefix
  forward only, as the policy's own prefill does;
- the norm hook must equal the prefix output the forward returns (free check; raise);
- `from_pretrained` loads with strict=False, so mismatched keys would leave random VLM
  weights silently: every key and value is audited against the checkpoint file;
- tokenise as `prepare_language` does (task + "\\n", right pad to
  `config.tokenizer_max_length`); the seed's variant (no "\\n", truncation) is an option;
- no dummy state: only the image and the language tokens enter the prefix.
Speaks the old API bundled with the checkpoint (`modeling_pi0.py`) and LeRobot 0.6's.
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

import numpy as np
import torch

from harness.errors import HarnessError
from harness.extractors.engine.base import Extractor, HiddenStates
from harness.extractors.engine.dtype_policy import DtypePolicy
from harness.extractors.hf_vlm import weights_dtype
from harness.extractors.engine.observed import Observed, note_token_inputs
from harness.extractors.engine.registry import Common, FamilySpec, Option
from harness.extractors.engine.hooks import capture, find_module
from harness.extractors.engine.residual_stream import capture_residual_stream, layer_indices

DEFAULT_CKPT = "HaomingSong/lerobot-pi0-bridge"
HIDDEN_SIZE = 2048
NORM_PATHS = (  # module names under policy.model.paligemma_with_expert, first match wins
    "paligemma.model.language_model.norm",    # transformers 4.52+ (LeRobot's 4.53 fork, 0.6:
                                              # there the norm returns a tuple)
    "paligemma.language_model.model.norm",    # transformers <= 4.51 (GemmaForCausalLM)
    "paligemma.language_model.norm",          # GemmaModel held directly
)
EXPERT_NORM_PATHS = ("gemma_expert.model.norm", "gemma_expert.norm")  # the action expert's
ACTION_SEED = 0  # noise of sample i: torch.Generator(device).manual_seed(ACTION_SEED + i)
SEED_NOISE_SEED = 42  # the seed's script: torch.manual_seed(42 + i) before sample i
ACTION_STATES = ("real", "zeros")
DTYPE_POLICY = DtypePolicy(
    "old LeRobot API (the checkpoint's modeling_pi0.py, PaliGemmaWithExpertModel."
    "to_bfloat16_like_physical_intelligence): PaliGemma (vision tower, projector, language "
    "model) and the expert's decoder layers bfloat16; the expert's final norm and the "
    "state/action/time projections float32",
    root="model.paligemma_with_expert", low_modules=("paligemma",),
    low_params=("language_model.model.layers", "gemma_expert.model.layers", "vision_tower",
                "multi_modal"))
"""The real checkpoint's dtype mix, as its bundled loader leaves it (facts read from
LeRobot's old `paligemma_with_expert.py`; 0.4.4's `to_bfloat16_for_selected_params`
differs: all bf16 but the patch/position embeddings and every RMSNorm)."""


# ------------------------------------------------------------------ loading
def resolve_checkpoint(ckpt: str, revision: str | None = None) -> Path:
    """A local directory, or a hub repo id resolved through the HF cache (offline-aware)."""
    if os.path.isdir(ckpt):
        return Path(ckpt)
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(ckpt, revision=revision))
    except Exception as err:
        raise HarnessError(f"{ckpt}: not a directory and not in the HF cache / hub "
                           f"({type(err).__name__}: {err})") from None


def import_policy_code(directory: Path, code: str = "auto"):
    """(PI0Policy, make_att_2d_masks, api_source): the checkpoint's bundled
    `modeling_pi0.py` when present (old API), else the installed LeRobot's."""
    bundled = directory / "modeling_pi0.py"
    if code in ("auto", "bundled") and bundled.is_file():
        name = "_harness_pi0_" + hashlib.sha1(str(bundled.resolve()).encode()).hexdigest()[:12]
        module = sys.modules.get(name)
        if module is None:
            if str(directory) not in sys.path:  # siblings import by bare name, maybe lazily
                sys.path.insert(0, str(directory))
            try:
                spec = importlib.util.spec_from_file_location(name, bundled)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            except ImportError as err:
                raise HarnessError(
                    f"{bundled}: cannot import the checkpoint's code ({err}). It was written "
                    "for an older LeRobot (imports `lerobot.common.*`): install that release, "
                    "or pass --pi0_code lerobot to use the installed LeRobot's PI0Policy") from None
            sys.modules[name] = module
        return module.PI0Policy, module.make_att_2d_masks, f"bundled:{bundled.name}"
    if code == "bundled":
        raise HarnessError(f"{directory}: no modeling_pi0.py to import")
    try:
        from lerobot.policies.pi0 import modeling_pi0 as module
    except ImportError as err:
        why = "" if bundled.is_file() else " and the checkpoint bundles no modeling_pi0.py"
        raise HarnessError(f"{directory}: LeRobot's PI0Policy is not importable ({err}){why}; "
                           "LeRobot 0.6 needs Python >= 3.12 and its own transformers pin") from None
    return module.PI0Policy, module.make_att_2d_masks, "lerobot:" + module.__name__


def concrete_policy_class(policy_cls) -> tuple[type, list[str]]:
    """The bundled PI0Policy may predate abstract methods a newer LeRobot base class
    declares (e.g. `predict_action_chunk`), so it cannot be instantiated as is. Fill them
    with stubs that raise: prefill-only extraction never calls them."""
    missing = sorted(getattr(policy_cls, "__abstractmethods__", ()))
    if not missing:
        return policy_cls, []

    def unused(self, *args, **kwargs):
        raise HarnessError("not available during prefill-only feature extraction")

    return type(policy_cls.__name__, (policy_cls,), {m: unused for m in missing}), missing


def _checkpoint_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise HarnessError(f"{directory}: no *.safetensors weights to audit")
    return files


def _aliases(model: torch.nn.Module) -> dict[str, set[str]]:
    """State-dict names that share storage (tied weights): saving keeps only one."""
    by_ptr: dict[tuple, set[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        by_ptr.setdefault(key, set()).add(name)
    return {name: names for names in by_ptr.values() for name in names}


def audit_weights(model: torch.nn.Module, directory: Path, allow_missing=(), allow_unexpected=(),
                  check_values: bool = True) -> dict:
    """Compare the model's state dict with the checkpoint's tensors: a key missing from
    the file (not covered by a tied alias), an unexpected key, or a value that differs
    stops the run unless a glob in allow_* names it. Returns the audit summary."""
    from safetensors import safe_open
    files = _checkpoint_files(directory)
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for k in handle.keys():
                where[k] = f
    state = model.state_dict()
    aliases = _aliases(model)
    allowed = lambda key, globs: any(fnmatch.fnmatchcase(key, g) for g in globs)  # noqa: E731
    missing = sorted(k for k in state if k not in where
                     and not (aliases.get(k, set()) & where.keys())
                     and not allowed(k, allow_missing))
    unexpected = sorted(k for k in where if k not in state and not allowed(k, allow_unexpected))
    if missing or unexpected:
        raise HarnessError(
            f"{directory}: checkpoint keys do not match the model "
            f"({len(missing)} missing, e.g. {missing[:5]}; {len(unexpected)} unexpected, "
            f"e.g. {unexpected[:5]}); the loader would leave these weights random. "
            "Fix the environment (transformers/LeRobot versions) or allow them explicitly "
            "with --allow-missing-keys / --allow-unexpected-keys GLOB")
    differing = []
    if check_values:
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for k in handle.keys():
                    if k in state:
                        ref = handle.get_tensor(k).to(state[k].dtype)
                        if ref.shape != state[k].shape or not torch.equal(ref, state[k].cpu()):
                            differing.append(k)
        if differing:
            raise HarnessError(f"{directory}: {len(differing)} weights differ from the file "
                               f"after loading (e.g. {differing[:5]})")
    return {"files": [f.name for f in files], "keys_in_file": len(where),
            "keys_in_model": len(state), "values_checked": check_values,
            "allowed_missing": list(allow_missing), "allowed_unexpected": list(allow_unexpected)}


def _get(root, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


# ------------------------------------------------------------------ extractor
class Pi0LeRobotExtractor(Extractor):
    """Prefill-only Pi0 extractor over either API; see the module docstring."""

    family = "pi0_lerobot"
    extraction_point = "hook on the final Gemma norm (== prefix_out), prefill only"
    eager_prefix = True  # the new API's sample_actions switches the prefix LM to eager

    def __init__(self, ckpt: str = DEFAULT_CKPT, *, device: str = "cpu", dtype: str | None = None,
                 image_key: str | None = None, seed_tokenization: bool = False,
                 allow_missing=(), allow_unexpected=(), check_values: bool = True,
                 revision: str | None = None, code: str = "auto", tokenizer=None,
                 name: str | None = None, layers="last", action_state: str = "real"):
        if action_state not in ACTION_STATES:
            raise HarnessError(f"action_state must be one of {ACTION_STATES}, got {action_state!r}")
        self.ckpt, self.revision, self.code = ckpt, revision, code
        self.name = name or ckpt  # recorded as the model id (a stand-in's temp dir is not)
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.image_key_override, self.seed_tokenization = image_key, seed_tokenization
        self.seed_compat = seed_tokenization  # the seed's tokenisation and action noise
        self.action_state = action_state
        self.states: torch.Tensor | None = None
        self.allow_missing, self.allow_unexpected = tuple(allow_missing), tuple(allow_unexpected)
        self.check_values, self.tokenizer = check_values, tokenizer
        self.layer_spec = layers  # 'last' | 'all' | [hidden_states indices]
        self.policy = None
        self.audit: dict = {}
        self.stubbed: list[str] = []
        self.observed = Observed()

    # -- protocol ---------------------------------------------------------------
    def load(self) -> "Pi0LeRobotExtractor":
        directory = resolve_checkpoint(self.ckpt, self.revision)
        policy_cls, self.make_att_2d_masks, self.api_source = import_policy_code(directory, self.code)
        policy_cls, self.stubbed = concrete_policy_class(policy_cls)
        try:
            policy = policy_cls.from_pretrained(str(directory))
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise HarnessError(f"{directory}: PI0Policy.from_pretrained failed "
                               f"({type(err).__name__}: {err})") from None
        self.audit = audit_weights(policy, directory, self.allow_missing, self.allow_unexpected,
                                   self.check_values)
        if self.dtype is not None:  # parameters only: float32 rotary buffers stay float32
            for param in policy.parameters():
                param.data = param.data.to(self.dtype)
        self.policy = policy.to(self.device).eval()
        self._bind(directory)
        return self

    def _bind(self, directory: Path | None) -> None:
        """Detect the API, the norm module, the image key and the tokenizer."""
        policy = self.policy
        pwe = policy.model.paligemma_with_expert
        self.api = "old" if "fill_kv_cache" in inspect.signature(pwe.forward).parameters else "new"
        if self.api == "new" and self.eager_prefix:  # set now, so the record is what runs
            prefix_attention_as_sample_actions(pwe)
        self.norm_path, _ = find_module(pwe, NORM_PATHS)
        keys = list(policy.config.image_features)
        if self.image_key_override is not None and self.image_key_override not in keys:
            raise HarnessError(f"image key {self.image_key_override!r} not in the config's "
                               f"image features {keys}")
        if not keys:
            raise HarnessError("the policy config declares no image feature")
        self.image_key = self.image_key_override or keys[0]
        if self.tokenizer is None:
            self.tokenizer = self._find_tokenizer(directory)
        self.max_length = int(policy.config.tokenizer_max_length)

    def _find_tokenizer(self, directory: Path | None):
        if directory is not None and (directory / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer
            return AutoTokenizer.from_pretrained(str(directory))
        tok = getattr(self.policy, "language_tokenizer", None)
        if tok is None:
            raise HarnessError("no tokenizer in the checkpoint dir and none on the policy; "
                               "pass one explicitly")
        return tok

    def tokenize(self, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Language tokens and mask, as `prepare_language` builds them (or the seed)."""
        tok = self.tokenizer
        if self.seed_tokenization:  # the seed's script: no "\n", truncation, default side
            out = tok(list(tasks), max_length=self.max_length, truncation=True,
                      padding="max_length", return_tensors="pt")
            return out["input_ids"], out["attention_mask"].bool()
        texts = [t if t.endswith("\n") else t + "\n" for t in tasks]
        rows = tok(texts, padding=False, truncation=False)["input_ids"]
        width = max(self.max_length, max(map(len, rows)))  # no truncation, like the policy
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):  # right padding
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        return ids, mask

    def build_inputs(self, samples) -> dict:
        images = images_01(samples)
        tokens, masks = self.tokenize([task for _, _, task in samples])
        return {"images": images.to(self.device), "lang_tokens": tokens.to(self.device),
                "lang_masks": masks.to(self.device),
                "sample_indices": torch.tensor([int(s[0]) for s in samples])}

    @torch.inference_mode()
    def forward(self, inputs: dict) -> HiddenStates:
        policy, model = self.policy, self.policy.model
        batch = {self.image_key: inputs["images"]}  # image only: no state, no dummy state
        prepare = getattr(policy, "prepare_images", None) or getattr(policy, "_preprocess_images")
        images, img_masks = prepare(batch)
        embs, pad_masks, att_masks = model.embed_prefix(
            images, img_masks, inputs["lang_tokens"], inputs["lang_masks"])
        pwe = model.paligemma_with_expert
        embs = embs.to(self._lm_dtype(pwe))
        att_2d = self.make_att_2d_masks(pad_masks, att_masks)
        to_4d = getattr(model, "_prepare_attention_masks_4d", None)
        kwargs = dict(attention_mask=to_4d(att_2d) if to_4d else att_2d,
                      position_ids=torch.cumsum(pad_masks, dim=1) - 1, past_key_values=None,
                      inputs_embeds=[embs, None], use_cache=False)
        if self.api == "old":
            kwargs["fill_kv_cache"] = True
        else:
            prefix_attention_as_sample_actions(pwe)
        sweep = self.layer_spec != "last"
        decoder = dict(pwe.named_modules())[self.norm_path.rsplit(".", 1)[0]] if sweep else None
        with capture(pwe, [self.norm_path]) as hooked, (
                capture_residual_stream(decoder) if sweep else contextlib.nullcontext()) as stream:
            outputs, _ = pwe.forward(**kwargs)
        prefix_out, hidden = outputs[0], hooked.output
        if hidden.shape != prefix_out.shape or not torch.equal(hidden, prefix_out):
            diff = (hidden.float() - prefix_out.float()).abs().max().item() \
                if hidden.shape == prefix_out.shape else "shape"
            raise HarnessError(f"hook on {self.norm_path} != prefix_out (max diff {diff}): "
                               "the hooked module is not the final norm of this forward")
        note_prefix(self.observed, images, inputs["lang_tokens"], inputs["lang_masks"], hidden)
        layers = {"last": hidden}
        if sweep:  # the residual stream between layers (harness.extractors.engine.residual_stream)
            states = stream.hidden_states()
            layers.update({str(i): states[i] for i in layer_indices(self.layer_spec, len(states))})
        return HiddenStates(layers=layers, mask=pad_masks.bool())

    def set_states(self, states: torch.Tensor, indices=None) -> None:
        """The data set's raw states as the robot reported them (what the policy would be
        fed): row p is sample `indices[p]` (row p = sample p without indices);
        `--action_repr` with `action_state = "real"` reads them."""
        self.states = torch.as_tensor(states, dtype=torch.float32)
        rows = range(len(self.states)) if indices is None else indices
        self.state_row = {int(i): p for p, i in enumerate(rows)}

    def action_state_input(self, indices, bsize: int) -> torch.Tensor:
        """(B, max_state_dim) float32: the real state through the policy's own
        `normalize_inputs` and `prepare_state` (what `select_action` feeds), or zeros."""
        policy, config = self.policy, self.policy.config
        if self.action_state == "zeros":
            return torch.zeros(bsize, config.max_state_dim, device=self.device)
        if self.states is None:
            raise HarnessError("pi0_lerobot: action_state 'real' needs the data set's states "
                               "(extract passes them; in code call set_states), or choose "
                               "action_state 'zeros'")
        normalize = getattr(policy, "normalize_inputs", None)
        if normalize is None or not hasattr(policy, "prepare_state"):
            raise HarnessError(f"pi0_lerobot: {self.api_source} has no normalize_inputs / "
                               "prepare_state to feed the real state the policy's way")
        missing = [int(i) for i in indices if int(i) not in self.state_row]
        if missing:
            raise HarnessError(f"pi0_lerobot: no state given for samples {missing[:5]}")
        rows = torch.as_tensor([self.state_row[int(i)] for i in indices])
        raw = self.states[rows].to(self.device)
        want = _state_dim(config)
        if want is not None and raw.shape[1] != want:
            raise HarnessError(f"pi0_lerobot: the data's states have {raw.shape[1]} dims, the "
                               f"policy's observation.state has {want}")
        batch = normalize({"observation.state": raw})
        return policy.prepare_state(batch).to(torch.float32)

    def action_noise(self, indices, shape) -> torch.Tensor:
        """(B, *shape) float32 noise drawn on the device, as LeRobot's `sample_noise` draws
        it, one generator per sample (batch-independent): seeded ACTION_SEED + index, or
        under --seed_compat 42 + index (the seed's `torch.manual_seed(42 + i)`)."""
        base = SEED_NOISE_SEED if self.seed_compat else ACTION_SEED
        rows = [torch.randn(shape, dtype=torch.float32, device=self.device,
                            generator=torch.Generator(device=self.device).manual_seed(base + int(i)))
                for i in indices]
        return torch.stack(rows)

    @torch.inference_mode()
    def action_features(self, inputs: dict) -> torch.Tensor:
        """(B, D_expert): the action expert's final-norm output at the LAST denoising step
        of the policy's own `sample_actions`, mean over the action tokens (the last
        n_action_steps suffix tokens). The policy is reset first; noise and state as
        `action_noise` / `action_state_input` say."""
        policy, model = self.policy, self.policy.model
        if self.api != "old" or not hasattr(model, "sample_actions"):
            raise HarnessError(f"pi0_lerobot: --action_repr needs the old LeRobot API "
                               f"(sample_actions/denoise_step); this policy is {self.api_source}")
        policy.reset()
        prepare = getattr(policy, "prepare_images", None) or getattr(policy, "_preprocess_images")
        images, img_masks = prepare({self.image_key: inputs["images"]})
        config = policy.config
        indices = inputs["sample_indices"].tolist()
        noise = self.action_noise(indices, (config.n_action_steps, config.max_action_dim))
        state = self.action_state_input(indices, len(indices))
        self.observed.note("action_state", "zeros" if not state.any() else "real")
        self.observed.note("action_noise_dtype", str(noise.dtype).removeprefix("torch."))
        pwe = model.paligemma_with_expert
        with capture(pwe, list(EXPERT_NORM_PATHS)) as hooked:
            model.sample_actions(images, img_masks, inputs["lang_tokens"], inputs["lang_masks"],
                                 state, noise=noise)
        steps = getattr(config, "num_steps", None)
        if steps is not None and hooked.calls != steps:
            raise HarnessError(f"the action expert's norm ran {hooked.calls} times for "
                               f"{steps} denoising steps: not the loop this extractor reads")
        return hooked.output[:, -config.n_action_steps:].float().mean(dim=1)

    def state_in_input(self, output: str) -> bool:
        """Whether the robot state enters `output`: only the action expert's, fed the real
        state (the prefix never sees it)."""
        return output == "feats_action" and self.action_state == "real"

    def action_provenance(self) -> dict:
        config = self.policy.config
        base = SEED_NOISE_SEED if self.seed_compat else ACTION_SEED
        state = ("real: the data's raw state through policy.normalize_inputs and "
                 "prepare_state (as select_action feeds it)" if self.action_state == "real"
                 else "zeros (in normalised space: the data set's mean state)")
        return {"file": "feats_action.pt",
                "point": "paligemma_with_expert." + find_module(
                    self.policy.model.paligemma_with_expert, EXPERT_NORM_PATHS)[0]
                + " output at the last denoising step of sample_actions",
                "tokens": f"the last n_action_steps = {config.n_action_steps} suffix tokens, mean",
                "denoising_steps": getattr(config, "num_steps", None),
                "noise": f"float32 on {self.device.type}: torch.Generator(device)."
                         f"manual_seed({base} + sample index)"
                         + (" (the seed's torch.manual_seed(42 + i))" if self.seed_compat else ""),
                "action_state": self.action_state, "state_input": state,
                "policy_reset": "before every batch"}

    image_token_rule = "the prefix's image embeddings (its first prefix_len - lang_len positions)"

    def modality_masks(self, inputs: dict, tasks, hidden: HiddenStates):
        """Image and task masks over the prefix: image embeddings first, then the language
        tokens, in which the task is searched (`harness.extractors.engine.modality`)."""
        from harness.extractors.engine.modality import ModalityMasks, task_mask
        valid = hidden.mask
        lang = inputs["lang_tokens"].to(valid.device)
        n_image = valid.shape[1] - lang.shape[1]
        ids = torch.cat([lang.new_full((lang.shape[0], n_image), -1), lang], dim=1)
        image = valid.clone()
        image[:, n_image:] = False
        text, reasons = task_mask(ids, valid, tasks, self.tokenizer, image)
        return ModalityMasks(image=image, text=text, text_fallback=reasons)

    def describe(self) -> dict:
        policy = self.policy
        pwe = policy.model.paligemma_with_expert
        norm = dict(pwe.named_modules())[self.norm_path]
        return {
            "model": self.name, "revision": self.revision,
            "api": self.api, "api_source": self.api_source, "class": type(policy).__name__,
            "extraction_point": f"{self.extraction_point}: paligemma_with_expert.{self.norm_path}",
            "pooling_mask": "prefix_pad_masks",
            "hidden_size": int(norm.weight.shape[0]) if hasattr(norm, "weight") else None,
            "dtype": self._lm_dtype(pwe), "image_key": self.image_key,
            "image_keys_in_config": list(policy.config.image_features),
            "tokenization": "seed (no newline, truncation)" if self.seed_tokenization
            else "prepare_language (task + newline, right pad)",
            "seed_compat": self.seed_tokenization,
            "image_path": "the policy's own image preprocessing (resize_with_pad, [-1, 1]); "
                          "the seed's path too",
            "tokenizer_max_length": self.max_length, "padding_side": self._padding_side(),
            "weights_dtype": weights_dtype(policy),
            "state_input": "none", "weight_audit": self.audit,
            "stubbed_abstract_methods": self.stubbed,
            **({} if self.layer_spec == "last" else {  # a plain run's identity unchanged
                "layers": self.layer_spec,
                "layer_capture": "pre-hook on layers[i].input_layernorm (= hidden_states[i]); "
                                 "final norm output (= hidden_states[L])"}),
        }

    def _padding_side(self) -> str:
        """Right for the policy's own tokenisation (built here); the seed's path pads on
        whatever side the tokenizer has (Gemma's fast tokenizer: left)."""
        return self.tokenizer.padding_side if self.seed_tokenization else "right"

    def attention_implementation(self) -> str | None:
        """The attention that runs: the old API's decoder picks its own interface from
        PI0Config.attention_implementation (on the PaliGemmaWithExpert config); the new
        API runs the prefix language model's `_attn_implementation` (eager, set at load)."""
        pwe = self.policy.model.paligemma_with_expert
        chosen = getattr(getattr(pwe, "config", None), "attention_implementation", None)
        if self.api == "old" and chosen is not None:
            return chosen
        return getattr(lm_config(pwe), "_attn_implementation", None)

    @staticmethod
    def _lm_dtype(pwe) -> torch.dtype:
        """The dtype the language model runs in (prefix embeddings are cast to it)."""
        for path in ("paligemma.model.language_model", "paligemma.language_model"):
            module = _get(pwe, path)
            if module is not None:
                return next(module.parameters()).dtype
        return next(pwe.parameters()).dtype


def images_01(samples) -> torch.Tensor:
    """(B, 3, H, W) float32 in [0, 1], as LeRobot's policies take camera frames."""
    pixels = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for _, image, _ in samples]
    if len({p.shape for p in pixels}) > 1:  # the policies take one (B, C, H, W) tensor
        raise HarnessError(f"images of samples {[s[0] for s in samples]} differ in size "
                           f"({sorted({p.shape[:2] for p in pixels})}); use batch size 1")
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()


def prefix_attention_as_sample_actions(pwe) -> None:
    """LeRobot 0.4.x `PI0Pytorch.sample_actions` sets the prefix language model to eager
    attention right before its prefix forward; the model is built with transformers'
    default (sdpa), which moves features by ~5e-7. Do the same (checked bit-equal against
    the real LeRobot 0.4.4 in tests/equivalence/test_lerobot04_pi0.py)."""
    config = lm_config(pwe)
    if config is not None and hasattr(config, "_attn_implementation"):
        config._attn_implementation = "eager"


def lm_config(pwe):
    """The prefix language model's config (transformers 4.52+ layout first), or None."""
    for path in ("paligemma.model.language_model.config", "paligemma.language_model.config"):
        config = _get(pwe, path)
        if config is not None:
            return config
    return None


def _state_dim(config) -> int | None:
    """The policy's observation.state size from its config's input features (None if absent)."""
    feature = (getattr(config, "input_features", None) or {}).get("observation.state")
    shape = feature.get("shape") if isinstance(feature, dict) else getattr(feature, "shape", None)
    return int(shape[0]) if shape else None


def note_prefix(observed: Observed, images: list, lang_tokens: torch.Tensor,
                lang_masks: torch.Tensor, hidden: torch.Tensor) -> None:
    """What one prefix forward was fed: image size after the policy's preprocessing,
    image tokens (prefix length minus language length), padding side, hidden dtype."""
    for image in images:
        observed.note("image_size_fed", f"{image.shape[-1]}x{image.shape[-2]}")
    n_image = hidden.shape[1] - lang_tokens.shape[1]
    observed.note("image_tokens", n_image)
    note_token_inputs(observed, None, lang_masks, None)
    observed.note("hidden_dtype", str(hidden.dtype).removeprefix("torch."))


def _build(common: Common, opts: dict, stack) -> Pi0LeRobotExtractor:
    path = common.ckpt
    dtype = common.dtype
    if common.tiny:
        import tempfile

        from harness.extractors.standins import save_tiny_pi0_checkpoint
        path = stack.enter_context(tempfile.TemporaryDirectory(prefix="tiny_pi0_"))
        real_mix = dtype == "checkpoint"  # the stand-in's loader applies DTYPE_POLICY
        save_tiny_pi0_checkpoint(path, new_api=common.ckpt == "tiny:new",
                                 precision=DTYPE_POLICY.low if real_mix else "float32")
        dtype = None if real_mix else dtype
    return Pi0LeRobotExtractor(
        path, name=common.ckpt, device=common.device, dtype=dtype,
        image_key=opts["image_key"],
        seed_tokenization=opts["seed_tokenization"] or opts["seed_compat"],
        allow_missing=opts["allow_missing_keys"], allow_unexpected=opts["allow_unexpected_keys"],
        revision=common.revision, code=opts["pi0_code"], layers=common.layers,
        action_state=opts["action_state"])


SPEC = FamilySpec(
    name="pi0_lerobot",
    help="LeRobot Pi0: prefill-only, final-norm hook, audited weights",
    build=_build,
    default_ckpt=DEFAULT_CKPT,
    stand_in="tiny",
    stand_in_help="'tiny' (old LeRobot API) or 'tiny:new' (LeRobot 0.6 shape)",
    auto_dtype=None,
    options=(
        Option("image_key", str, None, "override the image key from config.image_features"),
        Option("seed_compat", bool, False,
               "the seed script's path: its tokenisation (no trailing newline, truncation, "
               "the tokenizer's padding side) and action noise (torch.manual_seed(42 + i)); "
               "its image path is the policy's own"),
        Option("seed_tokenization", bool, False, "alias of --seed_compat (older name)"),
        Option("action_state", str, "real", "the state the action expert sees with "
               "--action_repr: real (the data's state through the policy's normalisation, "
               "as the policy runs; the features then contain the state) or zeros",
               choices=ACTION_STATES),
        Option("allow_missing_keys", list, [], "model weights allowed to be absent from the "
               "checkpoint", metavar="GLOB"),
        Option("allow_unexpected_keys", list, [], "checkpoint tensors allowed to match no "
               "model weight", metavar="GLOB"),
        Option("pi0_code", str, "auto", "the checkpoint's modeling_pi0.py (old API) or the "
               "installed LeRobot", choices=("auto", "bundled", "lerobot")),
    ),
    final_norm_paths={"pi0": NORM_PATHS},
    action_stream=True,
    dtype_policy=DTYPE_POLICY,
    demo=(("pi0-lerobot-tiny", "tiny", {"split_modalities": True, "layers": "all",
                                         "action_repr": True}),),
)
