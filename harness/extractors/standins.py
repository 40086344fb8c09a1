"""Tiny random-weight stand-ins for SpatialVLA and LeRobot Pi0.

The real checkpoints (4 B and 3 B parameters, custom code, old transformers) cannot run
in CI, so the extractors' real code paths are driven by these: same transformers classes
(PaliGemma with Gemma2 / Gemma text), same call conventions (SpatialVLA processor kwargs,
the old LeRobot `PI0Policy` API), a few hundred thousand parameters.
Written for this project from the public descriptions of those APIs; no code copied.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from harness.extractors import tiny

SEED = tiny.SEED
HIDDEN = tiny.HIDDEN
IMAGE = tiny.IMAGE  # SigLIP input side; patch 8 -> 16 image tokens
N_IMAGE_TOKENS = (tiny.IMAGE // tiny.PATCH) ** 2
IMAGE_TOKEN_ID = tiny.IMAGE_TOKEN
BRIDGE_UNNORM_KEY = "bridge_orig/1.0.0"
PI0_IMAGE_KEY = "observation.images.image_0"


def char_tokenizer(padding_side: str = "right"):
    """The engine's character tokenizer, plus a `<bos>` prepended like Gemma's."""
    from tokenizers import processors
    tok = tiny.tokenizer(padding_side)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", tiny.BOS)])
    return tok


def tiny_paligemma(text: str = "gemma", seed: int = SEED, attn: str = "eager"):
    """PaliGemma (text "gemma") or PaliGemma2 ("gemma2") from the engine's tiny zoo."""
    model, _ = tiny.build("paligemma2" if text == "gemma2" else "paligemma", seed=seed, attn=attn)
    return model


_set_attn = tiny._set_attn


def language_model(paligemma: nn.Module) -> nn.Module:
    """The bare Gemma decoder inside a PaliGemma, across the 4.47 / 4.52+ layouts."""
    inner = getattr(paligemma, "model", None)
    if inner is not None and hasattr(inner, "language_model"):
        return inner.language_model
    lm = paligemma.language_model
    return getattr(lm, "model", lm)


# ---------------------------------------------------------------- SpatialVLA
class TinySpatialVLAProcessor:
    """Mimics SpatialVLA's processor call: `(images, text, unnorm_key, do_normalize,
    return_tensors)` -> input_ids, attention_mask, pixel_values, intrinsic; prompt is
    image tokens + bos + task + "\\n"; pads left. Records every call's keyword arguments."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer or char_tokenizer(padding_side="left")
        self.tokenizer.padding_side = "left"
        self.statistics = {BRIDGE_UNNORM_KEY: {"intrinsic": [[40.0, 0, 16], [0, 40.0, 16], [0, 0, 1]]}}
        self.calls: list[dict] = []

    def __call__(self, images=None, text=None, unnorm_key=None, return_tensors="pt",
                 padding="longest", do_normalize=True, **kwargs):
        from transformers import BatchFeature
        texts = [text] if isinstance(text, str) else list(text)
        imgs = images if isinstance(images, (list, tuple)) else [images]
        if len(imgs) != len(texts):
            raise ValueError(f"{len(imgs)} images for {len(texts)} prompts")
        self.calls.append(dict(unnorm_key=unnorm_key, do_normalize=do_normalize,
                               padding=padding, return_tensors=return_tensors, **kwargs))
        tok = self.tokenizer
        rows = [[IMAGE_TOKEN_ID] * N_IMAGE_TOKENS + [tok.bos_token_id]
                + tok.encode(t + "\n", add_special_tokens=False) for t in texts]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding, as SpatialVLA's tokenizer does
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
        mean_std = (0.5, 0.5) if do_normalize else (0.0, 1.0)
        pixels = torch.from_numpy(np.stack([tiny._pixels(im, IMAGE, *mean_std) for im in imgs]))
        stats = self.statistics.get(unnorm_key)
        intrinsic = torch.tensor(stats["intrinsic"] if stats else np.eye(3), dtype=torch.float32)
        data = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                    intrinsic=intrinsic.expand(len(rows), 3, 3).clone())
        return BatchFeature(data, tensor_type=return_tensors)


class TinySpatialVLA(nn.Module):
    """A PaliGemma2 standing in for SpatialVLAForConditionalGeneration: it normalises
    pixels itself (so a processor that normalised too would double it), requires the
    `intrinsic` tensor, and attends bidirectionally over the prompt like the real model
    in eager mode."""

    def __init__(self, seed: int = SEED):
        super().__init__()
        self.paligemma = tiny_paligemma("gemma2", seed=seed)
        self.config = self.paligemma.config
        self.last_intrinsic: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids, attention_mask, pixel_values, intrinsic, position_ids=None,
                output_hidden_states=None, use_cache=None, return_dict=True, **kwargs):
        if intrinsic.shape != (input_ids.shape[0], 3, 3):
            raise ValueError(f"intrinsic must be (B, 3, 3), got {tuple(intrinsic.shape)}")
        self.last_intrinsic = intrinsic.detach().clone()
        pixel_values = (pixel_values - 0.5) / 0.5  # the model normalises inside
        return self.paligemma(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
            token_type_ids=torch.zeros_like(input_ids), position_ids=position_ids,
            output_hidden_states=output_hidden_states, use_cache=use_cache,
            return_dict=return_dict, **kwargs)


def tiny_spatialvla(seed: int = SEED):
    """(model, processor) pair for the SpatialVLA extractor's stand-in path."""
    return TinySpatialVLA(seed=seed).eval(), TinySpatialVLAProcessor()


