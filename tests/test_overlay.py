"""Overlays: colour maps, blending, grids, animations."""
import io

import matplotlib
import numpy as np
import pytest
from PIL import Image

from crossattn_sd.overlay import CMAPS, animation, blend, captioned, colorize, grid, timeline_frames


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))


@pytest.fixture
def heat():
    return np.linspace(0, 1, 16 * 24, dtype=np.float32).reshape(16, 24)


def test_colorize_shape_dtype_and_values(heat):
    rgb = colorize(heat, "viridis")
    assert rgb.shape == (16, 24, 3) and rgb.dtype == np.uint8
    expected = (matplotlib.colormaps["viridis"](heat)[..., :3] * 255 + 0.5).astype(np.uint8)
    assert (rgb == expected).all()
    clipped = colorize(np.array([[-1.0, 2.0, np.nan]]), "gray")  # out of range and NaN are clamped
    assert clipped.tolist() == [[[0, 0, 0], [255, 255, 255], [0, 0, 0]]]
    assert all(colorize(heat, name).shape == (16, 24, 3) for name in CMAPS)


def test_unknown_cmap_is_a_value_error(heat):
    with pytest.raises(ValueError, match="unknown colour map 'nope'; try one of jet"):
        colorize(heat, "nope")


def test_blend_alpha_0_is_the_image_and_1_the_colour_map(image, heat):
    out0 = blend(image, heat, alpha=0.0)
    out1 = blend(image, heat, alpha=1.0, cmap="inferno")
    assert out0.size == image.size and out0.mode == "RGB"
    assert (np.asarray(out0) == np.asarray(image)).all()
    assert (np.asarray(out1) == colorize(heat, "inferno")).all()
    half = np.asarray(blend(image, heat, alpha=0.5), dtype=np.int16)
    mix = (np.asarray(image, dtype=np.float32) + colorize(heat)) / 2
    assert np.abs(half - mix).max() <= 0.5 + 1e-6


def test_blend_refuses_bad_alpha_and_shape(image, heat):
    with pytest.raises(ValueError, match="alpha=1.5 is out of range"):
        blend(image, heat, alpha=1.5)
    with pytest.raises(ValueError, match=r"heat map shape \(24, 16\) does not match the image's"):
        blend(image, heat.T)


def test_grid_size(image, heat):
    maps = {"red": heat, "circle": heat[::-1], "left": 1 - heat}
    # 24 px images are enlarged 8x to reach min_tile=192; caption band max(14, 192 // 10) = 19 px; 4 px gaps
    tile_w, tile_h = 24 * 8, 16 * 8 + 19
    sheet = grid(image, maps)
    assert sheet.size == (4 * (tile_w + 4) + 4, tile_h + 8)
    two = grid(image, maps, columns=2, include_image=False)
    assert two.size == (2 * (tile_w + 4) + 4, 2 * (tile_h + 4) + 4)
    assert captioned(image, "x", 2).size == (48, 32 + 14)
    with pytest.raises(ValueError, match="nothing to draw"):
        grid(image, {}, include_image=False)


def test_animation_is_a_looping_gif(image, heat):
    frames = timeline_frames(image, [heat, 1 - heat, heat * 0.5], ["step 0", "step 1", "step 2"], scale=2)
    assert len(frames) == 3 and frames[0].size == (48, 32 + 14)
    data = animation(frames, duration_ms=100)
    assert isinstance(data, bytes) and data[:6] == b"GIF89a"
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.n_frames == 3 and gif.info["loop"] == 0 and gif.info["duration"] == 100
    with pytest.raises(ValueError, match="no frames to animate"):
        animation([])
