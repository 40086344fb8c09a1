"""`python -m harness extract {spatialvla,pi0_lerobot,starvla,hf}`: write `<out>/feats_A.pt`.

Mirrors the seed's per-model scripts (`--ckpt`, `--data_dir`, `--output_dir`) and adds
batching, dtype/device/layer choice, a sample limit and resume. `--ckpt tiny` (or a
`tiny:` name) runs the family's tiny random-weight stand-in: a CPU demo, and what CI runs.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
from typing import Iterator

from harness.commands import resolve_device
from harness.errors import HarnessError

FAMILIES = ("spatialvla", "pi0_lerobot", "starvla", "hf")
DEFAULT_CKPT = {
    "spatialvla": "IPEC-COMMUNITY/spatialvla-4b-224-sft-bridge",
    "pi0_lerobot": "HaomingSong/lerobot-pi0-bridge",
}
TINY_DEFAULT = {"starvla": "tiny:qwen2_5_vl", "hf": "tiny:paligemma"}
TINY_HELP = {
    "spatialvla": "'tiny' (PaliGemma2 + SpatialVLA-style processor)",
    "pi0_lerobot": "'tiny' (old LeRobot API) or 'tiny:new' (LeRobot 0.6 shape)",
    "starvla": "'tiny' / 'tiny:qwen2_5_vl' or 'tiny:qwen3_vl'",
    "hf": "'tiny:<gemma|gemma2|paligemma|paligemma2|qwen2_5_vl|qwen3_vl>'",
}
HELP = {
    "spatialvla": "SpatialVLA: hidden_states[-1], eager attention, do_normalize=False",
    "pi0_lerobot": "LeRobot Pi0: prefill-only, final-norm hook, audited weights",
    "starvla": "StarVLA / HF Qwen-VL: CoT prompt, 224x224, left padding",
    "hf": "any transformers VLM or LM: hidden_states layers",
}


def register(subparsers) -> None:
    parser = subparsers.add_parser("extract", help="extract pooled VLM features (feats_A.pt)")
    sub = parser.add_subparsers(dest="family", required=True)
    for family in FAMILIES:
        p = sub.add_parser(family, help=HELP[family], description=HELP[family])
        _common(p, family)
        _FAMILY_OPTIONS[family](p)
        p.set_defaults(func=run)


def _common(p: argparse.ArgumentParser, family: str) -> None:
    default = DEFAULT_CKPT.get(family)
    p.add_argument("--ckpt", "--ckpt_path", dest="ckpt", default=default, required=default is None,
                   help=f"hub id or local path, or {TINY_HELP[family]} for the stand-in"
                        f"{f' (default {default})' if default else ''}")
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", required=True,
                   help="data directory (metadata.json, images/, feats_B.pt)")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", required=True,
                   help="where feats_A.pt and extraction_metadata.json go")
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=8)
    p.add_argument("--dtype", default="auto",
                   help="float32 | bfloat16 | float16 | auto (bf16 for real checkpoints, "
                        "fp32 for stand-ins; Pi0: the checkpoint's own)")
    p.add_argument("--device", default="auto", help="cuda | cpu | cuda:N | auto")
    p.add_argument("--layers", default="last",
                   help="'last', 'all', or comma-separated hidden_states indices (e.g. 0,13,-1)")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples")
    p.add_argument("--resume", action="store_true", help="keep finished shards, do the rest")
    p.add_argument("--revision", default=None, help="hub revision (commit, tag or branch)")


def _spatialvla_options(p):
    p.add_argument("--unnorm_key", default="bridge_orig/1.0.0",
                   help="dataset key selecting the camera intrinsics (ZoeDepth)")


def _pi0_options(p):
    p.add_argument("--image_key", default=None, help="override the image key from config.image_features")
    p.add_argument("--seed_tokenization", action="store_true",
                   help="reproduce the seed script's tokenisation (no trailing newline)")
    p.add_argument("--allow_missing_keys", nargs="+", default=[], metavar="GLOB",
                   help="model weights allowed to be absent from the checkpoint")
    p.add_argument("--allow_unexpected_keys", nargs="+", default=[], metavar="GLOB",
                   help="checkpoint tensors allowed to match no model weight")
    p.add_argument("--pi0_code", choices=("auto", "bundled", "lerobot"), default="auto",
                   help="the checkpoint's modeling_pi0.py (old API) or the installed LeRobot")


def _starvla_options(p):
    p.add_argument("--cot_prompt", default=None,
                   help="prompt with {instruction} (default: StarVLA's grounding CoT prompt)")
    p.add_argument("--image_size", type=int, default=224)


def _hf_options(p):
    p.add_argument("--prompt_template", default="{task}")
    p.add_argument("--chat_template", action="store_true")
    p.add_argument("--image_size", type=int, default=None)
    p.add_argument("--padding_side", choices=("left", "right"), default=None)
    p.add_argument("--tokens", choices=("all", "image", "text"), default="all")
    p.add_argument("--attn_implementation", default="eager")


_FAMILY_OPTIONS = {"spatialvla": _spatialvla_options, "pi0_lerobot": _pi0_options,
                   "starvla": _starvla_options, "hf": _hf_options}


# ------------------------------------------------------------------ building
def is_tiny(ckpt: str) -> bool:
    return ckpt == "tiny" or ckpt.startswith("tiny:")


def parse_layers(text: str):
    text = text.strip()
    if text in ("last", "all"):
        return text
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise HarnessError(f"--layers: expected 'last', 'all' or integers, got {text!r}") from None


def resolve_dtype(dtype: str, tiny: bool, family: str) -> str | None:
    if dtype != "auto":
        return dtype
    if tiny:
        return "float32"
    return None if family == "pi0_lerobot" else "bfloat16"


@contextlib.contextmanager
def build_extractor(args: argparse.Namespace) -> Iterator[object]:
    """The family's extractor, loaded; temporary stand-in checkpoints live as long as it."""
    family, ckpt = args.family, args.ckpt
    tiny = is_tiny(ckpt)
    device = str(resolve_device(args.device))
    dtype = resolve_dtype(args.dtype, tiny, family)
    layers = parse_layers(args.layers)
    with contextlib.ExitStack() as stack:
        if family == "spatialvla":
            from harness.extractors.spatialvla import SpatialVLAExtractor
            kw = dict(device=device, dtype=dtype, unnorm_key=args.unnorm_key,
                      revision=args.revision, layers=_int_layers(layers, family))
            if tiny:
                from harness.extractors.standins import tiny_spatialvla
                model, processor = tiny_spatialvla()
                kw.update(model=model, processor=processor)
            extractor = SpatialVLAExtractor(ckpt, **kw)
        elif family == "pi0_lerobot":
            from harness.extractors.pi0_lerobot import Pi0LeRobotExtractor
            if layers != "last":
                raise HarnessError("pi0_lerobot: only --layers last (the final norm) is supported")
            path = ckpt
            if tiny:
                from harness.extractors.standins import save_tiny_pi0_checkpoint
                path = stack.enter_context(tempfile.TemporaryDirectory(prefix="tiny_pi0_"))
                save_tiny_pi0_checkpoint(path, new_api=ckpt == "tiny:new")
            extractor = Pi0LeRobotExtractor(
                path, name=ckpt, device=device, dtype=dtype, image_key=args.image_key,
                seed_tokenization=args.seed_tokenization, allow_missing=args.allow_missing_keys,
                allow_unexpected=args.allow_unexpected_keys, revision=args.revision,
                code=args.pi0_code)
        elif family == "starvla":
            from harness.extractors.starvla import COT_PROMPT, StarVLAExtractor
            extractor = StarVLAExtractor(
                TINY_DEFAULT["starvla"] if ckpt == "tiny" else ckpt, device=device, dtype=dtype,
                layers=layers, cot_prompt=args.cot_prompt or COT_PROMPT,
                image_size=args.image_size, revision=args.revision)
        else:
            from harness.extractors.hf_vlm import HfVlmExtractor
            extractor = HfVlmExtractor(
                TINY_DEFAULT["hf"] if ckpt == "tiny" else ckpt, layers=layers, tokens=args.tokens,
                device=device, dtype=dtype, attn_implementation=args.attn_implementation,
                padding_side=args.padding_side, prompt_template=args.prompt_template,
                chat_template=args.chat_template, image_size=args.image_size,
                revision=args.revision)
        yield extractor.load()