# ---------------------------------------------------------------- Pi0 (old LeRobot API)
def make_att_2d_masks(pad_masks: torch.Tensor, att_masks: torch.Tensor) -> torch.Tensor:
    """Block-causal 2-D mask: token i sees j when j's block starts no later than i's
    (cumulative att flags) and both are real tokens."""
    blocks = torch.cumsum(att_masks.long(), dim=1)
    see = blocks[:, None, :] <= blocks[:, :, None]
    return see & (pad_masks[:, None, :] & pad_masks[:, :, None])


@dataclass
class TinyPI0Config:
    """The fields of LeRobot's PI0Config that prefill-only extraction reads."""
    input_features: dict = field(default_factory=lambda: {
        PI0_IMAGE_KEY: {"type": "VISUAL", "shape": [3, 48, 48]},
        "observation.state": {"type": "STATE", "shape": [8]},
    })
    tokenizer_max_length: int = 24
    resize_imgs_with_padding: tuple = (IMAGE, IMAGE)
    empty_cameras: int = 0
    n_action_steps: int = 4
    chunk_size: int = 4
    max_state_dim: int = 8
    max_action_dim: int = 8
    num_steps: int = 3
    precision: str = "float32"
    """'bfloat16': the real checkpoint's dtype mix (the pi0_lerobot family's dtype_policy), applied by
    the constructor as LeRobot's PaliGemmaWithExpertModel does; 'float32': the exact tier."""
    attention_implementation: str = "eager"
    """PI0Config.attention_implementation: what the old API's attention interface runs."""

    @property
    def image_features(self) -> dict:
        return {k: v for k, v in self.input_features.items() if v["type"] == "VISUAL"}

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        out["resize_imgs_with_padding"] = list(self.resize_imgs_with_padding)
        return out


def resize_with_pad(img: torch.Tensor, height: int, width: int, pad_value: float = 0.0):
    """Aspect-preserving bilinear resize, padded at the top/left like LeRobot's Pi0."""
    h, w = img.shape[-2:]
    ratio = max(w / width, h / height)
    new_h, new_w = int(h / ratio), int(w / ratio)
    out = nn.functional.interpolate(img, size=(new_h, new_w), mode="bilinear", align_corners=False)
    return nn.functional.pad(out, (width - new_w, 0, height - new_h, 0), value=pad_value)


