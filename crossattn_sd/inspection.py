"""Inspecting stored maps, as plain typed methods: a session's entries, the filters a view takes, the drawn
views and the text about them.

`MapInspector` is the inspection half of `service.AttentionService` (which extends it): it only reads a
generation's stored maps, never re-runs diffusion, so it may run concurrently with a generation; what it draws
goes to the server's work folder (`self.work`, a `workdir.WorkFolder`, set by the subclass). No Gradio here:
errors are `ValueError`s with a message for the user.
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .names import image_name
from .overlay import CMAPS, DEFAULT_CMAP, animation, blend, captioned, colorize
from .overlay import grid as word_grid

if TYPE_CHECKING:
    from .result import GenerationResult
    from .workdir import WorkFolder


# Words that rarely carry a region of their own: the word chips start on the first word that is not one.
FUNCTION_WORDS = {"a", "an", "the", "on", "in", "at", "of", "and", "with", "to", "is", "by"}
NO_MAPS = ("this result has no attention maps: the default processor records none, and a model without attention "
           "(tiny-film: FiLM) has none to record; generate with the capture, reweight or edit processor on an attention "
           "model to see where each word went")


@dataclass(frozen=True)
class MapFilters:
    """Which recorded maps a view averages, and how it is drawn."""

    # layers and resolutions both None: the model's default view (`GenerationResult.default_layers`)
    layers: tuple[str, ...] | None = None  # layer names or glob patterns ("*": every layer)
    resolutions: tuple[str, ...] | None = None  # "16x16" (exact) or "16" (longer side); None: no filter
    step_from: int = 0  # first denoising step (0-based) ...
    step_to: int | None = None  # ... and last, inclusive; None: the last step
    head: int | None = None  # one attention head; None: mean of the heads
    alpha: float = 0.5
    cmap: str = DEFAULT_CMAP


@dataclass
class Entry:
    """One generation (or opened bundle) of a session: the result, where it is saved, a caption."""

    result: GenerationResult
    folder: Path  # the result.save() folder in the outputs folder; else the entry's work folder
    bundle: Path  # the result as a zip, in the entry's work folder (with the images the browser is sent)
    caption: str
    seconds: float | None = None
    shown: int | None = None  # the image on show (an edit returns [source, edit]); None: the last

    @property
    def index(self) -> int:
        """The image on show: `shown`, else the last (an edit shows the edit; others return one image)."""
        return len(self.result.images) - 1 if self.shown is None else self.shown

    def showing(self, index: int) -> "Entry":
        """The same entry with image `index` on show: its words, maps and overlays (an edit's source: 0)."""
        if not 0 <= index < len(self.result.images):
            raise ValueError(f"image {index} is out of range; this result has {len(self.result.images)} image(s)")
        return dataclasses.replace(self, shown=index)

    @property
    def prompt(self) -> str:
        """The shown image's prompt."""
        return self.result.alignments[self.index].prompt

    @property
    def image(self) -> Image.Image:
        return self.result.images[self.index]

    @property
    def image_path(self) -> Path:
        """The shown image's file in the work folder (a file Gradio may serve, wherever the outputs are)."""
        return self.bundle.parent / image_name(self.index)

    @property
    def dropped_words(self) -> list[str]:
        return list(self.result.alignments[self.index].dropped_words)

    @property
    def has_maps(self) -> bool:
        return bool(self.result.store.sums)

    @property
    def prompt_words(self) -> list[str]:
        """The shown image's prompt's words, in order, as written."""
        return self.result.alignments[self.index].word_texts

    @property
    def words(self) -> list[str]:
        """The distinct words (lower case), in order, then the concepts that are not prompt words: the word chips."""
        return list(dict.fromkeys([w.lower() for w in self.prompt_words] + [c.lower() for c in self.result.concepts]))


@dataclass(frozen=True)
class MapChoices:
    """The filter choices one entry offers."""

    words: list[str]
    default_word: str | None
    layers: list[tuple[str, str]]  # (label, layer name)
    resolutions: list[str]  # "16x16", largest first
    default_resolutions: list[str]  # the ones the model's default view uses (`GenerationResult.default_resolutions`)
    num_steps: int
    has_steps: bool
    heads: int  # heads every layer has (0: per-head maps not kept)
    layer_resolutions: dict[str, str] = dataclasses.field(default_factory=dict)  # layer name -> "16x16"
    view_layers: list[str] | None = None  # the default view's layers when they are not whole resolutions ("last")
    default_head: int | None = None  # the head the default view shows (`GenerationResult.default_head`)

    def layers_at(self, resolutions: Sequence[str]) -> list[str]:
        """The layers whose maps have one of these sizes ("16x16"), in the store's order: what ticking
        resolutions ticks."""
        return [name for _, name in self.layers if self.layer_resolutions[name] in resolutions]

    def resolutions_of(self, layers: Sequence[str]) -> list[str]:
        """The resolutions all of whose layers are among `layers`: the resolution ticks that show them."""
        return [r for r in self.resolutions if set(self.layers_at([r])) <= set(layers)]

    @property
    def default_layers(self) -> list[str]:
        """The layers of the model's default view."""
        return list(self.view_layers) if self.view_layers is not None else self.layers_at(self.default_resolutions)


@dataclass
class MapView:
    """Everything the Inspect panel shows for one word and one set of filters."""

    overlay: Image.Image | None = None
    heatmap: Image.Image | None = None  # the colourised map alone
    summary: str = ""
    colorbar: list[str] = dataclasses.field(default_factory=list)  # hex colours, low to high
    grid: Image.Image | None = None  # None: not asked for
    frames: list[tuple[Image.Image, str]] | None = None  # None: not asked for; []: no per-step maps
    animation: Path | None = None  # GIF of the frames


@dataclass
class Comparison:
    """The same prompt and seed under two processors."""

    a: Entry
    b: Entry
    difference: Image.Image
    summary: str


def _parse_resolution(text: str) -> int | tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x×]\s*(\d+))?\s*", text)
    if not m:
        raise ValueError(f"bad resolution {text!r}; write it as 16x16 (height x width) or 16 (longer side)")
    return (int(m[1]), int(m[2])) if m[2] else int(m[1])


