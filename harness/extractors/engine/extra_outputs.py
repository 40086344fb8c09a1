"""Features written beside feats_A.pt on request: the modality split and action features.

`--split_modalities`: feats_A_img.pt and feats_A_txt.pt pool the SAME final hidden states
as feats_A.pt (same forward, same pooling) over the image tokens and over the task's
tokens (`harness.extractors.engine.modality`). `--action_repr`: feats_action.pt, the family's action
representation (Pi0: the action expert's final norm at the last denoising step), from
its own forward. feats_A.pt is computed exactly as without them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.errors import HarnessError
from harness.extractors.engine.base import FINAL
from harness.io import save_tensor
from harness.extractors.engine.modality import EMPTY_TASK, FALLBACK
from harness.extractors.engine.pooling import EmptyMaskError, pool

IMG, TXT, ACTION = "feats_A_img", "feats_A_txt", "feats_action"
UNDEFINED_ROWS, SEED_ROWS = "NaN rows", "zero rows"  # an empty task's text row, by mode
UNDEFINED_TEXT = (UNDEFINED_ROWS + ": a text view of an empty task is undefined; the text "
                  "view's CKNNA is computed over the samples that have a task")
VIEW_FILES = {"image": IMG + ".pt", "text": TXT + ".pt", "action": ACTION + ".pt"}
"""The extra files by the view of the features they hold (read by harness.cknna.views)."""
SEED_TEXT = SEED_ROWS + " (--seed_compat: the seed's clamp(min=1) mean over no tokens)"


def refuse_action_repr(family: str) -> None:
    """One clear line for a family that has no action stream to read."""
    from harness.extractors.engine.registry import families
    have = [name for name, spec in families().items() if spec.action_stream]
    raise HarnessError(f"{family}: this family has no action stream, so --action_repr "
                       f"(feats_action.pt) cannot be extracted; families with one: "
                       f"{', '.join(have) or 'none'}")


class Outputs:
    """Which extra outputs a run makes, and how one batch's are pooled."""

    def __init__(self, split_modalities: bool = False, action_repr: bool = False):
        self.split_modalities, self.action_repr = split_modalities, action_repr

    def __bool__(self) -> bool:
        return self.split_modalities or self.action_repr

    def stems(self) -> list[str]:
        """The extra files' names without .pt, in the order they are made."""
        return ([IMG, TXT] if self.split_modalities else []) + ([ACTION] if self.action_repr else [])

    def check(self, extractor) -> None:
        if self.split_modalities and not hasattr(extractor, "modality_masks"):
            raise HarnessError(f"{extractor.family}: the extractor cannot locate image and "
                               "task tokens (no modality_masks); --split_modalities unsupported")
        if self.action_repr and not hasattr(extractor, "action_features"):
            refuse_action_repr(extractor.family)

    def record(self, extractor) -> dict:
        """Provenance of the extra outputs (part of a shard's identity)."""
        out = {}
        if self.split_modalities:
            out["split_modalities"] = {
                "files": [IMG + ".pt", TXT + ".pt"], "same_forward_as": "feats_A.pt",
                "image_tokens": getattr(extractor, "image_token_rule", "input_ids == image token id"),
                "text_tokens": "the task's tokens: tokenizer.encode(prefix + task, "
                               "add_special_tokens=False) searched in the prompt ids, "
                               "prefix '' then ' ' (first match)",
                "text_fallback": FALLBACK + " (a task not found in the prompt); an empty "
                                 "task's row: " + UNDEFINED_ROWS + ", or " + SEED_ROWS
                                 + " under --seed_compat"}
        if self.action_repr:
            out["action_repr"] = extractor.action_provenance()
        return out

    def pool(self, extractor, batch, inputs: dict, hidden, pooling: str) -> dict:
        indices = [int(s[0]) for s in batch]
        out: dict = {}
        if self.split_modalities:
            try:
                masks = extractor.modality_masks(inputs, [s[2] for s in batch], hidden)
            except ValueError as err:
                raise HarnessError(f"{extractor.family}: --split_modalities: {err}") from None
            final = hidden.layers[FINAL]
            for name, mask in ((IMG, masks.image), (TXT, masks.text)):
                try:
                    out[name] = pool(final, mask, pooling).cpu()
                except EmptyMaskError as err:
                    raise HarnessError(f"{name}: no token to pool for sample(s) "
                                       f"{[indices[r] for r in err.rows]}") from None
            out["txt_fallback"] = [[i, r] for i, r in zip(indices, masks.text_fallback) if r]
        if self.action_repr:
            out[ACTION] = extractor.action_features(inputs).float().cpu()
        return out


def empty_task_rows(order: list[int], shards: list[dict]) -> list[int]:
    """Row positions in `order` (the shards' sample indices, in shard order) of the samples
    whose task is empty."""
    empty = {int(i) for s in shards for i, reason in s.get("txt_fallback", [])
             if reason == EMPTY_TASK}
    return [p for p, i in enumerate(order) if i in empty]


def merge_extras(out_dir: Path, shards: list[dict]) -> dict:
    """Write every extra output of the shards (in shard order) and return its metadata."""
    if not any("extra" in s for s in shards):
        return {}
    names = sorted(shards[0]["extra"])
    files = []
    order = torch.cat([s["indices"] for s in shards]).tolist()
    empty = empty_task_rows(order, shards)
    seed = json.loads(shards[0].get("identity") or "{}").get("seed_compat") is True
    for name in names:
        feats = torch.cat([s["extra"][name] for s in shards]).contiguous()
        if name == TXT and empty:
            feats[empty] = 0.0 if seed else float("nan")
        save_tensor(Path(out_dir) / f"{name}.pt", feats)
        files.append(f"{name}.pt")
    meta: dict = {"extra_files": files}
    if TXT in names:
        meta["txt_empty_task"] = {"rule": SEED_TEXT if seed else UNDEFINED_TEXT,
                                  "samples": [int(order[p]) for p in empty],
                                  "count": len(empty)}
    if IMG in names:
        by_reason: dict[str, list[int]] = {}
        for index, reason in (pair for s in shards for pair in s.get("txt_fallback", [])):
            by_reason.setdefault(reason, []).append(int(index))
        meta["txt_fallback"] = {"rule": FALLBACK, "samples": by_reason,
                                "count": sum(map(len, by_reason.values()))}
    return json.loads(json.dumps(meta))