class TinyPaliGemmaWithExpert(nn.Module):
    """PaliGemma + Gemma action expert; prefix-only forward as the old API calls it."""

    def __init__(self, seed: int, attn: str = "eager"):
        super().__init__()
        self.paligemma = tiny_paligemma("gemma", seed=seed, attn=attn)
        self.gemma_expert, _ = tiny.build("gemma", seed=seed + 1)

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        out = self.paligemma.get_image_features(image)
        return getattr(out, "pooler_output", out)  # 5.x returns a model output

    def embed_language_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return language_model(self.paligemma).embed_tokens(tokens)

    def forward(self, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, fill_kv_cache=None):
        prefix, suffix = inputs_embeds
        if prefix is None:  # a denoising step against the prefix "cache"
            return [None, self._suffix(past_key_values, attention_mask, position_ids, suffix)], None
        out, _ = self._prefix(attention_mask, position_ids, inputs_embeds)
        cache = PrefixCache(prefix, attention_mask, position_ids) if fill_kv_cache else None
        return out, cache

    def _suffix(self, cache: "PrefixCache", attention_mask, position_ids, suffix):
        """The expert's tokens through both decoders, layer by layer as the old API runs
        them (prefix and suffix attend jointly; each stream keeps its own weights). The
        stand-in's "KV cache" is the prefix input itself, recomputed each step: slower,
        same values as a cache (the prefix never sees the suffix)."""
        streams = [language_model(self.paligemma), self.gemma_expert.model]
        hidden = [cache.embeds, suffix]
        positions = torch.cat([cache.position_ids, position_ids], dim=1)
        full = torch.zeros(attention_mask.shape[0], positions.shape[1], positions.shape[1],
                           dtype=torch.bool, device=suffix.device)
        n = cache.embeds.shape[1]
        full[:, :n, :n] = cache.attention_mask
        full[:, n:] = attention_mask
        cos, sin = _rotary(streams[0])(suffix.float(), positions)
        for layer_idx in range(len(streams[0].layers)):
            layers = [decoder.layers[layer_idx] for decoder in streams]
            # dtypes as the old API runs them: each stream's q/k/v input is cast to its
            # layer weights' dtype; the o_proj output keeps its dtype after the residual
            q, k, v = zip(*[_qkv(layer, layer.input_layernorm(h).to(layer.self_attn.q_proj.weight.dtype))
                            for layer, h in zip(layers, hidden)])
            q, k = _rope(torch.cat(q, 2), cos, sin), _rope(torch.cat(k, 2), cos, sin)
            mixed = _attend(q, k, torch.cat(v, 2), full)
            sizes = [h.shape[1] for h in hidden]
            for i, (layer, part) in enumerate(zip(layers, mixed.split(sizes, dim=1))):
                out = layer.self_attn.o_proj(part.to(layer.self_attn.o_proj.weight.dtype))
                h = out + hidden[i].to(out.dtype)
                hidden[i] = h + layer.mlp(layer.post_attention_layernorm(h))
        return streams[1].norm(hidden[1])

    def _prefix(self, attention_mask, position_ids, inputs_embeds):
        prefix, suffix = inputs_embeds
        if suffix is not None:
            raise NotImplementedError("the stand-in runs the prefix (prefill) only")
        if attention_mask.dtype == torch.bool:  # old API: 2-D (B, L, L) boolean mask
            attention_mask = torch.where(attention_mask[:, None], 0.0, torch.finfo(prefix.dtype).min)
        out = language_model(self.paligemma)(
            inputs_embeds=prefix, attention_mask=attention_mask.to(prefix.dtype),
            position_ids=position_ids, use_cache=False).last_hidden_state
        if isinstance(out, tuple):  # LeRobot 0.6's norm returns (normed, gate)
            out = out[0]
        return [out, None], None  # the final-norm output, as the real prefix_out is


@dataclass
class PrefixCache:
    """What the stand-in keeps of the prefix pass for the denoising steps."""
    embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor


def _rotary(decoder):
    """The decoder's rotary embedding: one per model (transformers >= 4.48) or one per
    attention layer (4.47), called the same way."""
    rotary = getattr(decoder, "rotary_emb", None)
    return rotary if rotary is not None else decoder.layers[0].self_attn.rotary_emb


def _qkv(layer, x):
    attn, (b, t, _) = layer.self_attn, x.shape
    head = attn.head_dim
    shape = lambda y: y.view(b, t, -1, head).transpose(1, 2)  # noqa: E731
    return shape(attn.q_proj(x)), shape(attn.k_proj(x)), shape(attn.v_proj(x))


