"""The UI's layer names: UNet levels, and a transformer's joint and single-stream blocks."""
import pytest

from crossattn_sd.service import layer_label


@pytest.mark.parametrize("name, hw, label", [
    ("up_blocks.1.attentions.0.transformer_blocks.0.attn2", (8, 8), "up 1.0 · 8x8"),
    ("mid_block.attentions.0.transformer_blocks.0.attn2", (4, 4), "mid · 4x4"),
    ("transformer_blocks.3.attn", (64, 64), "joint 3 · 64x64"),  # SD3, FLUX double-stream
    ("single_transformer_blocks.12.attn", (64, 48), "single 12 · 64x48"),  # FLUX single-stream
    ("transformer_blocks.0.attn2", (8, 8), "transformer_blocks.0.attn2 · 8x8"),  # SD3.5's image-only attention
    ("blocks.0.attn", (8, 12), "blocks.0.attn · 8x12"),  # an unknown layout keeps its name
])
def test_layer_label(name, hw, label):
    assert layer_label(name, hw) == label
