"""Conditioning mechanisms side by side: the same prompt and seed on the four embedded shapes-world models.

- `tiny`: cross-attention (queries from the image, keys and values from the text), taught where to look by a
  token-grounding loss;
- `tiny-untaught`: the same UNet before that fine-tune: cross-attention maps learned from images alone;
- `tiny-mmdit`: joint attention (an MMDiT: image and text tokens in one attention sequence), images alone;
- `tiny-film`: FiLM, no attention at all: one pooled vector of the prompt scales and shifts every ResNet block's
  channels, so no pixel attends to a word and there is no map to show.

Each image gets the pixel judge's verdict per object (`tiny.judge`) when the prompt is a caption of the world, and
each attention model the chosen word's map (the model's default view). Models load lazily, once each, and one run
goes at a time (the pipelines are shared). No Gradio here: `ui_mechanisms.py` lays out the tab, `crossattn-sd
mechanisms` writes the same panels to a folder.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .overlay import DEFAULT_CMAP, blend, captioned
from .tiny.judge import Verdict, judge
from .tiny.world import parse_caption

MODELS = ("tiny", "tiny-untaught", "tiny-mmdit", "tiny-film")
MECHANISMS = {
    "tiny": "cross-attention, grounded (taught where to look)",
    "tiny-untaught": "cross-attention, learned from images alone",
    "tiny-mmdit": "joint attention (MMDiT), images alone",
    "tiny-film": "FiLM: the pooled prompt scales and shifts the features; no attention",
}
NO_MAPS = ("{model} has no attention maps: FiLM conditions every pixel on one pooled vector of the prompt (a "
           "per-channel scale and shift of each ResNet block's features), so no pixel attends to {word} or any other "
           "word; the other models show where it went")


@dataclass
class Panel:
    """One model's answer to the prompt."""

    model: str
    mechanism: str
    image: Image.Image
    seconds: float  # the generation's wall clock (maps included)
    verdict: Verdict | None  # None: the prompt is not a caption of the shapes world
    word: str | None  # the word whose map is shown
    heatmap: np.ndarray | None  # (H, W) in [0, 1]; None for a model without attention maps
    note: str = ""  # why there is no map

    def overlay(self, alpha: float = 0.5, cmap: str = DEFAULT_CMAP) -> Image.Image:
        """The image with the word's map over it, or the image alone where there is no map."""
        return self.image if self.heatmap is None else blend(self.image, self.heatmap, alpha, cmap)

    def verdict_text(self) -> str:
        """The judge's verdict, one line per object ("red circle on the left: right"), or why there is none."""
        if self.verdict is None:
            return "not judged: the judge reads captions of the shapes world ('a red circle on the left', two joined by 'and')"
        lines = []
        for o in self.verdict.objects:
            found = f"{o.pixels} px of {o.colour} there, shape {o.found_shape or 'not recognised'}"
            lines.append(f"{o.colour} {o.shape} on the {o.position}: {'right' if o.ok else 'wrong'} ({found})")
        if self.verdict.extras:
            lines.append("stray colours: " + ", ".join(self.verdict.extras))
        return "\n".join(lines)

    def summary(self) -> dict:
        return dict(model=self.model, mechanism=self.mechanism, seconds=round(self.seconds, 3),
                    judged=self.verdict is not None, right=None if self.verdict is None else self.verdict.ok,
                    objects=None if self.verdict is None else [
                        dict(colour=o.colour, shape=o.shape, position=o.position, right=o.ok, pixels=o.pixels,
                             found_shape=o.found_shape) for o in self.verdict.objects],
                    word=self.word, has_map=self.heatmap is not None, note=self.note)


