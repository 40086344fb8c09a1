"""CKNNA of each model's other representations: the modality split and action features.

For a model extracted with `split_modalities` (and/or `action_repr`), its features exist
in up to four views of the same samples: full (feats_A.pt), image (feats_A_img.pt), text
(feats_A_txt.pt) and action (feats_action.pt). The report compares each view against
the states and every pair of views with each other (e.g. full vs image: how much of the
full feature the image tokens carry; action vs full: how far the action stream moves
from the VLM's prefix features).
"""
from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import torch

from harness import chance
from harness import cknna as metrics

VIEW_FILES = {"image": "feats_A_img.pt", "text": "feats_A_txt.pt", "action": "feats_action.pt"}
ORDER = ("full", "image", "text", "action")


def view_files(feats_path: Path) -> dict[str, Path]:
    """{view: path} of the extra outputs listed in the extraction metadata beside feats_A."""
    meta_path = Path(feats_path).parent / "extraction_metadata.json"
    if not meta_path.is_file():
        return {}
    meta = json.loads(meta_path.read_text())
    listed = set(meta.get("extra_files", []))
    return {view: Path(feats_path).parent / name for view, name in VIEW_FILES.items()
            if name in listed}


def text_fallback_count(feats_path: Path) -> int | None:
    """How many samples' text feature fell back to the prompt (no task tokens)."""
    meta_path = Path(feats_path).parent / "extraction_metadata.json"
    if not meta_path.is_file():
        return None
    return (json.loads(meta_path.read_text()).get("txt_fallback") or {}).get("count")


def compare_views(views: dict[str, torch.Tensor], states: torch.Tensor, ks: list[int],
                  ties: str = "shared", backend: str = "torch", permutations: int = 0,
                  seed: int = 0, groups: torch.Tensor | None = None) -> dict:
    """{"against_states": {view: {"k5": ..., "chance": {"k5": record}}}, "pairs":
    {"full~image": {"k5": ...}}} for L2-normalised views of one model (each searched once,
    reused for every k and pair); chance records from `permutations` shuffles (whole
    `groups`) when asked."""
    names = [v for v in ORDER if v in views]
    spaces = {v: metrics.Space(views[v], max(ks), ties, None, {"backend": backend})
              for v in names}
    space_b = metrics.Space(states, max(ks), ties, None, {"backend": backend})
    out = {"views": names, "against_states": {}, "pairs": {}}
    for v in names:
        scores = {k: metrics.space_scores(spaces[v], space_b, k) for k in ks}
        out["against_states"][v] = {f"k{k}": s.cknna for k, s in scores.items()}
        found = chance.for_spaces(spaces[v], space_b, scores, permutations, seed, groups)
        if found:
            out["against_states"][v]["chance"] = {f"k{k}": r for k, r in found.items()}
    for a, b in combinations(names, 2):
        out["pairs"][f"{a}~{b}"] = {f"k{k}": metrics.space_scores(spaces[a], spaces[b], k).cknna
                                    for k in ks}
    return out
