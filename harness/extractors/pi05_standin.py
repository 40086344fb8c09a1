"""Imitations of LeRobot 0.4.4's Pi0.5 and Pi0-FAST policies, tiny and random, for the main
test suite and the demo. Both reuse the Pi0 stand-in (harness.extractors.standins) in its
new-API shape, which already has the prefix path Pi0.5 shares with LeRobot 0.4.4's Pi0
(`_preprocess_images`, `embed_prefix(images, img_masks, tokens, masks)`,
`_prepare_attention_masks_4d`, `paligemma_with_expert.forward(inputs_embeds=[prefix,
None])`); Pi0-FAST adds `embed_prefix_fast` (image + language bidirectional, a 2-D mask
returned directly) and a 4-D mask helper that takes a dtype. The real classes are checked
in tests/equivalence/test_lerobot04_pi05.py in the LeRobot venv.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.extractors.standins import (SEED, TinyPI0Config, TinyPI0FlowMatching,
                                         TinyPI0PolicyNew, _masks_4d, char_tokenizer,
                                         make_att_2d_masks)


@dataclass
class TinyPI05Config(TinyPI0Config):
    """Pi0.5 / Pi0-FAST config fields the extractors read on top of Pi0's."""
    tokenizer_max_length: int = 96  # holds "Task: ..., State: <8 bins>;\nAction: "
    dtype: str = "bfloat16"  # the usual fine-tuning setting; the loader's policy follows it


class TinyPI0FastModel(TinyPI0FlowMatching):
    """`PI0FastPytorch`-shaped prefix: embed_prefix_fast and a dtype-taking 4-D mask."""

    def __init__(self, config: TinyPI05Config, seed: int):
        # LeRobot 0.4.4 builds FAST's PaliGemma from a config, so transformers' default
        # attention (sdpa) runs its prefix: sample_actions_fast does not switch it to eager
        super().__init__(config, seed, new_api=True, attn="sdpa")
        self._prepare_attention_masks_4d = self._masks_4d

    @staticmethod
    def _masks_4d(att_2d: torch.Tensor, dtype=None) -> torch.Tensor:
        out = _masks_4d(att_2d)
        return out if dtype is None else out.to(dtype)

    def embed_prefix_fast(self, images, img_masks, tokens, masks, fast_action_tokens=None,
                          fast_action_masks=None):
        """(embs, pad_masks, 2-D attention mask, image tokens, FAST tokens = 0)."""
        embs, pad_masks, att = self.embed_prefix(images, img_masks, tokens, masks)
        return embs, pad_masks, make_att_2d_masks(pad_masks, att), embs.shape[1] - tokens.shape[1], 0


def tiny_pi05(seed: int = SEED):
    """(policy, tokenizer) of the Pi0.5 stand-in."""
    return TinyPI0PolicyNew(TinyPI05Config(), seed=seed).eval(), char_tokenizer("right")


def tiny_pi0_fast(seed: int = SEED):
    """(policy, tokenizer) of the Pi0-FAST stand-in: the Pi0.5 one with FAST's prefix."""
    policy = TinyPI0PolicyNew(TinyPI05Config(), seed=seed)
    policy.model = TinyPI0FastModel(policy.config, seed)
    return policy.eval(), char_tokenizer("right")