def _rope(x, cos, sin):
    """Rotary positions computed in float32, returned in x's dtype (as the old API does)."""
    half, y = x.shape[-1] // 2, x.float()
    rotated = torch.cat([-y[..., half:], y[..., :half]], dim=-1)
    return (y * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def _attend(q, k, v, mask):
    """Scaled dot-product attention (grouped kv heads repeated), (B, T, H * head_dim)."""
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])  # upcast, as eager
    scores = scores.masked_fill(~mask[:, None], torch.finfo(scores.dtype).min)
    out = scores.softmax(-1).to(v.dtype) @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class TinyPaliGemmaWithExpertNew(TinyPaliGemmaWithExpert):
    """LeRobot 0.6 shape: 4-D float mask in, no `fill_kv_cache`, a final norm whose
    forward returns a tuple."""

    def __init__(self, seed: int, attn: str = "eager"):
        super().__init__(seed, attn)
        norm = language_model(self.paligemma).norm
        norm.__class__ = type("TupleRMSNorm", (type(norm),), {"forward": _tuple_norm_forward})

    def forward(self, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, adarms_cond=None):
        return self._prefix(attention_mask, position_ids, inputs_embeds)


def _tuple_norm_forward(self, x, cond=None):
    return (super(type(self), self).forward(x), None)