def layer_label(name: str, hw: tuple[int, int]) -> str:
    """"up_blocks.1.attentions.0.transformer_blocks.0.attn2" -> "up 1.0 · 8x8"; a transformer's joint block
    "transformer_blocks.3.attn" -> "joint 3 · 64x64", a single-stream one "single_transformer_blocks.12.attn" ->
    "single 12 · 64x64", a cross-attention one "transformer_blocks.3.attn2" (Sana's; SD3.5's image-only attn2 sees
    no text, so it has no maps to label) -> "cross 3 · 32x32", a unified-sequence one "layers.3.attention"
    (Z-Image's) -> "layer 3 · 64x64"."""
    block = re.fullmatch(r"(single_)?transformer_blocks\.(\d+)\.attn(2?)|layers\.(\d+)\.attention", name)
    if block:
        single, index, cross, unified = block.groups()
        kind = "layer" if unified else "single" if single else "cross" if cross else "joint"
        return f"{kind} {unified or index} · {hw[0]}x{hw[1]}"
    m = re.fullmatch(r"(down|mid|up)_blocks?(?:\.(\d+))?\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2", name)
    if not m:
        return f"{name} · {hw[0]}x{hw[1]}"
    kind, block, attn, tb = m.groups()
    where = ".".join(p for p in (block, attn) if p is not None) if kind != "mid" else attn
    where += f".{tb}" if tb != "0" else ""
    return f"{kind} {where} · {hw[0]}x{hw[1]}" if kind != "mid" else f"mid · {hw[0]}x{hw[1]}"


