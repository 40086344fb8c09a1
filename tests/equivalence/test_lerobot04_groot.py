"""The groot extractor against the REAL LeRobot 0.4.4 GR00T N1.5 backbone (`EagleBackbone`
around the Eagle 2.5 code LeRobot ships), built tiny with random weights from a local
processor-assets directory (no hub): features == what the backbone feeds `eagle_linear`
(the input of GR00T's action head), the language model cut to `select_layer`, the dtype
the assets' config gives, modality masks, and the stand-in equal to the real classes on
the same weights.

Runs in the LeRobot venv (`.ci/run`, HARNESS_REQUIRE_LEROBOT=1); shims in
tests/lerobot04_shims.py (item 5: SigLIP built with sdpa, flash_attn being CUDA-only).
The real processor assets (Qwen3 tokenizer, Eagle chat template) are on the hub only: the
opt-in test at the end compares them with the extractor's prompt when
HARNESS_GROOT_ASSETS names a local copy.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.lerobot04_shims import eagle_siglip_sdpa, require_lerobot04

groot_n1 = require_lerobot04("lerobot.policies.groot.groot_n1")

from harness.extractors import groot_standin as standin  # noqa: E402
from harness.extractors.groot import EagleText, GrootExtractor, image_size_of  # noqa: E402
from tests.random_samples import random_samples  # noqa: E402

SELECT, BUILT = 2, 3  # the Eagle language model has 3 layers; the backbone keeps 2
WIDTH = 2048  # EagleBackbone's eagle_linear is nn.Linear(2048, project_to_dim): fixed


def eagle_config(tok, architecture: str, dtype: str = "float32") -> dict:
    """An Eagle 2.5 config.json: tiny SigLIP + a tiny text model of the fixed width."""
    from transformers import LlamaConfig, Qwen3Config, SiglipVisionConfig
    kind = Qwen3Config if architecture == "Qwen3ForCausalLM" else LlamaConfig
    text = kind(vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=64,
                num_hidden_layers=BUILT, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
                tie_word_embeddings=False).to_dict()
    text.update(architectures=[architecture], _attn_implementation="sdpa")
    vision = SiglipVisionConfig(hidden_size=standin.VISION_WIDTH,
                                intermediate_size=2 * standin.VISION_WIDTH, num_hidden_layers=1,
                                num_attention_heads=2, image_size=standin.IMAGE,
                                patch_size=standin.PATCH).to_dict()
    return dict(model_type="eagle_2_5_vl", architectures=["Eagle25VLForConditionalGeneration"],
                auto_map={"AutoConfig": "configuration_eagle2_5_vl.Eagle25VLConfig",
                          "AutoModel": "modeling_eagle2_5_vl.Eagle25VLForConditionalGeneration"},
                text_config=text, vision_config=vision, select_layer=-1, downsample_ratio=0.5,
                use_pixel_shuffle=True, mlp_connector_layers=2, force_image_size=standin.IMAGE,
                image_token_index=tok.convert_tokens_to_ids(standin.IMAGE_TOKEN),
                _attn_implementation="sdpa", torch_dtype=dtype)


def assets_dir(directory, architecture: str, dtype: str = "float32") -> Path:
    """The assets LeRobot's EagleBackbone loads (its `tokenizer_assets_repo`, here a local
    directory): ours plus empty placeholders for the hub files it insists on finding
    (vocab.json / merges.txt: the tokenizer here is a tokenizer.json)."""
    tok = standin.eagle_tokenizer()
    directory = standin.write_assets(directory, tok, eagle_config=eagle_config(tok, architecture, dtype))
    for name in ("vocab.json", "added_tokens.json", "generation_config.json"):
        if not (directory / name).exists():
            (directory / name).write_text("{}")
    (directory / "merges.txt").touch()
    return directory


def real_backbone(assets: Path):
    with eagle_siglip_sdpa(assets):
        torch.manual_seed(0)
        return groot_n1.EagleBackbone(select_layer=SELECT, tokenizer_assets_repo=str(assets),
                                      project_to_dim=1536).eval()


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    assets = assets_dir(tmp_path_factory.mktemp("groot_qwen3"), "Qwen3ForCausalLM")
    return real_backbone(assets), assets


def extractor(backbone, assets, **kw):
    return GrootExtractor("tiny-real", backbone=backbone, assets=str(assets), **kw).load()


def test_the_real_backbone_is_cut_to_select_layer(qwen3):
    backbone, _ = qwen3
    assert type(backbone.eagle_model.language_model).__name__ == "Qwen3ForCausalLM"
    assert len(backbone.eagle_model.language_model.model.layers) == SELECT


@pytest.mark.parametrize("fp32_compute", [True, False])
def test_hook_equals_what_the_backbone_projects_for_the_action_head(qwen3, fp32_compute):
    """feats == hidden_states[select_layer] of LeRobot's own Eagle forward, and
    eagle_linear(feats) == the backbone_features GR00T's action head reads."""
    backbone, assets = qwen3
    ex = extractor(backbone, assets, fp32_compute=fp32_compute)
    inputs = ex.build_inputs(random_samples(3, size=(standin.IMAGE, standin.IMAGE)))
    hidden = ex.forward(inputs).layers["last"]
    fed = dict(inputs)
    compute = torch.autocast("cpu", dtype=torch.bfloat16, enabled=not fp32_compute)
    if not fp32_compute:
        fed["eagle_pixel_values"] = fed["eagle_pixel_values"].to(torch.bfloat16)
    with torch.inference_mode(), compute:
        out = backbone(groot_n1.BatchFeature(data=dict(fed)))
        eagle = {k.removeprefix("eagle_"): v for k, v in fed.items() if k != "eagle_image_sizes"}
        states = backbone.eagle_model(**eagle, output_hidden_states=True).hidden_states
        projected = backbone.eagle_linear(hidden)
    assert len(states) == SELECT + 1
    assert torch.equal(hidden, states[SELECT])
    assert torch.equal(projected, out["backbone_features"])
    assert torch.equal(out["backbone_attention_mask"], inputs["eagle_attention_mask"])
    assert hidden.dtype == torch.float32  # float32 weights: the norm's output (autocast or not)


