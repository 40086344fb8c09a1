"""Whether the robot state was an input of each feature file, and marking such rows.

When a model is fed the state (Pi0's action expert given the real state; SmolVLA's state
token; Pi0.5/FAST's discretised state in the prompt), CKNNA of its features against that
same state does not measure what the model learned. Extraction records per file
(`state_in_input` in extraction_metadata.json, from the extractor's optional
`state_in_input(output)`, False when it has none); the `cknna` and `run` reports read it
back beside each feature file and mark those rows.
"""
from __future__ import annotations

import json
from pathlib import Path

from harness.extractors.engine.extra_outputs import VIEW_FILES

MARK = " [state in input]"
NOTE = ("[state in input]: the robot state was fed to the model for these features, so "
        "their CKNNA against the state is not a measure of what the model learned")


def record(extractor, extra_stems: list[str]) -> dict[str, bool]:
    """{file name: bool} for feats_A.pt (and its layer files) and each extra output."""
    ask = getattr(extractor, "state_in_input", None)
    value = (lambda stem: bool(ask(stem))) if callable(ask) else (lambda stem: False)
    out = {"feats_A.pt": value("feats_A")}
    out.update({f"{stem}.pt": value(stem) for stem in extra_stems})
    return out


def lookup(feats_path) -> bool | None:
    """The recorded flag of one feature file (None: no metadata says)."""
    path = Path(feats_path)
    meta_path = path.parent / "extraction_metadata.json"
    if not meta_path.is_file():
        return None
    try:
        flags = json.loads(meta_path.read_text()).get("state_in_input") or {}
    except ValueError:
        return None
    name = "feats_A.pt" if path.name.startswith("feats_A_layer") else path.name
    return flags.get(name)


def annotate(results: dict) -> dict:
    """Add `state_in_input` to each model entry (and to each view of `results["views"]`)
    whose feature file's metadata records it."""
    for label, entry in results.get("models", {}).items():
        path = entry.get("feats_A_path")
        flag = lookup(path) if path else None
        if flag is not None:
            entry["state_in_input"] = flag
        view = results.get("views", {}).get(label)
        if view is not None and path:
            folder = Path(path).parent
            view["state_in_input"] = {v: bool(flag) if v == "full" else
                                      bool(lookup(folder / VIEW_FILES[v])) for v in view["views"]}
    return results


def marker(flag) -> str:
    return MARK if flag else ""


def marked(results: dict) -> list[str]:
    """'model' / 'model: view' for every result row whose features had the state as input."""
    rows = [label for label, m in results.get("models", {}).items() if m.get("state_in_input")]
    rows += [f"{label}: {view}" for label, v in (results.get("views") or {}).items()
             for view, flag in (v.get("state_in_input") or {}).items() if flag]
    return rows


def notes(results: dict) -> list[str]:
    """The table note explaining the mark, when a row carries it."""
    return [NOTE] if marked(results) else []


def console_lines(results: dict) -> list[str]:
    rows = marked(results)
    return [f"state in input (CKNNA against the state is not a measure of learning): "
            f"{', '.join(rows)}"] if rows else []