class TinyPI0FlowMatching(nn.Module):
    """`policy.model`: prefix embedding (scaled image + language embeddings) and the
    action-side projections whose weights a real checkpoint also carries."""

    def __init__(self, config: TinyPI0Config, seed: int, new_api: bool = False,
                 attn: str = "eager"):
        super().__init__()
        self.config = config
        pwe_cls = TinyPaliGemmaWithExpertNew if new_api else TinyPaliGemmaWithExpert
        self.paligemma_with_expert = pwe_cls(seed, attn)  # the PaliGemma's attention
        # the old API's PaliGemmaWithExpertConfig carries PI0Config.attention_implementation
        self.paligemma_with_expert.config = SimpleNamespace(
            attention_implementation=config.attention_implementation)
        if config.attention_implementation != "eager":
            raise NotImplementedError("the stand-in's expert attention is eager only")
        if new_api:
            self._prepare_attention_masks_4d = _masks_4d
        torch.manual_seed(seed + 2)
        width = HIDDEN  # the expert's hidden size
        self.state_proj = nn.Linear(config.max_state_dim, width)
        self.action_in_proj = nn.Linear(config.max_action_dim, width)
        self.action_out_proj = nn.Linear(width, config.max_action_dim)
        self.action_time_mlp_in = nn.Linear(2 * width, width)
        self.action_time_mlp_out = nn.Linear(width, width)

    def embed_suffix(self, state, noisy_actions, timestep):
        """[state token, one token per action step]; the state and the first action
        token each open a new attention block, as in the old API."""
        width = self.action_in_proj.out_features
        state_emb = self.state_proj(state)[:, None]
        actions = self.action_in_proj(noisy_actions)
        freqs = torch.exp(torch.linspace(0, -math.log(1e4), width // 2, device=state.device))
        angle = timestep[:, None].float() * freqs[None] * 2 * math.pi
        time = torch.cat([angle.sin(), angle.cos()], dim=-1).to(actions.dtype)
        time = time[:, None].expand_as(actions)
        mixed = self.action_time_mlp_out(nn.functional.silu(
            self.action_time_mlp_in(torch.cat([actions, time], dim=-1))))
        embs = torch.cat([state_emb, mixed], dim=1)
        pad = torch.ones(embs.shape[:2], dtype=torch.bool, device=embs.device)
        att = torch.zeros_like(pad)
        att[:, :2] = True
        return embs, pad, att

    def sample_actions(self, images, img_masks, lang_tokens, lang_masks, state, noise=None):
        """Old-API flow matching: prefix once (filling the cache), then `num_steps` Euler
        steps from t=1 to 0, each a suffix pass through the action expert."""
        bsize = state.shape[0]
        steps = self.config.n_action_steps
        if noise is None:
            noise = torch.randn(bsize, steps, self.config.max_action_dim, device=state.device)
        embs, pad, att = self.embed_prefix(images, img_masks, lang_tokens, lang_masks)
        att_2d = make_att_2d_masks(pad, att)
        positions = torch.cumsum(pad, dim=1) - 1
        pwe = self.paligemma_with_expert
        _, cache = pwe.forward(attention_mask=att_2d, position_ids=positions,
                               past_key_values=None, inputs_embeds=[embs, None],
                               use_cache=True, fill_kv_cache=True)
        dt = -1.0 / self.config.num_steps
        x_t, time = noise, 1.0
        for _ in range(self.config.num_steps):
            v_t = self.denoise_step(state, pad, cache, x_t,
                                    torch.full((bsize,), time, device=state.device))
            x_t, time = x_t + dt * v_t, time + dt
        return x_t

    def denoise_step(self, state, prefix_pad_masks, cache, x_t, timestep):
        suffix, suffix_pad, suffix_att = self.embed_suffix(state, x_t, timestep)
        n_prefix, n_suffix = prefix_pad_masks.shape[1], suffix.shape[1]
        sees_prefix = prefix_pad_masks[:, None, :].expand(-1, n_suffix, n_prefix)
        sees_suffix = make_att_2d_masks(suffix_pad, suffix_att)
        mask = torch.cat([sees_prefix, sees_suffix], dim=2)
        positions = prefix_pad_masks.sum(-1)[:, None] + torch.cumsum(suffix_pad, dim=1) - 1
        out, _ = self.paligemma_with_expert.forward(
            attention_mask=mask, position_ids=positions, past_key_values=cache,
            inputs_embeds=[None, suffix], use_cache=True, fill_kv_cache=False)
        return self.action_out_proj(out[1][:, -self.config.n_action_steps:].to(torch.float32))

    def embed_prefix(self, images, img_masks, lang_tokens, lang_masks):
        pwe = self.paligemma_with_expert
        embs, pads, att = [], [], []
        for img, img_mask in zip(images, img_masks):
            emb = pwe.embed_image(img)
            emb = emb * math.sqrt(emb.shape[-1])
            embs.append(emb)
            pads.append(img_mask[:, None].expand(emb.shape[0], emb.shape[1]))
            att += [0] * emb.shape[1]
        lang = pwe.embed_language_tokens(lang_tokens)
        embs.append(lang * math.sqrt(lang.shape[-1]))
        pads.append(lang_masks)
        att += [0] * lang.shape[1]
        pad_masks = torch.cat(pads, dim=1)
        att_masks = torch.tensor(att, dtype=torch.bool, device=pad_masks.device)
        return torch.cat(embs, dim=1), pad_masks, att_masks[None].expand(pad_masks.shape[0], -1)


class TinyStateNormalize(nn.Module):
    """The old API's `normalize_inputs` for the state (MEAN_STD): mean/std buffers saved
    in the checkpoint, `(state - mean) / (std + 1e-8)`; other keys pass through."""

    def __init__(self, config: TinyPI0Config, seed: int):
        super().__init__()
        dim = config.input_features["observation.state"]["shape"][0]
        rng = torch.Generator().manual_seed(seed + 3)
        self.register_buffer("mean", torch.randn(dim, generator=rng) * 0.1)
        self.register_buffer("std", torch.rand(dim, generator=rng) + 0.5)

    def forward(self, batch: dict) -> dict:
        out = dict(batch)
        if "observation.state" in out:
            out["observation.state"] = (out["observation.state"] - self.mean) / (self.std + 1e-8)
        return out


def _masks_4d(att_2d: torch.Tensor) -> torch.Tensor:
    return torch.where(att_2d[:, None], 0.0, -2.3819763e38)


class _TinyPI0Base(nn.Module):
    """What both API generations share: config, `model`, a `select_action` with an
    action queue (counted, so tests can prove it is never called), checkpoint io whose
    `from_pretrained` loads with strict=False like LeRobot's."""

    name = "pi0"
    new_api = False

    def __init__(self, config: TinyPI0Config | None = None, seed: int = SEED, tokenizer=None):
        super().__init__()
        self.config = config or TinyPI0Config()
        # Gemma's fast tokenizer pads on the left unless told otherwise
        self.tokenizer_for_checkpoint = tokenizer or char_tokenizer(padding_side="left")
        self.model = TinyPI0FlowMatching(self.config, seed, new_api=self.new_api)
        self.normalize_inputs = TinyStateNormalize(self.config, seed)
        if self.config.precision != "float32":  # as LeRobot's constructor casts, before loading
            from harness.extractors.engine.registry import families  # the family's declared mix
            families()["pi0_lerobot"].dtype_policy.apply(self)
        self.select_action_calls = 0
        self.seen_batch_keys: list[set] = []
        self._queue: list = []

    def _images(self, batch: dict):
        """Resize with pad, scale to [-1, 1], one all-true mask per present camera."""
        self.seen_batch_keys.append(set(batch))
        present = [k for k in self.config.image_features if k in batch]
        if not present:
            raise ValueError(f"no image among {list(self.config.image_features)} in batch")
        images, masks = [], []
        for key in present:
            img = resize_with_pad(batch[key], *self.config.resize_imgs_with_padding)
            images.append(img * 2.0 - 1.0)
            masks.append(torch.ones(img.shape[0], dtype=torch.bool, device=img.device))
        return images, masks

    def reset(self) -> None:
        self._queue = []

    def prepare_state(self, batch: dict) -> torch.Tensor:
        """The (normalised) state zero-padded to max_state_dim, as the old API pads it."""
        state = batch["observation.state"]
        pad = self.config.max_state_dim - state.shape[-1]
        return nn.functional.pad(state, (0, pad)) if pad > 0 else state

    @torch.no_grad()
    def select_action(self, batch: dict):
        self.select_action_calls += 1
        raise RuntimeError("the stand-in's select_action must never be used for features")

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_model
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(
            {"type": "pi0", **self.config.to_dict()}, indent=2))
        save_model(self, str(directory / "model.safetensors"))
        self.tokenizer_for_checkpoint.save_pretrained(directory)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, strict: bool = False, **kwargs):
        """Like LeRobot's loader: strict=False, so mismatched keys pass silently."""
        from safetensors.torch import load_model
        from transformers import AutoTokenizer
        directory = Path(directory)
        raw = json.loads((directory / "config.json").read_text())
        raw.pop("type", None)
        raw["resize_imgs_with_padding"] = tuple(raw["resize_imgs_with_padding"])
        policy = cls(TinyPI0Config(**raw), tokenizer=AutoTokenizer.from_pretrained(directory))
        load_model(policy, str(directory / "model.safetensors"), strict=strict)
        return policy.eval()


