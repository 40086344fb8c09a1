"""Test-only shims that let the REAL LeRobot 0.4.x `PI0Policy` be built tiny, offline, on
CPU, next to torch 2.13 and stock transformers 4.57 (the `.ci/lerobot-0.4.txt` venv).

They exist because of three facts of LeRobot 0.4.4, none of which touches the prefix
forward the extractor runs (read from its source, lerobot/policies/pi0/modeling_pi0.py):
1. `lerobot.policies` imports torchvision at module level (datasets/utils.py,
   datasets/transforms.py), but the only torchvision for torch 2.13 on the registry is a
   CUDA build that fails to import on a CPU torch. Pi0's model code never calls it, so a
   package stub is put in `sys.modules` (with a real ModuleSpec: transformers asks
   `importlib.util.find_spec("torchvision")`).
2. `PI0Pytorch.__init__` refuses to run unless `transformers.models.siglip.check` (a module
   only LeRobot's git-only transformers fork has) says the fork is installed. The fork
   changes the joint prefix+suffix path (adaRMS norms); the prefix-only path is stock
   Gemma. A stub module answering True is installed.
3. `PI0Config` (and Pi0.5's, Pi0-FAST's) only knows the gemma_2b / gemma_300m sizes and
   `PaliGemmaWithExpertModel` hard-codes a 27-layer SigLIP-so400m: `modeling_pi0.get_gemma_config` is replaced with
   tiny sizes and the PaliGemma constructor shrinks the vision config first.
4. (SmolVLA) `SmolVLMWithExpertModel.__init__` calls `AutoProcessor.from_pretrained` on the
   VLM directory, and the SmolVLM processor needs a video processor that requires
   torchvision; LeRobot reads only `processor.tokenizer` from it
   (`fake_image_token_id`, `global_image_token_id`). `smolvlm_tokenizer_only_processor`
   hands it an object holding just the directory's tokenizer.
5. (GR00T) `Eagle25VLForConditionalGeneration.__init__` sets the SigLIP tower's attention to
   flash_attention_2 unconditionally, and transformers refuses that without the flash_attn
   package (CUDA only): "FlashAttention2 has been toggled on, but it cannot be used due to
   the following error: the package flash_attn seems to be not installed."
   `eagle_siglip_sdpa` builds the tower with sdpa instead (same maths, another kernel).
Nothing here is used by the harness package; the extractor runs unpatched code paths.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import types

TORCHVISION_MODULES = ("torchvision", "torchvision.io", "torchvision.transforms",
                       "torchvision.transforms.functional", "torchvision.transforms.v2",
                       "torchvision.transforms.v2.functional")


def _placeholder(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (), {"__init__": lambda self, *a, **k: None})


def stub_torchvision() -> bool:
    """Install the torchvision stub unless a working torchvision imports; True if stubbed."""
    try:
        import torchvision  # noqa: F401
        return False
    except Exception:  # absent, or a CUDA build on a CPU torch
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
    for name in TORCHVISION_MODULES:
        module = types.ModuleType(name)
        module.__path__ = []
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module.__getattr__ = _placeholder
        sys.modules[name] = module
    for name in TORCHVISION_MODULES[1:]:
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, sys.modules[name])
    return True


def stub_transformers_fork_check() -> bool:
    """Make LeRobot's "is the transformers fork installed" check pass; True if stubbed."""
    import transformers.models.siglip as siglip
    try:
        from transformers.models.siglip import check  # noqa: F401  (the fork itself)
        return False
    except ImportError:
        check = types.ModuleType("transformers.models.siglip.check")
        check.check_whether_transformers_replace_is_installed_correctly = lambda: True
        sys.modules[check.__name__] = check
        siglip.check = check
        return True


# Both towers share heads / kv heads / head_dim (they attend jointly); 8 heads because the
# joint path hard-codes `8 * head_dim`. Widths differ so a mixed-up tower shows in shapes.
TINY_SIZES = {"gemma_2b": dict(width=64, depth=2, mlp_dim=128, num_heads=8, num_kv_heads=1,
                               head_dim=16),
              "gemma_300m": dict(width=32, depth=2, mlp_dim=64, num_heads=8, num_kv_heads=1,
                                 head_dim=16)}