def test_modality_masks_pick_the_image_slots_and_the_task(qwen3):
    backbone, assets = qwen3
    ex = extractor(backbone, assets, fp32_compute=True)
    samples = random_samples(3, size=(standin.IMAGE, standin.IMAGE))
    inputs = ex.build_inputs(samples)
    hidden = ex.forward(inputs)
    masks = ex.modality_masks(inputs, [t for _, _, t in samples], hidden)
    ids = inputs["eagle_input_ids"]
    image_id = backbone.eagle_model.config.image_token_index
    assert torch.equal(masks.image, ids == image_id)
    assert masks.image.sum(1).tolist() == [backbone.eagle_model.num_image_token] * 3
    for row, (_, _, task) in enumerate(samples):
        if task.strip():
            assert ex.text.tokenizer.decode(ids[row][masks.text[row]]) == task


def test_the_eagle_dtype_follows_the_assets_config(tmp_path):
    """AutoModel.from_config builds the Eagle model in the config's dtype; eagle_linear is
    built outside it (float32). The record reads what ran; the bf16 forward runs on CPU."""
    assets = assets_dir(tmp_path / "bf16", "Qwen3ForCausalLM", dtype="bfloat16")
    ex = extractor(real_backbone(assets), assets)
    assert ex.provenance()["parameter_dtypes"] == {"eagle_model": ["bfloat16"],
                                                   "eagle_linear": ["float32"]}
    hidden = ex.forward(ex.build_inputs(random_samples(2))).layers["last"]
    assert hidden.dtype == torch.bfloat16 and torch.isfinite(hidden.float()).all()


def test_the_stand_in_equals_the_real_classes_on_the_same_weights(tmp_path):
    """The stand-in (Llama text model) and LeRobot's Eagle built from a Llama config of the
    same sizes, the stand-in's weights loaded strictly: same features, same masks."""
    assets = assets_dir(tmp_path / "llama", "LlamaForCausalLM")
    real = real_backbone(assets)
    tok = standin.eagle_tokenizer()
    fake = standin.TinyEagleBackbone(len(tok), tok.convert_tokens_to_ids(standin.IMAGE_TOKEN),
                                     width=WIDTH, project_to_dim=1536, select_layer=SELECT).eval()
    real.load_state_dict(fake.state_dict(), strict=True)
    samples = random_samples(4, size=(standin.IMAGE, standin.IMAGE))
    got = []
    for backbone in (fake, real):
        ex = extractor(backbone, assets, fp32_compute=True)
        inputs = ex.build_inputs(samples)
        hidden = ex.forward(inputs)
        got.append((inputs, hidden.layers["last"], hidden.mask))
    assert torch.equal(got[0][0]["eagle_input_ids"], got[1][0]["eagle_input_ids"])
    assert torch.equal(got[0][2], got[1][2])
    assert torch.equal(got[0][1], got[1][1])