class TinyPI0Policy(_TinyPI0Base):
    """Old-LeRobot `PI0Policy` (the API the bridge checkpoint bundles): prepare_images,
    prepare_language (task + "\\n", right pad), language_tokenizer on the policy."""

    @property
    def language_tokenizer(self):
        return self.tokenizer_for_checkpoint

    def prepare_images(self, batch: dict):
        return self._images(batch)

    def prepare_language(self, batch: dict):
        tasks = [t if t.endswith("\n") else t + "\n" for t in batch["task"]]
        tok = self.language_tokenizer(tasks, padding="max_length", padding_side="right",
                                      max_length=self.config.tokenizer_max_length,
                                      return_tensors="pt")
        return tok["input_ids"], tok["attention_mask"].bool()


class TinyPI0PolicyNew(_TinyPI0Base):
    """LeRobot 0.6 shape: `_preprocess_images`, no prepare_language and no tokenizer on
    the policy (tokenising is a processor-pipeline step there)."""

    new_api = True

    def _preprocess_images(self, batch: dict):
        return self._images(batch)


MODELING_SHIM = '''"""Fake checkpoint code: the harness's tiny Pi0 stand-in behind the old file name."""
from harness.extractors.standins import {cls} as PI0Policy, make_att_2d_masks  # noqa: F401
'''


def save_tiny_pi0_checkpoint(directory: str | os.PathLike, seed: int = SEED,
                             config: TinyPI0Config | None = None, new_api: bool = False,
                             precision: str | None = None) -> Path:
    """A local directory shaped like `HaomingSong/lerobot-pi0-bridge`: config.json,
    model.safetensors, tokenizer files and a `modeling_pi0.py` exposing `PI0Policy` and
    `make_att_2d_masks`."""
    cls = TinyPI0PolicyNew if new_api else TinyPI0Policy
    if precision is not None:
        config = TinyPI0Config(**{**(config or TinyPI0Config()).__dict__, "precision": precision})
    directory = cls(config, seed=seed).save_pretrained(directory)
    (directory / "modeling_pi0.py").write_text(MODELING_SHIM.format(cls=cls.__name__))
    return directory
