"""What the web UI does, as plain typed methods: generate, inspect stored maps, compare, export and import.

One `AttentionService` serves every user of a server. It owns the pipeline (loaded on first use) and no
per-user data: a user's generations are `Entry` objects that the UI keeps in that user's session state, and
each generation records into its own map store (`generate` makes one per call). The pipeline and its scheduler
are shared, so the service runs one generation at a time (a lock held for the whole pipeline call, whoever
calls: the UI's queue, the API, Python), and a stopped run holds it until its current step is done and its
processors are restored; inspection only reads stored maps, never re-runs diffusion, and may run concurrently.
Files for the browser go to a bounded work folder (`workdir.WorkFolder`). No Gradio here: errors are
`ValueError`s with a message for the user.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import random
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .bundles import BUNDLE_MEMBERS, MAX_BUNDLE_BYTES, read_bundle, zip_folder  # noqa: F401 (public here too)
from .config import EMBEDDED, ModelPreset, load_presets
from .names import image_name, safe_name
from .overlay import CMAPS, DEFAULT_CMAP, animation, blend, captioned, colorize
from .overlay import grid as word_grid
from .workdir import VIEW_MAX_AGE_S, WorkFolder  # noqa: F401

if TYPE_CHECKING:
    from .result import GenerationResult

MAX_PROMPT_CHARS = 1000
MAX_STEPS = 100
MAX_GUIDANCE = 20.0
MAX_SEED = 2**32 - 1
MAX_HISTORY = 12  # generations kept per session; older ones drop out of the gallery
MAX_OPEN_BUNDLES = 8  # bundles kept loaded for /heatmap calls
# Words that rarely carry a region of their own: the word chips start on the first word that is not one.
FUNCTION_WORDS = {"a", "an", "the", "on", "in", "at", "of", "and", "with", "to", "is", "by"}
NO_MAPS = ("this result has no attention maps: the default processor records none; generate with the capture, "
           "reweight or edit processor to see where each word went")


@dataclass(frozen=True)
class Defaults:
    """What the UI offers: the model preset's defaults and the bounds of every control."""

    model: str
    description: str
    steps: int
    guidance: float
    height: int
    width: int
    max_side: int
    size_step: int  # heights and widths are multiples of this (`pipeline.size_multiple`)
    scheduler: str
    per_step: bool  # on for the embedded model: its per-step maps are small and make timelines work
    examples: tuple[str, ...]
    schedulers: tuple[str, ...]
    processors: tuple[str, ...]
    modes: tuple[str, ...]
    cmaps: tuple[str, ...] = CMAPS
    max_steps: int = MAX_STEPS
    max_guidance: float = MAX_GUIDANCE
    max_prompt_chars: int = MAX_PROMPT_CHARS


@dataclass(frozen=True)
class GenerateRequest:
    """One generation's settings, as the UI's controls give them (None: the preset's default)."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str = "default"
    mode: str = "exact"
    processor: str = "capture"
    weights: str = ""  # reweight: "word:weight, ..."
    edit_prompt: str = ""  # edit: the edited prompt
    inject: float = 0.8  # edit: fraction of steps that use the source's maps
    per_step: bool | None = None
    processor_layers: str = "*"  # layers the processor goes on: glob patterns or resolutions ("16"), comma-separated


@dataclass(frozen=True)
class MapFilters:
    """Which recorded maps a view averages, and how it is drawn."""

    # layers and resolutions both None: the model's default view (`GenerationResult.default_resolutions`)
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
        """The distinct words (lower case), in order: the word chips."""
        return list(dict.fromkeys(w.lower() for w in self.prompt_words))


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
        return self.layers_at(self.default_resolutions)


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
    "single 12 · 64x64"."""
    joint = re.fullmatch(r"(single_)?transformer_blocks\.(\d+)\.attn", name)
    if joint:
        return f"{'single' if joint.group(1) else 'joint'} {joint.group(2)} · {hw[0]}x{hw[1]}"
    m = re.fullmatch(r"(down|mid|up)_blocks?(?:\.(\d+))?\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2", name)
    if not m:
        return f"{name} · {hw[0]}x{hw[1]}"
    kind, block, attn, tb = m.groups()
    where = ".".join(p for p in (block, attn) if p is not None) if kind != "mid" else attn
    where += f".{tb}" if tb != "0" else ""
    return f"{kind} {where} · {hw[0]}x{hw[1]}" if kind != "mid" else f"mid · {hw[0]}x{hw[1]}"