class MapInspector:
    """Inspection of entries' stored maps (choices, filters, views, comparisons of maps, text); drawn files go to
    `self.work`, which the subclass sets."""

    work: WorkFolder

    def png_file(self, image: Image.Image) -> Path:
        """`image` as a PNG file in the work folder, compressed fast (zlib level 1: a quarter of the default's
        time at about the same size for these blocky images; it goes to the browser at once)."""
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        return self._view_file(buf.getvalue(), ".png")

    def _view_file(self, data: bytes, suffix: str) -> Path:
        """Write a drawn view to the work folder (pruned: a server runs for weeks, and every word and filter
        change draws new ones)."""
        return self.work.view(data, suffix)
    # -- inspection (stored maps only) -----------------------------------------------------------------------

    @staticmethod
    def choices(entry: Entry) -> MapChoices:
        store = entry.result.store
        words = entry.words
        default = next((w for w in words if w not in FUNCTION_WORDS), words[0] if words else None)
        layers = [(layer_label(l, store.layer_shape(l)), l) for l in store.layers]
        heads = [store.num_heads(l) for l in store.layers]
        labels = lambda sizes: [f"{h}x{w}" for h, w in sizes]  # noqa: E731
        resolutions = labels(store.resolutions())
        layer_resolutions = {l: labels([store.layer_shape(l)])[0] for l in store.layers}
        view_layers, default_resolutions = None, labels(entry.result.default_resolutions() or store.resolutions())
        if entry.result.settings.get("map_layers") == "last":  # a layer, not a whole resolution: tick it alone
            view_layers = entry.result.default_layers() or []
            default_resolutions = [r for r in resolutions if all(l in view_layers for l, lr in
                                                                 layer_resolutions.items() if lr == r)]
        heads_kept = min(heads) if heads and None not in heads else 0
        head = entry.result.default_head()
        return MapChoices(
            words=words, default_word=default, layers=layers, resolutions=resolutions,
            default_resolutions=default_resolutions, num_steps=store.num_steps,
            has_steps=store.has_steps, heads=heads_kept, layer_resolutions=layer_resolutions,
            view_layers=view_layers, default_head=head if head is not None and head < heads_kept else None)

    @staticmethod
    def filters(layers: Sequence[str] | str | None = None, resolutions: Sequence[str] | str | None = None,
                step_from: int = 0, step_to: int | None = None, head: int | str | None = None,
                alpha: float = 0.5, cmap: str = DEFAULT_CMAP) -> MapFilters:
        """Build `MapFilters` from UI or API values: lists or comma-separated text. Layers "*" or "all" means
        every layer; with layers and resolutions both None or "", the map is the model's default view
        (`GenerationResult.default_layers`). Head "mean" or -1 means the mean of the heads; step_to -1 means
        the last step."""
        def as_tuple(v, every=None):
            if v is None or (isinstance(v, str) and v.strip() == ""):
                return None
            if isinstance(v, str) and v.strip() in ("*", "all"):
                return every
            items = [p.strip() for p in v.split(",")] if isinstance(v, str) else [str(p).strip() for p in v]
            if not any(items):
                raise ValueError("no layer or resolution is selected; tick at least one")
            return tuple(p for p in items if p)

        if isinstance(head, str):
            head = None if head.strip().lower() in ("", "mean") else int(head)
        if head is not None and head < 0:
            head = None
        if step_to is not None and step_to < 0:
            step_to = None
        if cmap not in CMAPS:
            raise ValueError(f"unknown colour map {cmap!r}; use one of {', '.join(CMAPS)}")
        if not 0 <= float(alpha) <= 1:
            raise ValueError(f"alpha={alpha} is out of range; use 0..1")
        return MapFilters(layers=as_tuple(layers, every=("*",)), resolutions=as_tuple(resolutions), step_from=int(step_from or 0),
                          step_to=None if step_to is None else int(step_to), head=head, alpha=float(alpha), cmap=cmap)

    @staticmethod
    def _heatmap_kwargs(entry: Entry, f: MapFilters, *, steps: bool = True) -> dict:
        """`result.heatmap` keyword arguments for the filters (a step range only if it is not every step)."""
        store = entry.result.store
        kw = dict(image_index=entry.index, layers=list(f.layers) if f.layers else None, head=f.head,
                  resolutions=[_parse_resolution(r) for r in f.resolutions] if f.resolutions else None)
        n = store.num_steps
        last = n - 1 if f.step_to is None else f.step_to
        if steps and (f.step_from > 0 or last < n - 1):
            if not 0 <= f.step_from <= last < n:
                raise ValueError(f"step range {f.step_from}..{last} is out of range; this run has steps 0..{n - 1}")
            if f.head is not None:
                raise ValueError("a step range and one head cannot be combined (per-step maps are head-averaged); "
                                 "choose 'mean' heads or every step")
            kw["steps"] = range(f.step_from, last + 1)
        return kw

    @classmethod
    def drawn_from(cls, entry: Entry, filters: MapFilters) -> str:
        """What a view averages, in the UI's terms (steps counted from 1, as its sliders do): "3 of 7 layers
        (16x16) · steps 1–4 of 4 · mean of 2 heads"."""
        store = entry.result.store
        kw = cls._heatmap_kwargs(entry, filters)
        resolutions = kw["resolutions"]
        layers, head = kw["layers"], filters.head
        if layers is None and resolutions is None:  # the model's default view (`GenerationResult._heatmaps`)
            layers = entry.result.default_layers()
            head = entry.result.default_head() if head is None and "steps" not in kw else head
        names = store.select_layers(layers, resolutions)
        sizes = ", ".join(f"{h}x{w}" for h, w in store.resolutions() if any(store.layer_shape(n) == (h, w)
                                                                           for n in names))
        n = store.num_steps
        picked = kw.get("steps", range(n))
        steps = (f"step {picked[0] + 1} of {n}" if len(picked) == 1 else
                 f"steps {picked[0] + 1}–{picked[-1] + 1} of {n}")
        heads = [store.num_heads(l) for l in names]
        if head is not None:
            head = f"head {head}"
        elif heads and None not in heads and len(set(heads)) == 1:
            head = f"mean of {heads[0]} heads"
        else:
            head = "mean of the heads"
        return f"{len(names)} of {len(store.layers)} layers ({sizes}) · {steps} · {head}"

    def _check_word(self, entry: Entry, word: str | None) -> str:
        if not entry.has_maps:
            raise ValueError(NO_MAPS)
        if not word:
            raise ValueError(f"pick a word of the prompt: {', '.join(entry.words) or '(the prompt has no words)'}")
        return word

    def overlay(self, entry: Entry, word: str, filters: MapFilters = MapFilters()) -> Image.Image:
        """`word`'s heat map laid over the image."""
        m = entry.result.heatmap(self._check_word(entry, word), **self._heatmap_kwargs(entry, filters))
        return blend(entry.image, m, filters.alpha, filters.cmap)

    def inspect(self, entry: Entry, word: str | None, filters: MapFilters = MapFilters(), *, grid: bool = True,
                timeline: bool = True) -> MapView:
        """The Inspect panel for one word: overlay, map, numeric summary, and (if asked: they take longer, and
        the UI draws only what is on show) the all-words grid and the timeline."""
        if not entry.has_maps:
            return MapView(summary=NO_MAPS[0].upper() + NO_MAPS[1:] + ".")
        result = entry.result
        word = self._check_word(entry, word)
        kw = self._heatmap_kwargs(entry, filters)
        raw = result.heatmap(word, normalize_by="none", **kw)
        lo, hi = float(raw.min()), float(raw.max())
        m = (raw - lo) / (hi - lo) if hi > lo else np.zeros_like(raw)
        y, x = np.unravel_index(int(raw.argmax()), raw.shape)
        summary = (f"**{word}** gets {100 * float(raw.mean()):.1f}% of the attention on average, peaking at "
                   f"{100 * hi:.1f}% at (x={x}, y={y}). Colours run from {100 * lo:.1f}% (low) to {100 * hi:.1f}% "
                   f"(high). Click the map to read a value.  \nDrawn from {self.drawn_from(entry, filters)}.")
        colours = colorize(np.linspace(0, 1, 11)[None], filters.cmap)[0]
        view = MapView(overlay=blend(entry.image, m, filters.alpha, filters.cmap),
                       heatmap=Image.fromarray(colorize(m, filters.cmap)), summary=summary,
                       colorbar=[f"#{r:02x}{g:02x}{b:02x}" for r, g, b in colours])
        if grid:
            # 128-pixel tiles: the UI shows the grid about 420 pixels high, and larger images only cost PNG time.
            maps = {**{c.lower(): m for c, m in result.concept_maps(**kw).items()},
                    **result.word_maps(**kw)}  # a prompt word before a concept
            view.grid = word_grid(entry.image, {w: maps[w] for w in entry.words}, alpha=filters.alpha,
                                  cmap=filters.cmap, min_tile=128)
        if timeline:
            view.frames, view.animation = self._timeline(entry, word, filters)
        return view

    def _timeline(self, entry: Entry, word: str, f: MapFilters) -> tuple[list[tuple[Image.Image, str]], Path | None]:
        """One frame per step in the range, all on one scale (the range's peak), so growth is visible."""
        store = entry.result.store
        if not store.has_steps:
            return [], None
        kw = self._heatmap_kwargs(entry, dataclasses.replace(f, head=None), steps=False)
        last = store.num_steps - 1 if f.step_to is None else min(f.step_to, store.num_steps - 1)
        steps = list(range(max(0, f.step_from), last + 1))
        raw = [entry.result.heatmap(word, steps=[s], normalize_by="none", **kw) for s in steps]
        peak = max((float(r.max()) for r in raw), default=0.0) or 1.0
        overlays = [blend(entry.image, r / peak, f.alpha, f.cmap) for r in raw]
        frames = [(im, f"step {s + 1} · t={store.timesteps[s]:.0f}") for s, im in zip(steps, overlays)]
        if not frames:
            return [], None
        scale = max(1, -(-128 // max(entry.image.size)))  # the GIF carries its captions: enlarge small images
        gif = animation([captioned(im, f"step {s + 1}", scale) for s, im in zip(steps, overlays)])
        return frames, self._view_file(gif, ".gif")

    def value_at(self, entry: Entry, word: str, filters: MapFilters, x: int, y: int) -> str:
        """The map's value at pixel (x, y), for a click on the map."""
        raw = entry.result.heatmap(self._check_word(entry, word), normalize_by="none",
                                   **self._heatmap_kwargs(entry, filters))
        h, w = raw.shape
        if not (0 <= x < w and 0 <= y < h):
            raise ValueError(f"({x}, {y}) is outside the {w}x{h} map")
        lo, hi = float(raw.min()), float(raw.max())
        rel = (float(raw[y, x]) - lo) / (hi - lo) if hi > lo else 0.0
        return f"At (x={x}, y={y}): **{100 * float(raw[y, x]):.1f}%** of the attention went to **{word}** " \
               f"({rel:.2f} on the colour scale)."

    def compare_maps(self, cmp: Comparison, word: str | None, filters: MapFilters = MapFilters(),
                     ) -> tuple[Image.Image, Image.Image, Image.Image | None, str]:
        """For one word: A's and B's overlays (or plain images where there are no maps) and B - A."""
        raws = []
        for e in (cmp.a, cmp.b):
            try:
                raws.append(e.result.heatmap(word, normalize_by="none", **self._heatmap_kwargs(e, filters))
                            if e.has_maps and word else None)
            except ValueError:  # e.g. an edit's new word is not in the source prompt
                raws.append(None)
        shown = []
        for e, raw in zip((cmp.a, cmp.b), raws):
            img = e.image
            if raw is None:
                shown.append(img)
            else:
                lo, hi = float(raw.min()), float(raw.max())
                shown.append(blend(img, (raw - lo) / (hi - lo) if hi > lo else np.zeros_like(raw),
                                   filters.alpha, filters.cmap))
        if raws[0] is None or raws[1] is None:
            why = "A (default processor) records no maps" if not cmp.a.has_maps else f"'{word}' has no map in A or B"
            return shown[0], shown[1], None, f"No map difference: {why}."
        diff = raws[1] - raws[0]
        span = float(np.abs(diff).max())
        diff_img = Image.fromarray(colorize(0.5 + 0.5 * diff / (span or 1.0), "coolwarm"))
        note = (f"B − A for **{word}**: red where B gives it more attention, blue where less "
                f"(±{100 * span:.1f}% at full colour)." if span else f"B − A for **{word}**: no difference.")
        return shown[0], shown[1], diff_img, note

    # -- text for the UI -------------------------------------------------------------------------------------

    @staticmethod
    def describe(entry: Entry) -> str:
        """One Markdown line about an entry's settings (and words the tokenizer dropped)."""
        s = entry.result.settings
        proc = s.get("processor") or {}
        name = proc.get("name", "capture")
        detail = f"{name} ({s.get('mode')})" if name == "capture" else name
        took = f" · {entry.seconds:.1f} s" if entry.seconds is not None else ""
        inspected = s.get("inspect")
        if isinstance(inspected, dict):  # an uploaded image: no generation settings to speak of
            h, w = (inspected.get("image_size") or [0, 0])[:2]
            passes = inspected.get("passes")
            line = (f"inspected an uploaded {w}×{h} image · t {inspected.get('t')} (timestep "
                    f"{inspected.get('timestep')}) · {passes} pass{'es' if passes != 1 else ''} · the model saw "
                    f"{s.get('width')}×{s.get('height')} ({inspected.get('fit')}) · seed {s.get('seed')}{took}")
            if entry.dropped_words:
                line += f"  \n⚠️ The tokenizer's length limit dropped: {' '.join(entry.dropped_words)}"
            return line
        line = (f"seed {s.get('seed')} · {s.get('steps')} steps · guidance {s.get('guidance_scale')} · "
                f"{s.get('width')}×{s.get('height')} · {s.get('scheduler')} · {detail}{took}")
        if entry.dropped_words:
            line += f"  \n⚠️ The tokenizer's length limit dropped: {' '.join(entry.dropped_words)}"
        return line
