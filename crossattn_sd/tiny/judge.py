"""A pixel judge: does a generated image show the scene its caption asked for?

Every pixel is snapped to the nearest palette colour (background included). An object is
right when its colour covers enough pixels in its named half of the image and the largest
connected blob of that colour there has the right shape, told apart by how much of its
bounding box it fills (square ~1.0, circle ~0.785, triangle ~0.5) and by its aspect ratio.
A scene is right when every object is right and no colour shows up in quantity where the
scene put nothing of that colour.

numpy only, like world.py.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .world import BACKGROUND, COLOURS, Scene

PALETTE_NAMES = ("background",) + tuple(COLOURS)
PALETTE = np.array([BACKGROUND] + list(COLOURS.values()), dtype=np.float32)

MIN_PIXELS = 40  # the smallest object (a triangle of half-width 7.7 px) covers ~118 px
FILL = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
MAX_ASPECT = 1.4  # every shape has a square bounding box; anything longer is not a shape


def palette_labels(image: np.ndarray) -> np.ndarray:
    """(H, W) index into PALETTE_NAMES of each pixel's nearest palette colour."""
    px = np.asarray(image, dtype=np.float32)[..., :3]
    d = ((px[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def half_mask(position: str, size: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    h = size // 2
    if position == "left":
        m[:, :h] = True
    elif position == "right":
        m[:, h:] = True
    elif position == "top":
        m[:h, :] = True
    elif position == "bottom":
        m[h:, :] = True
    else:
        raise ValueError(f"unknown position {position!r}")
    return m


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (plain BFS: masks are 64 x 64)."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp, queue = [], deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(comp) > len(best):
            best = comp
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def classify_shape(blob: np.ndarray) -> str | None:
    """Shape whose bounding-box fill ratio is nearest the blob's; None if not shape-like."""
    ys, xs = np.nonzero(blob)
    if len(ys) < MIN_PIXELS:
        return None
    bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    if max(bh, bw) / min(bh, bw) > MAX_ASPECT:
        return None
    fill = len(ys) / (bh * bw)
    return min(FILL, key=lambda s: abs(FILL[s] - fill))


@dataclass
class ObjectVerdict:
    colour: str
    shape: str
    position: str
    pixels: int  # pixels of the object's colour in its named half
    found_shape: str | None  # shape recognised from the largest blob there

    @property
    def colour_ok(self) -> bool:
        return self.pixels >= MIN_PIXELS

    @property
    def ok(self) -> bool:
        return self.colour_ok and self.found_shape == self.shape


@dataclass
class Verdict:
    objects: list[ObjectVerdict]
    extras: list[str]  # colours present in quantity where the scene has none of them

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.objects) and not self.extras


def judge(image: np.ndarray, scene: Scene | list[tuple[str, str, str]]) -> Verdict:
    """Judge ``image`` (H, W, 3 uint8 or float 0..255) against the intended scene (a Scene or
    a list of (colour, shape, position))."""
    kinds = [o.kind for o in scene.objects] if isinstance(scene, Scene) else [tuple(k) for k in scene]
    labels = palette_labels(image)
    size = labels.shape[0]
    verdicts = []
    allowed = {name: np.zeros((size, size), dtype=bool) for name in COLOURS}
    for colour, shape, position in kinds:
        region = half_mask(position, size)
        allowed[colour] |= region
        mask = (labels == PALETTE_NAMES.index(colour)) & region
        found = classify_shape(largest_component(mask)) if mask.sum() >= MIN_PIXELS else None
        verdicts.append(ObjectVerdict(colour, shape, position, int(mask.sum()), found))
    extras = [name for name in COLOURS
              if ((labels == PALETTE_NAMES.index(name)) & ~allowed[name]).sum() >= MIN_PIXELS]
    return Verdict(verdicts, extras)
