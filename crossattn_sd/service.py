"""What the web UI does, as plain typed methods: generate, inspect stored maps, compare, export and import.

One `AttentionService` serves every user of a server. It owns the pipeline (loaded on first use) and no
per-user data: a user's generations are `Entry` objects that the UI keeps in that user's session state, and
each generation records into its own map store (`generate` makes one per call). The pipeline and its scheduler
are shared, so the service runs one generation at a time (a lock held for the whole pipeline call, whoever
calls: the UI's queue, the API, Python), and a stopped run holds it until its current step is done and its
processors are restored; inspection only reads stored maps, never re-runs diffusion, and may run concurrently
(it is `inspection.MapInspector`, which `AttentionService` extends; its names are importable from here too).
Files for the browser go to a bounded work folder (`workdir.WorkFolder`). No Gradio here: errors are
`ValueError`s with a message for the user.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
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
from .config import EMBEDDED, PACKAGE_SOURCE, ModelPreset, load_presets
from .inspection import (  # noqa: F401 (the UI and tests import them from here)
    FUNCTION_WORDS, NO_MAPS, Comparison, Entry, MapChoices, MapFilters, MapInspector, MapView, layer_label,
)
from .names import image_name, safe_name
from .overlay import CMAPS
from .workdir import VIEW_MAX_AGE_S, WorkFolder  # noqa: F401

if TYPE_CHECKING:
    from .result import GenerationResult

MAX_PROMPT_CHARS = 1000
MAX_STEPS = 100
MAX_GUIDANCE = 20.0
MAX_SEED = 2**32 - 1
MAX_HISTORY = 12  # generations kept per session; older ones drop out of the gallery
MAX_OPEN_BUNDLES = 8  # bundles kept loaded for /heatmap calls


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
    concepts: str = ""  # words to map beside the prompt's, comma-separated (need not be in the prompt)




@dataclass(frozen=True)
class InspectRequest:
    """One inspection of an uploaded image (see `inspect.inspect_image`), as the UI's controls give it."""

    image: str  # the path of a file Gradio's checked upload put in its upload folder (never a client's path)
    prompt: str
    concepts: tuple[str, ...] = ()
    t: float = 0.5
    passes: int = 1
    seed: int = 0
    fit: str = "resize"


def pixel_difference(a: Image.Image, b: Image.Image) -> tuple[Image.Image, int]:
    """|A - B| (max over RGB) as a grey image scaled to its maximum, and that maximum (0..255)."""
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max(axis=-1)
    peak = int(diff.max())
    return Image.fromarray((diff * (255.0 / max(1, peak))).astype(np.uint8)).convert("RGB"), peak


class AttentionService(MapInspector):
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
            scheduler=p.scheduler or "default", per_step=p.source == EMBEDDED or p.source.startswith(PACKAGE_SOURCE), examples=tuple(p.examples),
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
        for name in ("prompt", "negative_prompt", "edit_prompt", "processor_layers", "concepts"):
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
        from .concepts import check_concepts

        if check_concepts(req.concepts, self.preset.vocabulary) and req.processor == "default":
            raise ValueError("concepts need maps, and the default processor records none; pick capture")
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
        from .concepts import check_concepts
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
                keep_heads=True, processor=spec, map_layers=self.preset.map_layers, map_head=self.preset.map_head,
                progress=progress, cancel=flag, concepts=check_concepts(req.concepts) or None)
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
            a = self._generate(dataclasses.replace(req, processor=baseline, weights="", edit_prompt="",
                                                   concepts=req.concepts if baseline != "default" else ""), flag,
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

    def inspect_image(self, req: InspectRequest, *, session: str = "", cancel: threading.Event | None = None
                      ) -> Entry:
        """Map the words of a caption on an uploaded image (no image is generated) and return the session's new
        entry, saved and zipped like a generation. Holds the pipeline as a generation does (one call per pass).
        Raises `ValueError` for a file that is not a readable image, an empty or too large one, an empty prompt,
        `t` outside (0, 1] or a bad number of passes (checked before the pipeline is taken)."""
        from .inspect import MAX_PASSES, check_inspect_args, inspect_image, load_image
        from .pipeline import GenerationCancelled

        for name in ("prompt", *(f"concept {c!r}" for c in req.concepts)):
            text = req.prompt if name == "prompt" else name
            if len(text) > MAX_PROMPT_CHARS:
                raise ValueError(f"the {name} has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
        t, passes = check_inspect_args(req.prompt, req.t, req.passes, req.fit)
        if not 0 <= req.seed <= MAX_SEED or int(req.seed) != req.seed:
            raise ValueError(f"seed={req.seed} is out of range; use 0..{MAX_SEED}")
        image = load_image(req.image, name="the uploaded file")
        flag = cancel if cancel is not None else self.run_flag(session)
        try:
            with self._pipeline_slot(flag):
                if flag.is_set():
                    raise GenerationCancelled("inspection was cancelled")
                start = time.perf_counter()
                result = inspect_image(self.pipe, image, req.prompt, concepts=req.concepts, t=t, passes=passes,
                                       seed=int(req.seed), fit=req.fit, keep_heads=True, per_step=passes > 1,
                                       map_layers=self.preset.map_layers)
                seconds = time.perf_counter() - start
        finally:
            if self._stops.get(session) is flag:
                del self._stops[session]
        entry = self._store(result, seconds)
        entry.caption = f"{req.prompt[:60]} · inspected at t {t:g}"
        return entry

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

    # -- the controls for a result ---------------------------------------------------------------------------

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
        concepts = s.get("concepts")
        if isinstance(concepts, list) and all(isinstance(c, str) for c in concepts):
            try:  # the model's checks (a closed vocabulary)
                self._check(dataclasses.replace(base, concepts=", ".join(concepts)))
                kept["concepts"] = ", ".join(concepts)
            except ValueError:
                pass
        return kept