def _int_layers(layers, family: str):
    if layers == "last":
        return ()
    if layers == "all":
        raise HarnessError(f"{family}: give explicit --layers indices (e.g. 0,13,26)")
    return tuple(layers)


# ------------------------------------------------------------------ running
def run(args: argparse.Namespace) -> int:
    from torch.utils.data import Subset

    from harness import data as data_mod
    from harness import features
    from harness.io import check_output_dir

    if args.batch_size < 1:
        raise HarnessError(f"--batch_size must be >= 1, got {args.batch_size}")
    out = check_output_dir(args.output_dir, "--output_dir")
    if not args.resume and any((out / features.SHARD_DIR).glob("shard_*.pt")):
        raise HarnessError(f"{out}: holds shards of an earlier run; pass --resume to finish "
                           "it, or choose an empty output directory")
    data = data_mod.load(args.data_dir)
    samples = data_mod.ImageTaskDataset(data)
    if args.limit is not None:
        if args.limit < 1:
            raise HarnessError(f"--limit must be >= 1, got {args.limit}")
        samples = Subset(samples, range(min(args.limit, len(samples))))
    features.init_from_env()  # torchrun: each rank takes its share of the shards
    with build_extractor(args) as extractor:
        layers = features.extract(extractor, samples, out, batch_size=args.batch_size,
                                  dataset_fingerprint=data_mod.fingerprint(args.data_dir),
                                  progress=True)  # a bar on a terminal, else lines
    if layers is not None:
        shape = tuple(layers["last"].shape)
        print(f"{args.family}: wrote {out / features.FEATS} {shape} and {features.METADATA}")
    return 0
