"""An imitation of LeRobot 0.4.4's SmolVLA policy, tiny and random, for the main test suite
and the demo (LeRobot itself cannot share this venv; the real classes are checked in
tests/equivalence/test_lerobot04_smolvla.py, in the LeRobot venv).

It has the module paths, methods and signatures the `smolvla` extractor calls:
`policy.prepare_images` / `prepare_state`, `policy.model.embed_prefix(images, img_masks,
lang_tokens, lang_masks, state)` (image tokens and language embeddings scaled by sqrt(width),
then ONE state token in a later attention block, so image and text cannot see it),
`policy.model.vlm_with_expert.forward(attention_mask (B, L, L) bool, position_ids,
past_key_values, inputs_embeds=[prefix, None], use_cache, fill_kv_cache)` returning the
post-final-norm prefix, the final norm at `vlm_with_expert.vlm.model.text_model.norm`, the
language model cut to `num_vlm_layers`, and `sample_actions` whose expert final norm
(`vlm_with_expert.lm_expert.norm`) runs once per denoising step. The expert here sees the
prefix only through its pooled output (the real one cross-attends layer by layer): values
differ from LeRobot's, the code path the extractor drives does not.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from harness.extractors import tiny
from harness.extractors.standins import make_att_2d_masks, resize_with_pad

IMAGE_KEY = "observation.images.image_0"
WIDTH, EXPERT_WIDTH, VISION_WIDTH, IMAGE, PATCH, SCALE = 64, 32, 32, 32, 8, 2


@dataclass
class TinySmolVLAConfig:
    """The SmolVLAConfig fields the extractor reads (LeRobot 0.4.4 names, release values
    where they do not set the size)."""
    image_keys: tuple = (IMAGE_KEY,)
    tokenizer_max_length: int = 48
    pad_language_to: str = "max_length"  # the released smolvla_base's value
    resize_imgs_with_padding: tuple = (IMAGE, IMAGE)
    empty_cameras: int = 0
    max_state_dim: int = 8
    max_action_dim: int = 8
    chunk_size: int = 4
    n_action_steps: int = 4
    num_steps: int = 3
    num_vlm_layers: int = 2
    attention_mode: str = "cross_attn"  # the release's: cross-attention in every odd layer
    self_attn_every_n_layers: int = 2
    prefix_length: int = 0
    load_vlm_weights: bool = True  # the release: LeRobot loads the VLM in bfloat16
    input_features: dict = field(default_factory=dict)

    @property
    def image_features(self) -> dict:
        return {key: (3, IMAGE, IMAGE) for key in self.image_keys}


def _llama(width: int, layers: int, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tiny.VOCAB, hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=width // 4, max_position_embeddings=512, rms_norm_eps=1e-5)
    config._attn_implementation = "eager"
    return LlamaModel(config).eval()


def _siglip(seed: int) -> nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(seed)
    config = SiglipVisionConfig(hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH,
                                num_hidden_layers=1, num_attention_heads=2, image_size=IMAGE,
                                patch_size=PATCH)
    config._attn_implementation = "sdpa"  # transformers' default, which LeRobot leaves
    return SiglipVisionModel(config).eval()


class _Connector(nn.Module):
    """SmolVLM's connector: pixel shuffle (SCALE x SCALE patches -> one token), then a
    linear map to the text width."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(VISION_WIDTH * SCALE * SCALE, WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        side = int(n ** 0.5)
        x = x.reshape(b, side // SCALE, SCALE, side // SCALE, SCALE, d).permute(0, 1, 3, 2, 4, 5)
        return self.proj(x.reshape(b, (side // SCALE) ** 2, SCALE * SCALE * d))


class _Inner(nn.Module):
    """`vlm.model`: vision_model, connector, text_model (SmolVLMModel's names)."""

    def __init__(self, num_layers: int, seed: int):
        super().__init__()
        self.vision_model = _siglip(seed)
        self.connector = _Connector()
        self.text_model = _llama(WIDTH, num_layers + 2, seed + 1)
        self.text_model.layers = self.text_model.layers[:num_layers]  # the cut, as LeRobot's


class _VLM(nn.Module):
    def __init__(self, num_layers: int, seed: int):
        super().__init__()
        self.model = _Inner(num_layers, seed)


class _CastLinear(nn.Linear):
    """A k/v projection LeRobot rebuilds for cross-attention (a plain nn.Linear, left
    float32 by its loader): its input is cast to its dtype and back, as LeRobot casts."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


class TinySmolVLMWithExpert(nn.Module):
    def __init__(self, config: TinySmolVLAConfig, seed: int):
        super().__init__()
        self.vlm = _VLM(config.num_vlm_layers, seed)
        self.lm_expert = _llama(EXPERT_WIDTH, config.num_vlm_layers, seed + 2)
        self.lm_expert.embed_tokens = None
        every = config.self_attn_every_n_layers  # as SmolVLMWithExpertModel rebuilds them
        cross = [i for i in range(config.num_vlm_layers)
                 if "cross" in config.attention_mode and not (every > 0 and i % every == 0)]
        for i in cross:
            attention = self.lm_expert.layers[i].self_attn
            for name in ("k_proj", "v_proj"):
                old = getattr(attention, name)
                new = _CastLinear(old.in_features, old.out_features, bias=old.bias is not None)
                new.load_state_dict(old.state_dict())
                setattr(attention, name, new)
        self.prefix_to_expert = nn.Linear(WIDTH, EXPERT_WIDTH)

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        inner = self.vlm.model
        dtype = next(inner.vision_model.parameters()).dtype
        return inner.connector(inner.vision_model(pixel_values=image.to(dtype)).last_hidden_state)

    def embed_language_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vlm.model.text_model.get_input_embeddings()(tokens)

    def forward(self, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, fill_kv_cache=None):
        prefix, suffix = inputs_embeds
        if prefix is None:  # a denoising step; the "cache" is the pooled prefix
            cond = self.prefix_to_expert(past_key_values.to(self.prefix_to_expert.weight.dtype))
            x = (suffix + cond[:, None]).to(self.lm_expert.norm.weight.dtype)  # LeRobot casts
            out = self.lm_expert(inputs_embeds=x, position_ids=position_ids,
                                 use_cache=False).last_hidden_state
            return [None, out], past_key_values
        text = self.vlm.model.text_model
        dtype = next(text.parameters()).dtype
        mask = torch.where(attention_mask[:, None], 0.0, torch.finfo(dtype).min).to(dtype)
        out = text(inputs_embeds=prefix.to(dtype), attention_mask=mask, position_ids=position_ids,
                   use_cache=False).last_hidden_state
        valid = attention_mask.diagonal(dim1=1, dim2=2)[..., None].to(out.dtype)
        cache = (out * valid).sum(1) / valid.sum(1) if fill_kv_cache else None
        return [out, None], cache


class TinyVLAFlowMatching(nn.Module):
    def __init__(self, config: TinySmolVLAConfig, seed: int):
        super().__init__()
        self.config = config
        self.vlm_with_expert = TinySmolVLMWithExpert(config, seed)
        torch.manual_seed(seed + 3)
        self.state_proj = nn.Linear(config.max_state_dim, WIDTH)
        self.action_in_proj = nn.Linear(config.max_action_dim, EXPERT_WIDTH)
        self.action_out_proj = nn.Linear(EXPERT_WIDTH, config.max_action_dim)

    def embed_prefix(self, images, img_masks, lang_tokens, lang_masks, state=None):
        embs, pads, att = [], [], []
        for img, img_mask in zip(images, img_masks):
            emb = self.vlm_with_expert.embed_image(img)
            emb = emb * torch.tensor(emb.shape[-1] ** 0.5, dtype=emb.dtype)
            embs.append(emb)
            pads.append(img_mask[:, None].expand(emb.shape[0], emb.shape[1]))
            att += [0] * emb.shape[1]
        lang = self.vlm_with_expert.embed_language_tokens(lang_tokens)
        embs.append(lang * lang.shape[-1] ** 0.5)
        pads.append(lang_masks)
        att += [0] * lang.shape[1]
        state_emb = self.state_proj(state.to(self.state_proj.weight.dtype))[:, None]
        embs.append(state_emb)
        pads.append(torch.ones(state_emb.shape[:2], dtype=torch.bool))
        att += [1]  # a new block: image and language tokens cannot attend to the state
        bsize = state_emb.shape[0]
        dtype = embs[0].dtype
        embs = torch.cat([e.to(dtype) for e in embs], dim=1)
        att_masks = torch.tensor(att, dtype=torch.bool)[None].expand(bsize, -1)
        return embs, torch.cat(pads, dim=1), att_masks

    def sample_actions(self, images, img_masks, lang_tokens, lang_masks, state, noise=None):
        embs, pad_masks, att_masks = self.embed_prefix(images, img_masks, lang_tokens, lang_masks,
                                                       state=state)
        _, cache = self.vlm_with_expert.forward(
            attention_mask=make_att_2d_masks(pad_masks, att_masks),
            position_ids=torch.cumsum(pad_masks, dim=1) - 1, past_key_values=None,
            inputs_embeds=[embs, None], use_cache=True, fill_kv_cache=True)
        x_t, dt = noise, -1.0 / self.config.num_steps
        positions = torch.arange(self.config.chunk_size)[None].expand(x_t.shape[0], -1)
        for step in range(self.config.num_steps):
            suffix = self.action_in_proj(x_t) + (1.0 + step * dt)
            (_, out), _ = self.vlm_with_expert.forward(
                attention_mask=None, position_ids=positions, past_key_values=cache,
                inputs_embeds=[None, suffix], use_cache=True, fill_kv_cache=False)
            x_t = x_t + dt * self.action_out_proj(out.float())
        return x_t


class TinySmolVLAPolicy(nn.Module):
    """`SmolVLAPolicy`-shaped: config, model, prepare_images, prepare_state."""

    def __init__(self, config: TinySmolVLAConfig | None = None, seed: int = tiny.SEED):
        super().__init__()
        self.config = config or TinySmolVLAConfig()
        self.model = TinyVLAFlowMatching(self.config, seed)

    def prepare_images(self, batch: dict):
        images, masks = [], []
        for key in self.config.image_features:
            if key not in batch:
                continue
            img = resize_with_pad(batch[key], *self.config.resize_imgs_with_padding, pad_value=0)
            images.append(img * 2.0 - 1.0)
            masks.append(torch.ones(img.shape[0], dtype=torch.bool))
        return images, masks

    def prepare_state(self, batch: dict) -> torch.Tensor:
        state = batch["observation.state"]
        out = torch.zeros(state.shape[0], self.config.max_state_dim, dtype=state.dtype)
        out[:, : state.shape[1]] = state
        return out

    def reset(self) -> None:
        pass


def tiny_smolvla(seed: int = tiny.SEED):
    """(policy, tokenizer) of the stand-in: char-level tokenizer, right padding."""
    return TinySmolVLAPolicy(seed=seed).eval(), tiny.tokenizer("right")