class Mechanisms:
    """The four models behind one prompt; each loads on first use.

    Args:
        models: the presets to run, in order.
        loader: `name -> pipeline` (default `pipeline.load_pipeline` on the CPU).
    """

    def __init__(self, models: Sequence[str] = MODELS, loader: Callable[[str], object] | None = None):
        self.models = tuple(models)
        self._loader = loader
        self._pipes: dict[str, object] = {}
        self._lock = threading.Lock()  # one run at a time: the pipelines and their schedulers are shared

    def pipe(self, model: str):
        """The model's pipeline, loaded once (callers hold the lock)."""
        if model not in self._pipes:
            if self._loader is None:
                from .pipeline import load_pipeline

                self._pipes[model] = load_pipeline(model, device="cpu")
            else:
                self._pipes[model] = self._loader(model)
        return self._pipes[model]

    def run(self, prompt: str, seed: int = 0, word: str | None = None) -> list[Panel]:
        """Generate `prompt` with `seed` on every model (each with its preset's settings, capture on).

        `word` picks the map shown (default: the first object's shape word, or the first content word); a word
        that is not in the prompt is a ValueError listing the prompt's words."""
        from .pipeline import generate

        prompt = (prompt or "").strip()
        if not prompt:
            raise ValueError("the prompt is empty; type a caption such as 'a red circle on the left and a blue square "
                             "on the right'")
        kinds = parse_caption(prompt)
        word = (word or "").strip() or None
        panels = []
        with self._lock:
            for model in self.models:
                pipe = self.pipe(model)
                start = time.perf_counter()
                result = generate(pipe, prompt, seed=int(seed))
                seconds = time.perf_counter() - start
                chosen = word or default_word(result.words, kinds)
                if word is not None and word.lower() not in (w.lower() for w in result.words):
                    raise ValueError(f"{word!r} is not a word of the prompt; its words are {', '.join(result.words)}")
                image = result.images[0]
                verdict = judge(np.asarray(image), kinds) if kinds else None
                if result.store.layers:
                    heat, note = result.heatmap(chosen), ""
                else:
                    heat, note = None, NO_MAPS.format(model=model, word=repr(chosen))
                panels.append(Panel(model, MECHANISMS.get(model, ""), image, seconds, verdict, chosen, heat, note))
        return panels


def default_word(words: Sequence[str], kinds) -> str:
    """The map shown when none is asked for: the first object's shape word, else the first content word."""
    if kinds:
        return kinds[0][1]
    content = [w for w in words if w.lower() not in {"a", "an", "the", "on", "in", "and", "of", "with"}]
    return (content or list(words) or [""])[0]


def figure(panels: Sequence[Panel], scale: int = 3, alpha: float = 0.5) -> Image.Image:
    """The images in a row over their word maps (or the image alone, marked "no map"), each captioned with its
    model and the judge's verdict."""
    tiles = []
    for p in panels:
        right = "" if p.verdict is None else (" right" if p.verdict.ok else " wrong")
        top = captioned(p.image, f"{p.model}{right}", scale)
        bottom = captioned(p.overlay(alpha), f"'{p.word}'" if p.heatmap is not None else "no map (FiLM)", scale)
        tile = Image.new("RGB", (top.width, top.height + bottom.height), "white")
        tile.paste(top, (0, 0))
        tile.paste(bottom, (0, top.height))
        tiles.append(tile)
    gap = 4
    out = Image.new("RGB", (sum(t.width for t in tiles) + gap * (len(tiles) - 1), max(t.height for t in tiles)),
                    "white")
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width + gap
    return out


def save(panels: Sequence[Panel], out: str | Path, prompt: str, seed: int) -> Path:
    """Write each model's image and overlay, the side-by-side figure and mechanisms.json into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for p in panels:
        p.image.save(out / f"{p.model}.png")
        if p.heatmap is not None:
            p.overlay().save(out / f"{p.model}-{p.word}.png")
    figure(panels).save(out / "mechanisms.png")
    data = dict(prompt=prompt, seed=seed, panels=[p.summary() for p in panels])
    (out / "mechanisms.json").write_text(json.dumps(data, indent=1) + "\n")
    return out