@contextlib.contextmanager
def tiny_pi0_sizes(modeling_pi0=None):
    """While active, `PI0Policy(config)` builds tiny towers and a 1-layer SigLIP; the same
    for Pi0.5 / Pi0-FAST given their modeling module (same two names, same 3.)."""
    if modeling_pi0 is None:
        from lerobot.policies.pi0 import modeling_pi0

    real_sizes, real_paligemma = modeling_pi0.get_gemma_config, modeling_pi0.PaliGemmaForConditionalGeneration

    def tiny_paligemma(config):
        vision = config.vision_config
        vision.hidden_size, vision.intermediate_size = 32, 64
        vision.num_hidden_layers, vision.num_attention_heads, vision.patch_size = 1, 2, 14
        vision.projection_dim = config.projection_dim = config.hidden_size = \
            config.text_config.hidden_size  # image tokens enter at the text width
        return real_paligemma(config=config)

    modeling_pi0.get_gemma_config = lambda variant: modeling_pi0.GemmaConfig(**TINY_SIZES[variant])
    modeling_pi0.PaliGemmaForConditionalGeneration = tiny_paligemma
    try:
        yield
    finally:
        modeling_pi0.get_gemma_config = real_sizes
        modeling_pi0.PaliGemmaForConditionalGeneration = real_paligemma


@contextlib.contextmanager
def smolvlm_tokenizer_only_processor():
    """While active, SmolVLA's VLM "processor" is the directory's tokenizer alone (4.)."""
    from transformers import AutoTokenizer

    from lerobot.policies.smolvla import smolvlm_with_expert

    class TokenizerOnly:
        @staticmethod
        def from_pretrained(path, **kwargs):
            return types.SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(path))

    real = smolvlm_with_expert.AutoProcessor
    smolvlm_with_expert.AutoProcessor = TokenizerOnly
    try:
        yield
    finally:
        smolvlm_with_expert.AutoProcessor = real


@contextlib.contextmanager
def eagle_siglip_sdpa(assets_dir):
    """While active, the Eagle model built from `assets_dir` (LeRobot's processor-assets
    directory, which EagleBackbone loads the Eagle code from) gets an sdpa SigLIP (5.)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from lerobot.policies.groot.groot_n1 import DEFAULT_VENDOR_EAGLE_PATH
    from lerobot.policies.groot.utils import ensure_eagle_cache_ready

    ensure_eagle_cache_ready(DEFAULT_VENDOR_EAGLE_PATH, assets_dir, str(assets_dir))
    eagle = get_class_from_dynamic_module(
        "modeling_eagle2_5_vl.Eagle25VLForConditionalGeneration", str(assets_dir))
    module = sys.modules[eagle.__module__]
    real = module.SiglipVisionModel

    def sdpa_siglip(config):
        config._attn_implementation = "sdpa"
        return real(config)

    module.SiglipVisionModel = sdpa_siglip
    try:
        yield
    finally:
        module.SiglipVisionModel = real


def require_lerobot04(module: str):
    """Import `module` from LeRobot 0.4.x with the shims above, or skip the calling test
    file; HARNESS_REQUIRE_LEROBOT=1 (.ci/run) turns the skip into a failure."""
    import importlib.metadata
    import importlib.util
    import os

    import pytest

    required = os.environ.get("HARNESS_REQUIRE_LEROBOT") == "1"
    if importlib.util.find_spec("lerobot") is not None:
        stub_torchvision()
        stub_transformers_fork_check()
    elif required:
        pytest.fail("HARNESS_REQUIRE_LEROBOT=1 but lerobot is not installed", pytrace=False)
    found = pytest.importorskip(
        module, reason="lerobot 0.4.x is not installed here; .ci/run runs this in its own venv")
    version = importlib.metadata.version("lerobot")
    if not version.startswith("0.4."):
        if required:
            pytest.fail(f"expected lerobot 0.4.x, found {version}", pytrace=False)
        pytest.skip("these checks are written for lerobot 0.4.x", allow_module_level=True)
    return found
