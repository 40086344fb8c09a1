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

from harness.cknna import chance
from harness.cknna import core as metrics
from harness.data import states as states_mod
from harness.extractors.engine.extra_outputs import VIEW_FILES
from harness.io import read_tensor

ORDER = ("full", "image", "text", "action")


def extraction_metadata(feats_path: Path) -> dict:
    """The extraction metadata beside feats_A ({} when there is none)."""
    meta_path = Path(feats_path).parent / "extraction_metadata.json"
    return json.loads(meta_path.read_text()) if meta_path.is_file() else {}


def empty_task_samples(feats_path: Path) -> set[int]:
    """Sample indices whose text view is undefined (empty task), from the metadata."""
    record = extraction_metadata(feats_path).get("txt_empty_task") or {}
    return {int(i) for i in record.get("samples", [])}


def load_views(feats_path: Path, data, rows) -> tuple[dict[str, torch.Tensor], dict]:
    """({view: L2-normalised rows for `data`}, {view: bool mask of the rows it is defined
    on}) of one model's extra outputs. `rows(path, data)` loads a full file; the text view
    leaves out the samples of an empty task (their rows are undefined: NaN, or the seed's
    zeros) and is zero there, with its mask saying so."""
    views, defined = {}, {}
    for view, path in view_files(feats_path).items():
        if view != "text":
            views[view] = rows(path, data)
            continue
        empty = empty_task_samples(feats_path)
        raw = data.take(read_tensor(path).float())
        mask = torch.tensor([i not in empty for i in data.indices], dtype=torch.bool)
        kept = states_mod.normalised(path, raw[mask])  # float64 rows (harness.data.states)
        x = torch.zeros(raw.shape, dtype=kept.dtype)
        x[mask] = kept
        views[view], defined[view] = x, mask
    return views, defined


def view_files(feats_path: Path) -> dict[str, Path]:
    """{view: path} of the extra outputs listed in the extraction metadata beside feats_A."""
    listed = set(extraction_metadata(feats_path).get("extra_files", []))
    return {view: Path(feats_path).parent / name for view, name in VIEW_FILES.items()
            if name in listed}


def text_fallback_count(feats_path: Path) -> int | None:
    """How many samples' text feature fell back to the prompt (no task tokens)."""
    return (extraction_metadata(feats_path).get("txt_fallback") or {}).get("count")


def compare_views(views: dict[str, torch.Tensor], states: torch.Tensor, ks: list[int],
                  ties: str = "shared", backend: str = "torch",
                  defined: dict[str, torch.Tensor] | None = None, permutations: int = 0,
                  seed: int = 0, groups: torch.Tensor | None = None) -> dict:
    """{"against_states": {view: {"k5": ..., "chance": {"k5": record}}}, "pairs":
    {"full~image": {"k5": ...}}, "samples": {view: N}} for L2-normalised views of one model.
    A view with a mask in `defined` (the text view: samples that have a task) is compared
    on those samples only, and so is anything compared with it. Each sample set is searched
    once per view; chance records come from `permutations` shuffles (whole `groups`) when
    asked."""
    names = [v for v in ORDER if v in views]
    defined = defined or {}
    n = states.shape[0]
    cache: dict = {}

    def space(name: str, mask: torch.Tensor | None):
        key = (name, None if mask is None else tuple(mask.nonzero().flatten().tolist()))
        if key not in cache:
            x = states if name == "states" else views[name]
            cache[key] = metrics.Space(x if mask is None else x[mask], max(ks), ties, None,
                                       {"backend": backend})
        return cache[key]

    def mask_of(a: str, b: str) -> torch.Tensor | None:
        masks = [defined[v] for v in (a, b) if v in defined]
        return None if not masks else masks[0] if len(masks) == 1 else masks[0] & masks[1]

    def scores(a: str, b: str) -> dict:
        mask = mask_of(a, b)
        every_k = metrics.pair_scores(space(a, mask), space(b, mask), ks)  # one union graph
        return {k: every_k[k] for k in ks}

    out = {"views": names, "against_states": {}, "pairs": {},
           "samples": {v: int(defined[v].sum()) if v in defined else n for v in names}}
    for v in names:
        mask = mask_of(v, "states")
        found = scores(v, "states")
        out["against_states"][v] = {f"k{k}": s.cknna for k, s in found.items()}
        kept_groups = groups if groups is None or mask is None else groups[mask]
        chance_by_k = chance.for_spaces(space(v, mask), space("states", mask), found,
                                        permutations, seed, kept_groups)
        if chance_by_k:
            out["against_states"][v]["chance"] = {f"k{k}": r for k, r in chance_by_k.items()}
    for a, b in combinations(names, 2):
        out["pairs"][f"{a}~{b}"] = {f"k{k}": sc.cknna for k, sc in scores(a, b).items()}
    return out
