"""The transformer presets, checked on their published configs without downloading: every preset names a
supported family, and the full SD3.5 medium and large transformers (tests/configs/, typed from their
`transformer/config.json`) built on the meta device have every joint layer found, the image-only `attn2` layers
left alone, and a shapes-only forward pass at 1024 px that records maps on the 64 x 64 patch grid."""

import pytest
import torch

from conftest import check_meta_capture, meta_model
from crossattn_sd.config import PRESET_FAMILIES, load_presets
from crossattn_sd.families import FAMILIES
from crossattn_sd.families.sd3 import JointCaptureProcessor
from crossattn_sd.processors import cross_attention_layers

FAMILY_OF_PRESET = {"sd": "unet", "sdxl": "unet", "sd3": "sd3", "flux": "flux", "flux2": "flux2",
                    "chroma": "chroma", "sana": "sana", "qwenimage": "qwenimage",
                    "zimage": "zimage"}


@pytest.mark.parametrize("name, source, family, size, steps, guidance", [
    ("sd35-medium", "stabilityai/stable-diffusion-3.5-medium", "sd3", 1024, 40, 4.5),
    ("sd35-large", "stabilityai/stable-diffusion-3.5-large", "sd3", 1024, 28, 3.5),
    ("flux1-dev", "black-forest-labs/FLUX.1-dev", "flux", 1024, 28, 3.5),
    ("flux1-schnell", "black-forest-labs/FLUX.1-schnell", "flux", 1024, 4, 0.0),
    ("flux2-klein-4b", "black-forest-labs/FLUX.2-klein-4B", "flux2", 1024, 4, 1.0),
    ("chroma1-hd", "lodestones/Chroma1-HD", "chroma", 1024, 40, 3.0),
    ("sana-1600m-1024", "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers", "sana", 1024, 20, 4.5),
    ("qwen-image", "Qwen/Qwen-Image", "qwenimage", 1328, 50, 4.0),
    ("z-image-turbo", "Tongyi-MAI/Z-Image-Turbo", "zimage", 1024, 9, 0.0),
])
def test_transformer_presets(name, source, family, size, steps, guidance):
    preset = load_presets()[name]
    assert (preset.source, preset.family, preset.height, preset.width) == (source, family, size, size)
    assert (preset.steps, preset.guidance) == (steps, guidance)
    assert preset.max_side >= size and preset.examples and preset.description


def test_every_preset_loads_and_names_a_supported_family():
    names = {family.name for family in FAMILIES}
    assert set(FAMILY_OF_PRESET) == set(PRESET_FAMILIES) and set(FAMILY_OF_PRESET.values()) <= names
    presets = load_presets()
    assert {"sd35-medium", "sd35-large", "flux1-dev", "flux1-schnell", "flux2-klein-4b"} <= set(presets)
    for preset in presets.values():
        assert FAMILY_OF_PRESET[preset.family] in names, preset.name


@pytest.mark.parametrize("config, num_layers, dual, heads", [
    ("sd35_medium_transformer.json", 24, 13, 24),
    ("sd35_large_transformer.json", 38, 0, 38),
])
def test_full_sd35_transformer_on_the_meta_device(config, num_layers, dual, heads):
    transformer = meta_model("SD3Transformer2DModel", config, include_buffers=True)  # the positional table too
    layers = cross_attention_layers(transformer)
    assert layers == [f"transformer_blocks.{i}.attn" for i in range(num_layers)]
    assert transformer.transformer_blocks[0].attn.heads == heads
    image_only = [k for k in transformer.attn_processors if ".attn2." in k]
    assert len(image_only) == dual
    meta = dict(device="meta")
    latent, grid, text = 128, 64, 77 + 256  # 1024 px / VAE factor 8; patch 2; CLIP's 77 then T5's 256
    args = dict(hidden_states=torch.empty(1, 16, latent, latent, **meta),
                encoder_hidden_states=torch.empty(1, text, 4096, **meta),
                pooled_projections=torch.empty(1, 2048, **meta), timestep=torch.empty(1, **meta))
    # the image-only attention (SD3.5 Medium's attn2) sees no text and keeps its processor
    check_meta_capture(transformer, layers, JointCaptureProcessor, args, grid, text, untouched=image_only)