"""The synthetic shapes world the embedded model is trained on.

64 x 64 RGB images on a light grey background holding one object, or two objects at
opposite positions (left + right or top + bottom). Objects have one of four flat colours
and one of three shapes, are drawn without anti-aliasing (so every pixel belongs to exactly
one palette colour and segmentation is exact) and are described by captions such as
``a red circle on the left and a blue square on the right``.

A fixed list of two-object scene types (``heldout.json``) is never sampled for training, so
evaluation can ask for compositions the model has not seen.

numpy only: importing this module must stay cheap and torch-free.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BACKGROUND = (240, 240, 240)
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 215, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")
# The two axes a two-object scene can lie on; the first position of each is its canonical
# first object (captions may still name either first).
AXES = (("left", "right"), ("top", "bottom"))
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}

# Geometry, as fractions of the image side.
CENTRE_INSET = 0.25  # centre sits a quarter of the side in from its named edge
JITTER = 0.04  # uniform jitter of the centre on both axes
HALF_MIN, HALF_MAX = 0.12, 0.18  # half-width range

HELDOUT_PATH = Path(__file__).with_name("heldout.json")
HELDOUT_SEED = 20261124
HELDOUT_PER_AXIS = 18  # 36 of 288 two-object scene types (12.5%)


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    position: str
    cx: float  # centre, as a fraction of the side
    cy: float
    half: float  # half-width, as a fraction of the side

    @property
    def kind(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.position)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]

    @property
    def kind(self) -> tuple[tuple[str, str, str], ...]:
        """Order-independent scene type: the objects' (colour, shape, position) sorted
        canonically (left before right, top before bottom)."""
        return tuple(sorted((o.kind for o in self.objects), key=lambda k: POSITIONS.index(k[2])))


def place(colour: str, shape: str, position: str, rng: np.random.Generator | None = None,
          half: float | None = None) -> Obj:
    """An object at its named position; jitter and size drawn from ``rng`` (none: centred,
    mid-size)."""
    cx = {"left": CENTRE_INSET, "right": 1 - CENTRE_INSET}.get(position, 0.5)
    cy = {"top": CENTRE_INSET, "bottom": 1 - CENTRE_INSET}.get(position, 0.5)
    if rng is not None:
        cx += rng.uniform(-JITTER, JITTER)
        cy += rng.uniform(-JITTER, JITTER)
        if half is None:
            half = rng.uniform(HALF_MIN, HALF_MAX)
    if half is None:
        half = (HALF_MIN + HALF_MAX) / 2
    return Obj(colour, shape, position, float(cx), float(cy), float(half))


def object_mask(obj: Obj, size: int = 64) -> np.ndarray:
    """Boolean (H, W) mask of the pixels whose centres fall inside the object."""
    coords = (np.arange(size) + 0.5) / size
    x = coords[None, :]
    y = coords[:, None]
    dx, dy, h = x - obj.cx, y - obj.cy, obj.half
    if obj.shape == "circle":
        return dx * dx + dy * dy <= h * h
    if obj.shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if obj.shape == "triangle":
        # Isosceles, apex up: base 2h at y = cy + h, apex at y = cy - h, so the half-width
        # grows from 0 to h over a height of 2h.
        return (dy >= -h) & (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
    raise ValueError(f"unknown shape {obj.shape!r}")


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """uint8 (H, W, 3) image of the scene."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    taken = np.zeros((size, size), dtype=bool)
    for obj in scene.objects:
        mask = object_mask(obj, size)
        assert not (mask & taken).any(), "objects overlap"
        img[mask] = COLOURS[obj.colour]
        taken |= mask
    return img


def describe(obj: Obj | tuple[str, str, str]) -> str:
    colour, shape, position = obj.kind if isinstance(obj, Obj) else obj
    return f"a {colour} {shape} on the {position}"


def caption(scene: Scene, order: tuple[int, ...] | None = None) -> str:
    """Caption naming the objects in ``order`` (indices into ``scene.objects``)."""
    order = tuple(range(len(scene.objects))) if order is None else order
    return " and ".join(describe(scene.objects[i]) for i in order)


def parse_caption(text: str) -> list[tuple[str, str, str]] | None:
    """The objects (colour, shape, position) a caption of this world names, in order (the inverse of `caption`), or
    None when `text` is not one ("a {colour} {shape} on the {position}", joined by " and ", one or two objects)."""
    parts = " ".join(text.lower().split()).split(" and ")
    kinds = []
    for part in parts:
        words = part.split()
        if (len(words) != 6 or words[0] != "a" or words[3:5] != ["on", "the"] or words[1] not in COLOURS
                or words[2] not in SHAPES or words[5] not in POSITIONS):
            return None
        kinds.append((words[1], words[2], words[5]))
    return kinds if 1 <= len(kinds) <= 2 else None


def all_two_object_kinds() -> list[tuple[tuple[str, str, str], tuple[str, str, str]]]:
    """The 288 two-object scene types: 2 axes x 12 (colour, shape) x 12 (colour, shape)."""
    items = [(c, s) for c in COLOURS for s in SHAPES]
    return [((c1, s1, p1), (c2, s2, p2)) for p1, p2 in AXES for c1, s1 in items for c2, s2 in items]


def make_heldout(seed: int = HELDOUT_SEED, per_axis: int = HELDOUT_PER_AXIS) -> list:
    """Deterministically choose ``per_axis`` scene types from each axis."""
    rng = np.random.default_rng(seed)
    kinds = all_two_object_kinds()
    chosen = []
    for p1, _ in AXES:
        axis = [k for k in kinds if k[0][2] == p1]
        idx = sorted(rng.choice(len(axis), size=per_axis, replace=False))
        chosen += [axis[i] for i in idx]
    return chosen


def load_heldout(path: Path = HELDOUT_PATH) -> frozenset:
    """The shipped held-out scene types, as a set of canonical ``Scene.kind`` tuples."""
    data = json.loads(Path(path).read_text())
    return frozenset(tuple(tuple(o) for o in pair) for pair in data["scenes"])


HELDOUT = load_heldout() if HELDOUT_PATH.exists() else frozenset()


def heldout_scenes(rng: np.random.Generator | None = None) -> list[Scene]:
    """One scene per held-out type (centred and mid-size unless ``rng`` jitters them)."""
    return [Scene(tuple(place(*o, rng=rng) for o in pair)) for pair in sorted(HELDOUT)]


def sample_scene(rng: np.random.Generator, p_two: float = 0.7, exclude=HELDOUT) -> Scene:
    """A random scene; two-object scene types in ``exclude`` are never returned."""
    while True:
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        if rng.random() >= p_two:
            position = POSITIONS[rng.integers(len(POSITIONS))]
            return Scene((place(colour, shape, position, rng),))
        first, second = AXES[rng.integers(len(AXES))]
        colour2 = list(COLOURS)[rng.integers(len(COLOURS))]
        shape2 = SHAPES[rng.integers(len(SHAPES))]
        scene = Scene((place(colour, shape, first, rng), place(colour2, shape2, second, rng)))
        if scene.kind not in exclude:
            return scene


if __name__ == "__main__":  # regenerate heldout.json (deterministic)
    pairs = make_heldout()
    HELDOUT_PATH.write_text(json.dumps(
        {"seed": HELDOUT_SEED, "per_axis": HELDOUT_PER_AXIS, "total_types": 288,
         "scenes": [[list(o) for o in pair] for pair in pairs]}, indent=1) + "\n")
    print(f"wrote {len(pairs)} held-out scene types to {HELDOUT_PATH}")
