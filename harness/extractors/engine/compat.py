"""transformers-version shims, in one place (docs/facts.md §4).

The extractors run under transformers 4.47 (SpatialVLA's remote code) through 5.x; what
differs between those releases, and what a loaded model really runs, is read here."""
from __future__ import annotations

import torch


def transformers_version() -> str:
    import transformers
    return transformers.__version__


def transformers_major(version: str | None = None) -> int:
    return int((version or transformers_version()).split(".")[0])


def dtype_kwarg(dtype, version: str | None = None) -> dict:
    """`from_pretrained`'s dtype argument: `dtype` from 5.0, `torch_dtype` before."""
    return {"dtype" if transformers_major(version) >= 5 else "torch_dtype": dtype}


def dtype_name(dtype) -> str | None:
    """One spelling for provenance: 'bfloat16', never 'torch.bfloat16'."""
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")


def text_config(config):
    """The language model's config of a (multimodal) model config."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else getattr(config, "text_config", config)


def attention_in_use(model: torch.nn.Module, text_types: tuple[str, ...] | None = None) -> str | None:
    """The attention the language model runs, read from the decoder modules themselves:
    in 4.47 a decoder's config may be a copy of `config.text_config` that says otherwise,
    and its attention classes are fixed when it is built, so their names are checked too.
    `text_types`: model_type of the decoder modules (default: the text config's)."""
    top = getattr(model, "config", None)
    if text_types is None:
        kind = getattr(text_config(top), "model_type", None) if top is not None else None
        text_types = (kind,) if kind else ()
    found = set()
    for lm in (m for m in model.modules()
               if getattr(getattr(m, "config", None), "model_type", None) in text_types):
        found.add(getattr(lm.config, "_attn_implementation", None))
        for module in lm.modules():
            name = type(module).__name__
            if name.endswith("Attention") and ("Flash" in name or "Sdpa" in name):
                found.add("flash_attention_2" if "Flash" in name else "sdpa")
    found.discard(None)
    if not found:  # no recognisable decoder: trust the top-level config
        return getattr(text_config(top), "_attn_implementation", None) if top is not None else None
    return found.pop() if len(found) == 1 else "+".join(sorted(found))
