"""Turn heat maps into pictures: colourise (matplotlib colour maps), blend over the image, all-words grids,
timelines. numpy + PIL + matplotlib's colour maps only; no Gradio, no Diffusers.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DEFAULT_CMAP = "jet"
CMAPS = ("jet", "inferno", "viridis", "magma", "plasma", "turbo", "hot", "coolwarm", "gray")


@functools.lru_cache(maxsize=None)
def _lut(cmap: str) -> np.ndarray:
    """A colour map's 256 RGB entries as uint8 (matplotlib builds the table anew on every call: slow in a UI)."""
    import matplotlib

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown colour map {cmap!r}; try one of {', '.join(CMAPS)}") from None
    return (colormap(np.arange(colormap.N))[:, :3] * 255 + 0.5).astype(np.uint8)


def colorize(heatmap: np.ndarray, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 RGB through a matplotlib colour map."""
    lut = _lut(cmap)
    m = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    return lut[np.minimum((m * len(lut)).astype(np.intp), len(lut) - 1)]  # matplotlib's own binning


def blend(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.5, cmap: str = DEFAULT_CMAP) -> Image.Image:
    """The colourised `heatmap` laid over `image` with opacity `alpha` (0: image only, 1: map only)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} is out of range; use 0..1")
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    if heatmap.shape != base.shape[:2]:
        raise ValueError(f"heat map shape {heatmap.shape} does not match the image's (H, W) {base.shape[:2]}")
    colour = colorize(heatmap, cmap).astype(np.float32)
    return Image.fromarray((base * (1 - alpha) + colour * alpha + 0.5).astype(np.uint8))


@functools.lru_cache(maxsize=32)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def captioned(tile: Image.Image, caption: str, scale: int = 1) -> Image.Image:
    """`tile` (enlarged `scale` times, nearest neighbour) with `caption` in a band underneath."""
    if scale > 1:
        tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
    band = max(14, tile.width // 10)
    out = Image.new("RGB", (tile.width, tile.height + band), "white")
    out.paste(tile, (0, 0))
    draw = ImageDraw.Draw(out)
    font = _font(int(band * 0.75))
    text_w = draw.textlength(caption, font=font)
    draw.text(((tile.width - text_w) / 2, tile.height + band * 0.1), caption, fill="black", font=font)
    return out


def grid(image: Image.Image, maps: Mapping[str, np.ndarray], *, alpha: float = 0.5, cmap: str = DEFAULT_CMAP,
         columns: int | None = None, include_image: bool = True, min_tile: int = 192) -> Image.Image:
    """All words at a glance: the image, then one captioned overlay per word, in a grid."""
    tiles = [captioned(image.convert("RGB"), "image", 1)] if include_image else []
    scale = max(1, -(-min_tile // max(image.width, image.height)))  # enlarge small images for readability
    if include_image and scale > 1:
        tiles = [captioned(image.convert("RGB"), "image", scale)]
    tiles += [captioned(blend(image, m, alpha, cmap), word, scale) for word, m in maps.items()]
    if not tiles:
        raise ValueError("nothing to draw: no image and no maps")
    columns = columns or min(len(tiles), 4)
    rows = -(-len(tiles) // columns)
    w, h = tiles[0].size
    pad = 4
    sheet = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), "white")
    for k, tile in enumerate(tiles):
        sheet.paste(tile, (pad + (k % columns) * (w + pad), pad + (k // columns) * (h + pad)))
    return sheet


def timeline_frames(image: Image.Image, frames: Sequence[np.ndarray], labels: Sequence[str], *,
                    alpha: float = 0.5, cmap: str = DEFAULT_CMAP, scale: int = 1) -> list[Image.Image]:
    """One captioned overlay per step (e.g. "step 3 (t=801)")."""
    return [captioned(blend(image, m, alpha, cmap), label, scale) for m, label in zip(frames, labels)]


def animation(frames: Sequence[Image.Image], duration_ms: int = 250) -> bytes:
    """An endlessly looping GIF of `frames`."""
    if not frames:
        raise ValueError("no frames to animate")
    # Fast octree quantisation: Pillow's default (median cut) takes ~25 ms a frame, too slow for a UI.
    frames = [f.quantize(255, method=Image.Quantize.FASTOCTREE) for f in frames]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=list(frames[1:]), duration=duration_ms, loop=0)
    return buf.getvalue()
