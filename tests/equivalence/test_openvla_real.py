"""Opt-in: the OpenVLA stand-in against the REAL Prismatic classes, on the same tiny weights.

Set HARNESS_OPENVLA_CODE to a directory holding OpenVLA's `configuration_prismatic.py`,
`modeling_prismatic.py` and `processing_prismatic.py` (a checkpoint directory, or
`prismatic/extern/hf/` of github.com/openvla/openvla), in an environment with timm 0.9.16
and transformers 4.x (e.g. 4.47.1). Nothing of upstream is in this repository. The real
classes are built tiny (a 64-wide 2-layer Llama; two small timm ViTs handed out for the
timm ids the code asks for), their weights randomised and copied into the stand-in, and
the features, masks, pixels, action states and dtypes are compared.

torchvision: timm and the real processor import it, and the registry's torchvision is a
CUDA build whose compiled ops need libc10_cuda.so, absent beside the CPU torch; its package
`__init__` then fails registering those ops. Only its pure-Python transforms are used here,
so when `import torchvision` fails the package is entered without running that `__init__`
(test-only, `_torchvision_python_only`).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.extractors import openvla, openvla_standin as standin
from harness.extractors.engine.compat import attention_in_use
from harness.extractors.engine.hooks import capture
from harness.extractors.engine.pooling import masked_mean
from tests.random_samples import random_samples

CODE = os.environ.get("HARNESS_OPENVLA_CODE")
if not CODE:
    pytest.skip("opt-in: set HARNESS_OPENVLA_CODE to a directory with OpenVLA's Prismatic files "
                "(configuration_/modeling_/processing_prismatic.py) and install timm==0.9.16 "
                "to compare the stand-in with the real classes", allow_module_level=True)

FILES = ("configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py")
TIMM_IDS = ("vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224")


def _torchvision_python_only() -> None:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("torchvision")
    package = types.ModuleType("torchvision")
    package.__path__, package.__file__, package.__spec__ = [str(Path(spec.origin).parent)], spec.origin, spec
    sys.modules["torchvision"] = package
    package.__version__ = importlib.import_module("torchvision.version").__version__


def _import_real():
    missing = [f for f in FILES if not (Path(CODE) / f).is_file()]
    if missing:
        pytest.fail(f"HARNESS_OPENVLA_CODE={CODE} lacks {missing}")
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001  (RuntimeError from its op registration, or ImportError)
        _torchvision_python_only()
    import timm
    if timm.__version__ not in openvla.SUPPORTED_TIMM:
        pytest.fail(f"timm {timm.__version__} installed; the Prismatic code needs one of "
                    f"{openvla.SUPPORTED_TIMM}")
    package = types.ModuleType("_openvla_real")
    package.__path__ = [str(Path(CODE).resolve())]
    sys.modules["_openvla_real"] = package
    return (importlib.import_module("_openvla_real.configuration_prismatic"),
            importlib.import_module("_openvla_real.modeling_prismatic"),
            importlib.import_module("_openvla_real.processing_prismatic"), timm)


config_mod, modeling, processing, timm = _import_real()
ASKED: list[str] = []


def tiny_timm(name, pretrained=False, num_classes=0, img_size=224, act_layer=None, **_):
    """Small timm ViTs standing in for the ids Prismatic asks for (same structure: DINOv2
    with 4 registers and LayerScale; SigLIP without prefix tokens, MAP head)."""
    from timm.models.vision_transformer import VisionTransformer
    ASKED.append(name)
    assert not pretrained and num_classes == 0
    d, s = standin.DINO, standin.SIGLIP
    if name == TIMM_IDS[0]:
        return VisionTransformer(img_size=img_size, patch_size=14, embed_dim=d["width"],
                                 depth=d["depth"], num_heads=d["heads"], mlp_ratio=d["mlp"] / d["width"],
                                 init_values=1e-5, reg_tokens=4, no_embed_class=True,
                                 num_classes=0, act_layer=act_layer)
    if name == TIMM_IDS[1]:
        return VisionTransformer(img_size=img_size, patch_size=14, embed_dim=s["width"],
                                 depth=s["depth"], num_heads=s["heads"], mlp_ratio=s["mlp"] / s["width"],
                                 class_token=False, global_pool="map", num_classes=0,
                                 act_layer=act_layer)
    raise AssertionError(f"unexpected timm id {name}")


ATTN: dict = {"given": None}  # attention passed to the real loader (None: its own choice)


def build_real(config):
    """The real model; on transformers 4.57 its `_supports_sdpa` property reads the
    language model before it exists, so only an explicit eager attention builds there."""
    try:
        return modeling.OpenVLAForActionPrediction(config)
    except AttributeError as err:
        if "_supports_sdpa" not in str(err):
            raise
    config._attn_implementation = ATTN["given"] = "eager"
    return modeling.OpenVLAForActionPrediction(config)


def loader_kwargs() -> dict:
    return {} if ATTN["given"] is None else {"attn_implementation": ATTN["given"]}


@pytest.fixture(scope="module")
def real():
    """(real model fp32 with randomised weights, real processor, stand-in with those weights)."""
    original = timm.create_model
    timm.create_model = tiny_timm
    try:
        config = config_mod.OpenVLAConfig(
            vision_backbone_id="dinosiglip-vit-so-224px", llm_backbone_id="llama2-7b-pure",
            image_resize_strategy="resize-naive", text_config=standin.llama_config().to_dict(),
            norm_stats={"bridge_orig": {"action": {"q01": [0.0] * 7, "q99": [1.0] * 7}}})
        model = build_real(config).float().eval()
    finally:
        timm.create_model = original
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every weight matters (LayerScale 1e-5 would hide a branch)
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    image_processor = processing.PrismaticImageProcessor(
        use_fused_vision_backbone=True, image_resize_strategy="resize-naive",
        input_sizes=[(3, 224, 224)] * 2, interpolations=["bicubic", "bicubic"],
        means=[standin.IMAGENET_MEAN, standin.SIGLIP_MEAN], stds=[standin.IMAGENET_STD, standin.SIGLIP_STD])
    processor = processing.PrismaticProcessor(image_processor, standin.tokenizer())
    twin = standin.TinyOpenVLA(attn=attention_in_use(model.language_model)).float().eval()
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    assert missing == []
    assert unexpected and all(k.startswith("vision_backbone.fused_featurizer.attn_pool.")
                              for k in unexpected), unexpected  # the unused MAP head
    return model, processor, twin


def extractors(real, **kw):
    model, processor, twin = real
    return (openvla.OpenVLAExtractor("real", dtype="float32", model=model, processor=processor, **kw).load(),
            openvla.OpenVLAExtractor("tiny", dtype="float32", model=twin,
                                     processor=standin.TinyPrismaticProcessor(), **kw).load())


def test_the_code_asked_for_the_dinosiglip_timm_ids(real):
    assert ASKED[:2] == list(TIMM_IDS)


def test_processor_pixels_and_tokens_equal_the_real_processor(real):
    _, processor, _ = real
    mine = standin.TinyPrismaticProcessor()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in ((256, 256), (40, 48), (300, 180), (224, 224))]
    texts = [openvla.PROMPT.format(task=t) for t in ("put the spoon on the towel", "", "x", "open it")]
    want = processor(texts, images, padding=True)
    got = mine(texts, images, padding=True)
    assert want["pixel_values"].shape == (4, 6, 224, 224)
    assert torch.equal(got["pixel_values"], want["pixel_values"])
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])


@pytest.mark.parametrize("batch", [1, 4])
def test_features_equal_the_real_classes(real, batch):
    ex_real, ex_mine = extractors(real, layers="all")
    samples = random_samples(4, 0)[:batch]
    h_real = ex_real.forward(ex_real.build_inputs(samples))
    h_mine = ex_mine.forward(ex_mine.build_inputs(samples))
    assert h_real.layers["last"].shape[1] == h_real.mask.shape[1]
    assert torch.equal(h_real.mask, h_mine.mask)
    assert h_real.layers.keys() == h_mine.layers.keys()
    for name in h_real.layers:
        torch.testing.assert_close(h_mine.layers[name], h_real.layers[name], rtol=0, atol=1e-5)
    torch.testing.assert_close(masked_mean(h_mine.layers["last"], h_mine.mask),
                               masked_mean(h_real.layers["last"], h_real.mask), rtol=0, atol=1e-5)


def test_hook_on_the_final_norm_equals_last_hidden_state_on_the_real_classes(real):
    model, processor, _ = real
    inputs = processor([openvla.PROMPT.format(task="pick up the cup")], [random_samples(1, 0)[0][1]],
                       padding=True)
    with torch.no_grad(), capture(model, list(openvla.NORM_PATHS)) as hooked:
        out = model(**inputs, output_hidden_states=True, use_cache=False)
    assert hooked.calls == 1
    assert out.hidden_states[-1].shape[1] == 1 + 256 + inputs["input_ids"].shape[1] - 1
    assert torch.equal(hooked.output, out.hidden_states[-1])


def test_modality_masks_equal_and_select_the_patches(real):
    samples = random_samples(4, 0)
    tasks = [s[2] for s in samples]
    found = []
    for ex in extractors(real):
        inputs = ex.build_inputs(samples)
        masks = ex.modality_masks(inputs, tasks, ex.forward(inputs))
        assert masks.image.sum(dim=1).tolist() == [256] * 4
        assert masks.image[:, 1:257].all()
        found.append(masks)
    assert torch.equal(found[0].image, found[1].image) and torch.equal(found[0].text, found[1].text)
    assert found[0].text_fallback == found[1].text_fallback


def test_action_features_equal_the_real_classes_and_generate(real):
    ex_real, ex_mine = extractors(real)
    samples = random_samples(3, 0)
    inputs = ex_real.build_inputs(samples)
    got_real = ex_real.action_features(inputs)
    torch.testing.assert_close(ex_mine.action_features(ex_mine.build_inputs(samples)), got_real,
                               rtol=0, atol=1e-5)
    model = real[0]
    if not hasattr(model, "generate"):
        pytest.skip("this transformers gives the real classes no generate (>= 4.50): the loop "
                    "is compared with the stand-in only")
    for row in range(len(samples)):
        n = int(inputs["attention_mask"][row].sum())
        with torch.no_grad():
            out = model.generate(input_ids=inputs["input_ids"][row:row + 1, :n],
                                 attention_mask=inputs["attention_mask"][row:row + 1, :n],
                                 pixel_values=inputs["pixel_values"][row:row + 1],
                                 max_new_tokens=7, do_sample=False, output_hidden_states=True,
                                 return_dict_in_generate=True)
        seed = torch.cat([step[-1] for step in out.hidden_states[1:]], dim=1).float().mean(dim=1)
        assert len(out.hidden_states) == openvla.N_ACTION_TOKENS
        torch.testing.assert_close(got_real[row:row + 1], seed, rtol=0, atol=1e-5)


def test_bfloat16_loader_dtypes_equal_the_stand_in_policy(real, tmp_path):
    """from_pretrained(torch_dtype=bfloat16) on the real classes: which tensors are bf16 and
    which stay float32; the stand-in cast by `cast_like_loader` must match, and so must
    its bf16 features."""
    model, processor, _ = real
    original = timm.create_model
    timm.create_model = tiny_timm
    try:
        model.save_pretrained(tmp_path)
        loaded = modeling.OpenVLAForActionPrediction.from_pretrained(
            tmp_path, torch_dtype=torch.bfloat16, **loader_kwargs()).eval()
    finally:
        timm.create_model = original
    twin = standin.TinyOpenVLA(attn=attention_in_use(loaded.language_model))
    twin.load_state_dict(model.state_dict(), strict=False)
    openvla.cast_like_loader(twin, torch.bfloat16)
    # transformers 4.40.1 also keeps rotary `_cos_cached`/`_sin_cached` buffers, made in the
    # default dtype (bf16 under the loader) and never read by its forward: left out here.
    unused = ("attn_pool", "_cos_cached", "_sin_cached")

    def dtypes(m):
        return {n: t.dtype for n, t in [*m.named_parameters(), *m.named_buffers()]
                if not any(u in n for u in unused)}

    assert dtypes(twin) == dtypes(loaded)
    assert [n for n, d in dtypes(loaded).items() if d == torch.float32] == \
        [n for n, d in dtypes(twin).items() if d == torch.float32] != []
    ex_real = openvla.OpenVLAExtractor("real", dtype="bfloat16", model=loaded, processor=processor).load()
    ex_mine = openvla.OpenVLAExtractor("tiny", dtype="bfloat16", model=twin,
                                       processor=standin.TinyPrismaticProcessor()).load()
    samples = random_samples(2, 0)
    a = ex_real.forward(ex_real.build_inputs(samples))
    b = ex_mine.forward(ex_mine.build_inputs(samples))
    assert a.layers["last"].dtype == b.layers["last"].dtype == torch.bfloat16
    torch.testing.assert_close(masked_mean(b.layers["last"], b.mask),
                               masked_mean(a.layers["last"], a.mask), rtol=0, atol=2e-2)


def test_extractor_loads_a_checkpoint_directory_with_its_own_code(real, tmp_path):
    """The extractor's real loading path (`trust_remote_code`, AutoProcessor,
    AutoModelForVision2Seq, bf16) on a tiny checkpoint directory written with the real
    classes: the features equal the in-memory real model's, cast by the loader policy."""
    model, processor, _ = real
    for cls, auto in ((config_mod.OpenVLAConfig, "AutoConfig"),
                      (modeling.OpenVLAForActionPrediction, "AutoModelForVision2Seq"),
                      (processing.PrismaticImageProcessor, "AutoImageProcessor"),
                      (processing.PrismaticProcessor, "AutoProcessor")):
        cls.register_for_auto_class(auto)
    original = timm.create_model
    timm.create_model = tiny_timm
    try:
        model.save_pretrained(tmp_path)
        processor.save_pretrained(tmp_path)
        loaded = openvla.OpenVLAExtractor(str(tmp_path), dtype="bfloat16",
                                          attn_implementation=ATTN["given"]).load()
        direct = modeling.OpenVLAForActionPrediction.from_pretrained(
            tmp_path, torch_dtype=torch.bfloat16, **loader_kwargs())
    finally:
        timm.create_model = original
    assert type(loaded.model).__name__ == "OpenVLAForActionPrediction" and not loaded.stand_in
    prov = loaded.provenance()
    assert prov["dtype"] == "bfloat16" and prov["float32_tensors"] == openvla.float32_tensors(direct)
    assert prov["image_resize_strategy"] == "resize-naive" and prov["padding_side"] == "right"
    reference = openvla.OpenVLAExtractor("real", dtype="bfloat16", model=direct, processor=processor).load()
    samples = random_samples(2, 0)
    a = loaded.forward(loaded.build_inputs(samples))
    b = reference.forward(reference.build_inputs(samples))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.layers["last"], b.layers["last"])
