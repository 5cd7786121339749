"""The UI's layer names: UNet levels, and a transformer's joint, single-stream, cross and unified blocks."""
import pytest

from crossattn_sd.service import layer_label


@pytest.mark.parametrize("name, hw, label", [
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn2", (8, 8), "up 1.0 · 8x8"),
    ("mid_block.attentions.0.transformer_blocks.0.attn2", (4, 4), "mid · 4x4"),
    ("transformer_blocks.3.attn", (64, 64), "joint 3 · 64x64"),  # SD3, FLUX double-stream
    ("single_transformer_blocks.12.attn", (64, 48), "single 12 · 64x48"),  # FLUX single-stream
    ("transformer_blocks.7.attn2", (32, 32), "cross 7 · 32x32"),  # Sana's cross-attention
    ("layers.29.attention", (64, 48), "layer 29 · 64x48"),  # Z-Image's unified-sequence attention
    ("noise_refiner.0.attention", (8, 8), "noise_refiner.0.attention · 8x8"),  # not a recorded layout: its name
    ("blocks.0.attn", (8, 12), "blocks.0.attn · 8x12"),  # an unknown layout keeps its name
])
def test_layer_label(name, hw, label):
    assert layer_label(name, hw) == label