def test_a_saved_gr00t_checkpoint_loads_through_the_extractor(tmp_path):
    """GR00TN15 (backbone + a tiny flow-matching action head) saved by LeRobot, loaded by
    the extractor's own path (GR00TN15.from_pretrained with --assets): the same backbone
    weights, and features equal to the saved model's backbone on the same inputs."""
    assets = assets_dir(tmp_path / "assets", "Qwen3ForCausalLM")
    backbone_cfg = dict(tune_llm=False, tune_visual=False, select_layer=SELECT,
                        reproject_vision=False, use_flash_attention=False, load_bf16=False,
                        tokenizer_assets_repo=str(assets), project_to_dim=1536)
    head = dict(diffusion_model_cfg=dict(num_attention_heads=2, attention_head_dim=8,
                                         output_dim=16, num_layers=1, cross_attention_dim=1536),
                input_embedding_dim=16, backbone_embedding_dim=1536, hidden_size=16,
                max_seq_len=64, action_dim=4, action_horizon=4, num_inference_timesteps=2,
                max_num_embodiments=2, use_vlln=False, num_target_vision_tokens=2,
                max_state_dim=8)
    config = groot_n1.GR00TN15Config(backbone_cfg=backbone_cfg, action_head_cfg=head,
                                     action_horizon=4, action_dim=4)
    with eagle_siglip_sdpa(assets):
        torch.manual_seed(0)
        model = groot_n1.GR00TN15(config, local_model_path=str(tmp_path / "ckpt")).eval()
        model.save_pretrained(tmp_path / "ckpt")
    elsewhere = assets_dir(tmp_path / "assets2", "Qwen3ForCausalLM")  # --assets: its own copy
    ex = GrootExtractor(str(tmp_path / "ckpt"), assets=str(elsewhere), fp32_compute=True)
    with eagle_siglip_sdpa(elsewhere):
        ex.load()
    assert ex.api_source == "lerobot:lerobot.policies.groot.groot_n1"
    saved, loaded = model.backbone.state_dict(), ex.backbone.state_dict()
    assert set(saved) == set(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)
    inputs = ex.build_inputs(random_samples(2, size=(standin.IMAGE, standin.IMAGE)))
    hidden = ex.forward(inputs).layers["last"]
    with torch.inference_mode():
        out = model.backbone(groot_n1.BatchFeature(data=dict(inputs)))
        assert torch.equal(ex.backbone.eagle_linear(hidden), out["backbone_features"])


ASSETS = os.environ.get("HARNESS_GROOT_ASSETS")


@pytest.mark.skipif(not ASSETS, reason="opt-in: set HARNESS_GROOT_ASSETS to a local copy of "
                    "lerobot/eagle2hg-processor-groot-n1p5 (and install a working torchvision) "
                    "to compare the extractor's prompt and pixels with the real Eagle processor")
def test_prompt_and_pixels_equal_the_real_eagle_processor():
    """LeRobot's own GrootEagleEncodeStep + collate on the real assets vs the extractor."""
    from lerobot.policies.groot import processor_groot
    from lerobot.policies.groot.utils import ensure_eagle_cache_ready
    from PIL import Image
    from transformers import AutoProcessor

    assets = Path(ASSETS)
    ensure_eagle_cache_ready(groot_n1.DEFAULT_VENDOR_EAGLE_PATH, assets, str(assets))
    proc = AutoProcessor.from_pretrained(str(assets), trust_remote_code=True, use_fast=True)
    proc.tokenizer.padding_side = "left"
    samples = random_samples(3, size=(224, 224))
    contents = []
    for _, image, task in samples:  # the pack step's [0, 1] -> uint8 first, as LeRobot feeds it
        x01 = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        image = Image.fromarray(processor_groot._to_uint8_np_bhwc(x01[None])[0])
        conv = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": str([task])}]}]
        text = proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        images, videos = proc.process_vision_info(conv)
        contents.append({"eagle_content": {"text_list": [text], "image_inputs": images,
                                           "video_inputs": videos}})
    want = processor_groot.collate(contents, proc)
    ex = GrootExtractor("assets", assets=str(assets))  # the processor half only: no model
    ex.text, ex.image_size = EagleText.from_assets(assets), image_size_of(assets)
    got = ex.build_inputs(samples)
    assert ex.text.tokens_per_tile == proc.tokens_per_tile
    assert torch.equal(got["eagle_input_ids"], want["eagle_input_ids"])
    assert torch.equal(got["eagle_attention_mask"], want["eagle_attention_mask"])
    assert torch.equal(got["eagle_pixel_values"], want["eagle_pixel_values"])