def pixel_difference(a: Image.Image, b: Image.Image) -> tuple[Image.Image, int]:
    """|A - B| (max over RGB) as a grey image scaled to its maximum, and that maximum (0..255)."""
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max(axis=-1)
    peak = int(diff.max())
    return Image.fromarray((diff * (255.0 / max(1, peak))).astype(np.uint8)).convert("RGB"), peak


class AttentionService:
    """Generation and inspection for the web UI; one instance per server, shared by all sessions.

    Args:
        preset (`ModelPreset`): the model and its defaults (`from_model` resolves a name to one).
        pipe (*optional*): an already loaded pipeline for this preset (tests pass one); default: load on first use.
        outputs (`str` or `Path`, *optional*): also save every generation in a subfolder of this folder.
        device (`str`, *optional*): where to load the pipeline; default: the best available.
    """

    def __init__(self, preset: ModelPreset, *, pipe=None, outputs: str | Path | None = None,
                 device: str | None = None, dtype: str | None = None, offload: bool = False):
        self.preset = preset
        self.outputs = Path(outputs) if outputs else None
        self.device, self.dtype, self.offload = device, dtype, offload
        self._pipe = pipe
        self._defaults: Defaults | None = None
        self._stops: dict[str, threading.Event] = {}  # session -> stop flag of its pending or running generation
        self._generating = threading.Lock()  # held for a whole pipeline call: the pipeline is shared
        self._loading = threading.Lock()
        self._open: OrderedDict[tuple, Entry] = OrderedDict()  # bundles opened by /heatmap, least recent first
        self._open_lock = threading.Lock()  # inspection runs concurrently; the cache is shared
        self.work = WorkFolder()

    @property
    def workdir(self) -> Path:
        """The server's work folder (see `workdir.WorkFolder`)."""
        return self.work.path

    @classmethod
    def from_model(cls, model: str | None = None, *, allow_any_model: bool = False, **kwargs) -> "AttentionService":
        """A service for a preset name (default: the embedded model); a folder or Hub id needs `allow_any_model`."""
        presets = load_presets()
        name = model or "tiny"
        if name in presets:
            return cls(presets[name], **kwargs)
        if name == EMBEDDED:
            return cls(presets["tiny"], **kwargs)
        if not allow_any_model:
            raise PermissionError(f"model {name!r} is not a preset ({', '.join(presets)}); start the server with "
                                  "--allow-any-model to load a local folder or Hub id")
        return cls(ModelPreset(name=name, source=name, description=f"{name} (not a preset)"), **kwargs)

    # -- the model -------------------------------------------------------------------------------------------

    @property
    def pipe(self):
        """The pipeline, loaded on first use (once, whoever asks first)."""
        with self._loading:
            if self._pipe is None:
                from .pipeline import load_pipeline

                source = self.preset.name if self.preset.name in load_presets() else self.preset.source
                self._pipe = load_pipeline(source, device=self.device, dtype=self.dtype, offload=self.offload)
        return self._pipe

    def defaults(self) -> Defaults:
        """The UI's defaults and bounds (loads the pipeline: the size step comes from its VAE)."""
        if self._defaults is None:
            self._defaults = self._make_defaults()
        return self._defaults

    def _make_defaults(self) -> Defaults:
        from .pipeline import native_size, schedulers_for, size_multiple
        from .processors import MODES
        from .steering import PROCESSORS

        p = self.preset
        step = size_multiple(self.pipe)
        native = native_size(self.pipe)
        if p.name not in load_presets():  # a folder or Hub id: its own training size, not a preset's 512
            p = dataclasses.replace(p, height=native, width=native, max_side=max(p.max_side, native))
        max_side = max(step, p.max_side // step * step)
        fit = lambda v: min(max_side, max(step, round((v or native) / step) * step))  # noqa: E731
        return Defaults(
            model=p.name, description=p.description, steps=min(p.steps, MAX_STEPS), guidance=p.guidance,
            height=fit(p.height), width=fit(p.width), max_side=max_side, size_step=step,
            scheduler=p.scheduler or "default", per_step=p.source == EMBEDDED, examples=tuple(p.examples),
            schedulers=tuple(schedulers_for(self.pipe)), processors=PROCESSORS, modes=MODES,
        )

    @staticmethod
    def random_seed() -> int:
        return random.randint(0, MAX_SEED)

    # -- generation ------------------------------------------------------------------------------------------

    def prepare_run(self, session: str) -> None:
        """Arm a stop flag for the session's next run (so Stop also stops a run still in the queue). A run that
        is already queued or running keeps its flag: a second click on Generate must not take Stop away from it."""
        flag = self._stops.get(session)
        if flag is None or flag.is_set():
            self._stops[session] = threading.Event()

    def run_flag(self, session: str) -> threading.Event:
        """The stop flag the session's next `generate` or `compare` will use (armed by `prepare_run`, else new):
        a caller that must be able to stop the run from elsewhere (the UI, when Gradio cancels an event) takes it
        before the run starts and passes it as `cancel`."""
        return self._stops.setdefault(session, threading.Event())

    def stop(self, session: str) -> bool:
        """Ask the session's pending or running generation to stop; False if it has none."""
        flag = self._stops.get(session)
        if flag is not None:
            flag.set()
        return flag is not None

    def _spec(self, req: GenerateRequest):
        from .steering import ProcessorSpec, parse_weights

        return ProcessorSpec(req.processor, mode=req.mode, weights=parse_weights(req.weights),
                             edit_prompt=req.edit_prompt or None, inject=float(req.inject),
                             layers=(req.processor_layers or "*").strip() or "*")

    def _check(self, req: GenerateRequest) -> GenerateRequest:
        """Fill in the preset's defaults and refuse what the UI does not offer (ValueError, naming the fix)."""
        d = self.defaults()
        for name in ("prompt", "negative_prompt", "edit_prompt", "processor_layers"):
            text = getattr(req, name)
            if not isinstance(text, str):
                raise ValueError(f"{name} must be text")
            if len(text) > MAX_PROMPT_CHARS:
                raise ValueError(f"the {name.replace('_', ' ')} has {len(text)} characters; the limit is "
                                 f"{MAX_PROMPT_CHARS}")
        if not req.prompt.strip():
            raise ValueError("the prompt is empty; type what the image should show")
        req = dataclasses.replace(
            req, steps=d.steps if req.steps is None else req.steps,
            guidance=d.guidance if req.guidance is None else req.guidance,
            width=d.width if req.width is None else req.width, height=d.height if req.height is None else req.height,
            per_step=d.per_step if req.per_step is None else bool(req.per_step))
        checks = (("seed", req.seed, 0, MAX_SEED), ("steps", req.steps, 1, MAX_STEPS),
                  ("width", req.width, d.size_step, d.max_side), ("height", req.height, d.size_step, d.max_side))
        for name, value, low, high in checks:
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or int(value) != value):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
            if not low <= value <= high:
                raise ValueError(f"{name}={int(value)} is out of range; use {low}..{high}")
        for name in ("width", "height"):
            if getattr(req, name) % d.size_step:
                raise ValueError(f"{name}={getattr(req, name)} is not a multiple of {d.size_step}")
        if isinstance(req.guidance, bool) or not isinstance(req.guidance, (int, float)):
            raise ValueError(f"guidance must be a number, got {req.guidance!r}")
        if not 0 <= float(req.guidance) <= MAX_GUIDANCE:
            raise ValueError(f"guidance={req.guidance} is out of range; use 0..{MAX_GUIDANCE:g}")
        if req.scheduler not in d.schedulers:
            raise ValueError(f"unknown scheduler {req.scheduler!r}; use one of {', '.join(d.schedulers)}")
        return dataclasses.replace(req, seed=int(req.seed), steps=int(req.steps), width=int(req.width),
                                   height=int(req.height), guidance=float(req.guidance))

    def vocabulary_note(self, req: GenerateRequest) -> str | None:
        """A note naming the request's words the model never saw (closed-vocabulary presets), for before the run."""
        from .tokens import vocabulary_note

        return vocabulary_note([req.prompt, req.edit_prompt if req.processor == "edit" else ""],
                               self.preset.vocabulary)

    def generate(self, req: GenerateRequest, *, session: str = "", progress: Callable[[int, int], None] | None = None,
                 cancel: threading.Event | None = None) -> Entry:
        """Generate one image with its maps, save it (and its zip bundle), and return the session's new entry.

        Waits for the generation that holds the pipeline to end. Raises `ValueError` for bad settings and
        `pipeline.GenerationCancelled` when `stop(session)` was called or `cancel` set (from `run_flag`); a
        stopped run ends after its current step, with its processors restored, and is not saved.
        """
        flag = cancel if cancel is not None else self.run_flag(session)
        try:
            return self._generate(self._check(req), flag, progress)
        finally:
            if self._stops.get(session) is flag:
                del self._stops[session]

    @contextlib.contextmanager
    def _pipeline_slot(self, flag: threading.Event):
        """Hold the pipeline for one call: wait while another generation holds it (a stopped one still runs its
        current step and restores its processors), unless this run is stopped meanwhile."""
        from .pipeline import GenerationCancelled

        while not self._generating.acquire(timeout=0.05):
            if flag.is_set():
                raise GenerationCancelled("generation was cancelled")
        try:
            yield
        finally:
            self._generating.release()

    def _generate(self, req: GenerateRequest, flag: threading.Event, progress) -> Entry:
        from .pipeline import GenerationCancelled, generate

        spec = self._spec(req)
        with self._pipeline_slot(flag):
            if flag.is_set():  # stopped while waiting in the queue
                raise GenerationCancelled("generation was cancelled")
            start = time.perf_counter()
            # the default map view is this service's preset's, whatever pipe it was given
            result = generate(
                self.pipe, req.prompt, negative_prompt=req.negative_prompt or None, seed=req.seed, steps=req.steps,
                guidance_scale=req.guidance, height=req.height, width=req.width, mode=spec.mode,
                per_step=req.per_step, scheduler=None if req.scheduler == "default" else req.scheduler,
                keep_heads=True, processor=spec, map_layers=self.preset.map_layers, progress=progress, cancel=flag)
            seconds = time.perf_counter() - start
        if flag.is_set():  # stopped after its last step: the caller was told it stopped; keep nothing
            raise GenerationCancelled("generation was cancelled")
        return self._store(result, seconds)

    def _store(self, result: GenerationResult, seconds: float | None, *, outputs: bool = True) -> Entry:
        """Save a result (in its own subfolder of `outputs` if set), zip it into a new work-folder entry and put
        the images the browser is sent next to the zip."""
        s = result.settings
        prompt = s["prompt"] if isinstance(s["prompt"], str) else s["prompt"][0]
        name = f"{safe_name(' '.join(str(prompt).split()[:6]))[:48]}-s{s.get('seed')}"
        work = self.work.new_entry()
        images = [image_name(i) for i in range(len(result.images))]
        if outputs and self.outputs is not None:
            folder = self.outputs / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{uuid.uuid4().hex[:8]}"
            result.save(folder)
            bundle = zip_folder(folder, work / f"crossattn-{name}.zip")
            for image in images:
                shutil.copyfile(folder / image, work / image)
        else:  # save into the entry's folder, zip, and keep only the zip and the images
            folder = result.save(work)
            bundle = zip_folder(work, work / f"crossattn-{name}.zip")
            for path in work.iterdir():
                if path.name not in (bundle.name, *images):
                    path.unlink()
        processor = (s.get("processor") or {}).get("name", "capture")
        caption = f"{result.alignments[-1].prompt[:60]} · seed {s.get('seed')} · {processor}"
        return Entry(result=result, folder=folder, bundle=bundle, caption=caption, seconds=seconds)

    def files(self, entry: Entry) -> Entry:
        """Make sure an entry's zip and images are in the work folder (pruning deletes old ones; a session may
        still show them): write them again if they are gone. Returns the entry, updated in place."""
        if entry.bundle.is_file() and entry.image_path.is_file():
            self.work.touch(entry.bundle.parent)
            return entry
        fresh = self._store(entry.result, entry.seconds, outputs=False)
        entry.bundle = fresh.bundle
        if entry.folder.parent.parent == self.workdir / "entries" or not entry.folder.exists():
            entry.folder = fresh.folder
        return entry

    def compare(self, req: GenerateRequest, baseline: str = "capture", *, session: str = "",
                progress: Callable[[int, int], None] | None = None, cancel: threading.Event | None = None,
                ) -> Comparison:
        """The request's processor (B) against a baseline processor (A), same prompt and seed."""
        if baseline not in ("capture", "default"):
            raise ValueError(f"unknown baseline {baseline!r}; use capture or default")
        req = self._check(req)
        total = 2 * req.steps
        flag = cancel if cancel is not None else self.run_flag(session)
        try:
            a = self._generate(dataclasses.replace(req, processor=baseline, weights="", edit_prompt=""), flag,
                               progress and (lambda i, n: progress(i, total)))
            b = self._generate(req, flag, progress and (lambda i, n: progress(req.steps + i, total)))
        finally:
            if self._stops.get(session) is flag:
                del self._stops[session]
        difference, peak = pixel_difference(a.image, b.image)
        mean = float(np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).mean())
        summary = (f"**A** = {baseline}, **B** = {req.processor}; same prompt and seed {req.seed}. "
                   f"Pixel difference: max {peak} / 255, mean {mean:.2f}.")
        return Comparison(a=a, b=b, difference=difference, summary=summary)

    @staticmethod
    def add_to_history(history: Sequence[Entry] | None, *entries: Entry) -> list[Entry]:
        """The session's history with `entries` first (newest first, at most MAX_HISTORY)."""
        return ([*reversed(entries), *(history or [])])[:MAX_HISTORY]

    # -- bundles ---------------------------------------------------------------------------------------------

    def open_bundle(self, path: str | Path) -> Entry:
        """Load a zip bundle (uploaded or downloaded earlier) for inspection; ValueError if it is not one.

        The zip is checked before extraction and its files as a whole after (see `bundles.read_bundle`);
        messages name the file by its base name only."""
        path = Path(path)
        if path.suffix.lower() != ".zip":
            raise ValueError(f"{path.name} is not a .zip map bundle; upload the .zip this app lets you download")
        work = self.work.new_entry()
        try:
            with self.work.scratch() as scratch:
                result = read_bundle(path, scratch, keep_images=work)
            bundle = work / path.name
            shutil.copyfile(path, bundle)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        s = result.settings
        caption = f"{result.alignments[-1].prompt[:60]} · seed {s.get('seed')} · opened"
        return Entry(result=result, folder=work, bundle=bundle, caption=caption)

    def _opened(self, path: str | Path) -> Entry:
        """`open_bundle` with a small cache (repeated /heatmap calls on one bundle read it once)."""
        path = Path(path)
        try:
            stat = path.stat()
        except OSError as err:
            raise ValueError(f"cannot read the bundle {path.name}: {err.strerror}") from err
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._open_lock:
            if key in self._open:
                self._open.move_to_end(key)
                return self._open[key]
        entry = self.open_bundle(path)
        with self._open_lock:
            self._open[key] = entry
            while len(self._open) > MAX_OPEN_BUNDLES:
                _, old = self._open.popitem(last=False)
                shutil.rmtree(old.bundle.parent, ignore_errors=True)
        return entry

    def heatmap_file(self, bundle: str | Path, word: str, filters: MapFilters = MapFilters()) -> Path:
        """The overlay of `word` for a bundle file, as a PNG (the /heatmap API)."""
        return self.png_file(self.overlay(self._opened(bundle), word, filters))

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
        return MapChoices(
            words=words, default_word=default, layers=layers, resolutions=resolutions,
            default_resolutions=labels(entry.result.default_resolutions() or store.resolutions()),
            num_steps=store.num_steps,
            has_steps=store.has_steps, heads=min(heads) if heads and None not in heads else 0,
            layer_resolutions={l: labels([store.layer_shape(l)])[0] for l in store.layers})

    @staticmethod
    def filters(layers: Sequence[str] | str | None = None, resolutions: Sequence[str] | str | None = None,
                step_from: int = 0, step_to: int | None = None, head: int | str | None = None,
                alpha: float = 0.5, cmap: str = DEFAULT_CMAP) -> MapFilters:
        """Build `MapFilters` from UI or API values: lists or comma-separated text. Layers "*" or "all" means
        every layer; with layers and resolutions both None or "", the map is the model's default view
        (`GenerationResult.default_resolutions`). Head "mean" or -1 means the mean of the heads; step_to -1 means
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
        if kw["layers"] is None and resolutions is None:
            resolutions = entry.result.default_resolutions()
        names = store.select_layers(kw["layers"], resolutions)
        sizes = ", ".join(f"{h}x{w}" for h, w in store.resolutions() if any(store.layer_shape(n) == (h, w)
                                                                           for n in names))
        n = store.num_steps
        picked = kw.get("steps", range(n))
        steps = (f"step {picked[0] + 1} of {n}" if len(picked) == 1 else
                 f"steps {picked[0] + 1}–{picked[-1] + 1} of {n}")
        heads = [store.num_heads(l) for l in names]
        if filters.head is not None:
            head = f"head {filters.head}"
        elif heads and None not in heads and len(set(heads)) == 1:
            head = f"mean of {heads[0]} heads"
        else:
            head = "mean of the heads"
        return f"{len(names)} of {len(store.layers)} layers ({sizes}) · {steps} · {head}"

    def recorded_settings(self, entry: Entry) -> dict[str, object]:
        """The settings a result was generated with, as `GenerateRequest` fields, for the controls to show again
        (an opened bundle): only values this server accepts (a bundle from another model may name a scheduler or
        size this one lacks; those are left out)."""
        from .processors import MODES
        from .steering import PROCESSORS

        s = entry.result.settings
        proc = s.get("processor") if isinstance(s.get("processor"), dict) else {}
        prompt = s.get("edit_source_prompt") or s.get("prompt")
        weights = proc.get("weights") or ()
        fields = dict(
            prompt=prompt[0] if isinstance(prompt, list) and prompt else prompt,
            negative_prompt=s.get("negative_prompt") or "", seed=s.get("seed"), steps=s.get("steps"),
            guidance=s.get("guidance_scale"), width=s.get("width"), height=s.get("height"),
            scheduler=s.get("scheduler"), edit_prompt=proc.get("edit_prompt") or "",
            processor_layers=proc.get("layers"),
            weights=", ".join(f"{w}:{v:g}" for w, v in weights) if all(
                isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str)
                and isinstance(p[1], (int, float)) for p in weights) else None)
        base = GenerateRequest(prompt="a")
        kept = {}
        for name, value in fields.items():
            try:  # the same checks a generation makes, one field at a time
                self._check(dataclasses.replace(base, **{name: value}))
            except (ValueError, TypeError):
                continue
            kept[name] = value
        choices = dict(mode=MODES, processor=PROCESSORS)
        for name, value in (("mode", s.get("mode")), ("processor", proc.get("name"))):
            if value in choices[name]:
                kept[name] = value
        inject, per_step = proc.get("inject"), s.get("per_step")
        if isinstance(inject, (int, float)) and not isinstance(inject, bool) and 0 <= inject <= 1:
            kept["inject"] = float(inject)
        if isinstance(per_step, bool):
            kept["per_step"] = per_step
        return kept

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
            view.grid = word_grid(entry.image, result.word_maps(**kw), alpha=filters.alpha, cmap=filters.cmap,
                                  min_tile=128)
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
        line = (f"seed {s.get('seed')} · {s.get('steps')} steps · guidance {s.get('guidance_scale')} · "
                f"{s.get('width')}×{s.get('height')} · {s.get('scheduler')} · {detail}{took}")
        if entry.dropped_words:
            line += f"  \n⚠️ The tokenizer's length limit dropped: {' '.join(entry.dropped_words)}"
        return line
