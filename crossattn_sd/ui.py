"""The web UI: `build_demo(service)` lays out components and wires events; `serve(...)` runs it.

With its tab modules (`ui_inspect.py`: the Inspect tab, an image you already have; `ui_mechanisms.py`:
Mechanisms) and `ui_components.py`, the only modules that import Gradio. The work is done by
`service.AttentionService` (and `mechanisms.Mechanisms` for that tab); `Handlers` only turns
component values into the service's arguments and its results into component values, and turns the service's
`ValueError`s into `gr.Error` messages. Generation (the shared pipeline) runs one at a time (the queue's
"pipeline" slot, and the service's own lock); inspection reads the session's stored maps and runs concurrently.

How a stop reaches a running generation: the Stop button sets the session's stop flag (`service.stop`). A
client's cancel (gradio_client's `job.cancel()`, POST /gradio_api/cancel) makes Gradio cancel the event's
asyncio task; a sync handler's worker thread would run on (Gradio cannot stop a thread) while Gradio frees the
queue slot. So the generation handlers are async: they run the service in a thread, and a cancel sets that
run's flag and waits for the thread to end (one step) before the task ends and Gradio frees the slot. A closed
tab or a lost client ends the session's heartbeat, and Gradio runs the `unload` event, which stops the
session's run. (`gr.Request.is_disconnected()` cannot tell: in a queued event its request is the finished
POST that joined the queue, so it is always True.)

    python app.py                      # or: crossattn-sd serve
    from gradio_client import Client   # API: /generate, /heatmap, /compare (see the README)
"""

# No `from __future__ import annotations` here: Gradio reads a handler's return annotation unevaluated, and
# the /heatmap API documents its file output only if `FileData` is a class, not a string.
import asyncio
import functools
import html
import inspect
import math
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import gradio as gr
from gradio.data_classes import FileData
from PIL import Image

from .bundles import MAX_BUNDLE_BYTES
from .mechanisms import Mechanisms
from .service import MAX_SEED, AttentionService, Comparison, Entry, GenerateRequest, InspectRequest
from .ui_components import Number, Slider
from .ui_inspect import inspect_tab, wire_inspect_tab
from .ui_mechanisms import mechanisms_tab

QUEUE_SIZE = 32  # requests waiting beyond this are refused ("queue full") rather than piling up
MAX_UPLOAD_BYTES = MAX_BUNDLE_BYTES  # Gradio refuses larger uploads before they reach a handler
NOT_UPLOADED = ("the bundle must be a .zip uploaded to this server (gradio_client: handle_file(path); the raw "
                "API: POST /gradio_api/upload, then pass the FileData it returns); a server path is not read")
DISPLAY_SIDE = 256  # the clickable map panels are sent at least this large (their frame is 240 pixels high)
NO_LAYER = ("No layer is ticked, so there is no map to draw: tick a resolution (it ticks its layers) or a "
            "layer.")
SETTINGS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height", "scheduler", "mode",
            "processor", "weights", "edit_prompt", "inject", "per_step", "processor_layers",
            "concepts")  # the Generate inputs
INSPECT_CONCURRENCY = 4  # inspection handlers running at once; generation always runs one at a time
THEME = gr.themes.Soft(primary_hue="indigo", neutral_hue="slate",
                       font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
CSS = """
/* Small models make small images: scale them up to the frame (Gradio's default, scale-down, never
   enlarges), without blurring the map's cells. The clickable map panels (.readable) are sent enlarged instead
   (`enlarged`): Gradio computes a click's pixel as if the browser never enlarged an image. */
.pixelated img { image-rendering: pixelated; object-fit: contain !important; }
.readable img { image-rendering: pixelated; }
/* Gallery captions: whole, wrapped, instead of one line cut short; the history keeps four columns however few
   entries it has (Gradio stretches one or two to the gallery's width, pushing their captions out of view). */
#timeline .caption-label, #history .caption-label { white-space: normal; max-width: calc(100% - 8px);
  overflow-wrap: anywhere; font-size: 0.75em; line-height: 1.2; }
#history .grid-container { grid-template-columns: repeat(4, minmax(100px, 1fr)) !important; }
#title h1 { margin-bottom: 0; }
/* The result column's seven tabs: Gradio folds the ones that do not fit into a "..." menu, where the last two
   (Inspect, Mechanisms) went unseen below ~1500 px; shorter labels and tighter padding fit all seven at 1280 px
   (measured; at 1024 px two fold again). */
#result-tabs button[role=tab] { padding-left: 8px; padding-right: 8px; }
#colorbar .bar { height: 12px; border-radius: 3px; }
#colorbar .ends { display: flex; justify-content: space-between; font-size: 0.8em; opacity: 0.8; }
"""
GENERATE_HELP = {
    "default": "Diffusers' own attention: the baseline. Records no maps.",
    "capture": "Records every word's maps; exact mode gives the same image as Diffusers.",
    "reweight": "Scales the attention chosen words get (prompt-to-prompt re-weighting).",
    "edit": "Prompt-to-prompt editing: the edited prompt reuses the source's maps for the first steps.",
    "uniform": "Every pixel attends equally to every token (the mean of the values) on the chosen layers: what "
               "spatial attention adds. Its maps are flat by construction.",
}


def display_scale(size: tuple[int, int]) -> int:
    """How many times a map panel enlarges an image of this (width, height): the smallest whole factor that
    makes its longer side at least DISPLAY_SIDE (1 for an SD image)."""
    return max(1, math.ceil(DISPLAY_SIDE / max(size)))


def enlarged(image: Image.Image | None) -> Image.Image | None:
    """`image` enlarged `display_scale` times without blurring, for a panel whose clicks are read: Gradio's click
    index is in the pixels of the image sent, as the browser shows it scaled down or not at all."""
    if image is None:
        return None
    k = display_scale(image.size)
    return image if k == 1 else image.resize((image.width * k, image.height * k), Image.NEAREST)


def _user_error(err: Exception):
    """What a handler returns (or raises) for an exception: bad input becomes a Gradio error message; a stopped
    generation is not an error: it leaves every output as it was (an error would cover the previous images)
    and says so."""
    if isinstance(err, (ValueError, PermissionError, FileNotFoundError)):
        raise gr.Error(str(err), print_exception=False) from err
    from .pipeline import GenerationCancelled  # torch is loaded by now; not at import

    if isinstance(err, GenerationCancelled):
        gr.Warning("Stopped. Your previous results are kept.", title="Stopped")
        return gr.skip()  # one skip() leaves all of the event's outputs alone
    raise err


def _user_errors(fn: Callable) -> Callable:
    """Show the service's ValueErrors (bad input) as Gradio error messages; see `_user_error`."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def async_wrapper(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except (ValueError, PermissionError, FileNotFoundError, RuntimeError) as err:
                return _user_error(err)
        return async_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, PermissionError, FileNotFoundError, RuntimeError) as err:
            return _user_error(err)
    return wrapper


async def _until_done(future: asyncio.Future) -> None:
    """Wait for `future` whatever cancels the waiting task meanwhile (its thread cannot be stopped, only told
    to stop); its own outcome is left for its caller."""
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            pass


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or ""


def _returns(value: str) -> Callable[[], str]:
    return lambda: value


def _progress(progress: gr.Progress) -> Callable[[int, int], None]:
    return lambda step, total: progress((step, total), desc="denoising", unit="steps")


class Handlers:
    """Event handlers: Gradio values in, `AttentionService` calls, Gradio values out."""

    def __init__(self, service: AttentionService):
        self.service = service

    # -- generation ------------------------------------------------------------------------------------------

    def prepare(self, request: gr.Request):
        self.service.prepare_run(_session(request))

    def stop(self, request: gr.Request):
        """Stop the session's run after its current step (the run itself then says "Stopped")."""
        self.service.stop(_session(request))

    def closed(self, request: gr.Request):
        """The session's tab was closed or its client went away (Gradio's unload event): stop its run."""
        self.service.stop(_session(request))

    async def _run(self, session: str, work: Callable[[threading.Event], object]):
        """`work(flag)` in a worker thread. If Gradio cancels this event (a client's cancel), set the run's stop
        flag and return only once the thread has ended, so Gradio frees the queue slot after the run really
        stopped; the service's lock would hold the next generation back anyway."""
        flag = self.service.run_flag(session)
        future = asyncio.ensure_future(asyncio.to_thread(work, flag))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            flag.set()
            await _until_done(future)
            if not future.cancelled():
                future.exception()  # the run's own end (GenerationCancelled) is expected: nobody awaits it
            raise

    @staticmethod
    def request(prompt, negative_prompt, seed, steps, guidance, width, height, scheduler, mode, processor, weights,
                edit_prompt, inject, per_step, processor_layers, concepts="") -> GenerateRequest:
        return GenerateRequest(prompt=prompt or "", negative_prompt=negative_prompt or "",
                               seed=0 if seed is None else seed, steps=steps, guidance=guidance, width=width,
                               height=height, scheduler=scheduler, mode=mode, processor=processor,
                               weights=weights or "", edit_prompt=edit_prompt or "", inject=inject, per_step=per_step,
                               processor_layers=processor_layers or "*", concepts=concepts or "")

    @_user_errors
    async def generate(self, prompt: str, negative_prompt: str = "", seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, width: int | None = None, height: int | None = None,
                 scheduler: str = "default", mode: str = "exact", processor: str = "capture", weights: str = "",
                 edit_prompt: str = "", inject: float = 0.8, per_step: bool | None = None,
                 processor_layers: str = "*", concepts: str = "", history=None, request: gr.Request = None,
                 progress=gr.Progress()):
        """Generate an image and record every word's cross-attention maps (and the concepts', comma-separated
        words that need not be in the prompt).

        Returns the image, the prompt's words and a zip bundle (image.png, maps.npz, meta.json,
        attention.safetensors) that /heatmap reads.
        """
        req = self.request(prompt, negative_prompt, seed, steps, guidance, width, height, scheduler, mode,
                           processor, weights, edit_prompt, inject, per_step, processor_layers, concepts)
        note = self.service.vocabulary_note(req)
        if note:  # shown at once, while the run goes on: the user may want to see what such words do
            gr.Warning(note[0].upper() + note[1:] + ".", title="Unknown words")
        session = _session(request)
        entry = await self._run(session, lambda flag: self.service.generate(
            req, session=session, progress=_progress(progress), cancel=flag))
        history = self.service.add_to_history(history, entry)
        return entry.image, entry.prompt_words, str(entry.bundle), entry, history

    @_user_errors
    async def compare(self, prompt, negative_prompt, seed, steps, guidance, width, height, scheduler, mode, processor,
                weights, edit_prompt, inject, per_step, processor_layers="*", concepts: str = "",
                baseline: str = "capture", history=None, request: gr.Request = None, progress=gr.Progress()):
        """The same prompt and seed with a baseline processor (A) and the chosen processor (B)."""
        req = self.request(prompt, negative_prompt, seed, steps, guidance, width, height, scheduler, mode,
                           processor, weights, edit_prompt, inject, per_step, processor_layers, concepts)
        session = _session(request)
        cmp = await self._run(session, lambda flag: self.service.compare(
            req, baseline, session=session, progress=_progress(progress), cancel=flag))
        history = self.service.add_to_history(history, cmp.a, cmp.b)
        words = self.service.choices(cmp.b).words
        word = self.service.choices(cmp.b).default_word
        return (cmp, cmp.summary, cmp.a.image, cmp.b.image, cmp.difference,
                gr.update(choices=words, value=word), history, self.gallery(history))

    # -- showing an entry ------------------------------------------------------------------------------------

    def gallery(self, history):
        """The session's images, from the work folder (Gradio serves files only from folders it allows; the
        outputs folder may be anywhere)."""
        return [(str(self.service.files(e).image_path), e.caption) for e in history or []]

    @staticmethod
    def _key(entry: Entry) -> str:
        """Which entry and image are on show (an edit's two images have their own words)."""
        return f"{entry.folder}#{entry.index}"

    @staticmethod
    def _word_chips(entry: Entry, c, word: str | None = None):
        """The word chips of the image on show; the chosen word stays if this prompt has it."""
        two = len(entry.result.images) > 1
        whose = ("the edited prompt" if entry.index else "the source prompt") if two else "the prompt"
        info = f"click a word of {whose}" if entry.has_maps else "no maps: the default processor and FiLM have none"
        if not entry.has_maps:  # the words, none chosen: there is no map of any
            return gr.update(choices=c.words, value=None, interactive=False, info=info)
        return gr.update(choices=c.words, value=word if word in c.words else c.default_word, interactive=True,
                         info=info)

    def show(self, entry: Entry | None, history, shown: str | None):
        """Fill the word chips and filters with what the entry recorded (unless it is already on show: a
        stopped run or a click on the current entry keeps the chosen word and filters). The layer ticks are
        what is drawn: the default view ticks its resolutions and exactly their layers."""
        if entry is None or self._key(entry) == shown:
            return gr.skip()
        c = self.service.choices(entry)
        n = max(c.num_steps, 1)
        steps = dict(minimum=1, maximum=max(n, 2), interactive=c.has_steps)
        settings = {**entry.result.settings, "dropped_words": entry.dropped_words}
        images = entry.result.images
        edit = len(images) > 1
        return (
            self.service.describe(entry),
            self._word_chips(entry, c),
            gr.update(choices=c.layers, value=c.default_layers, interactive=entry.has_maps),
            gr.update(choices=c.resolutions, value=c.default_resolutions, interactive=entry.has_maps),
            gr.update(value=1, **steps),
            gr.update(value=n, **steps),
            gr.update(choices=["mean", *map(str, range(c.heads))],
                      value="mean" if c.default_head is None else str(c.default_head), interactive=bool(c.heads)),
            self.gallery(history),
            settings,
            "",
            entry.prompt_words,
            self._key(entry),
            gr.update(value=images[0] if edit else None, visible=edit),
            gr.update(choices=[(f"edited: {entry.result.alignments[-1].prompt}", len(images) - 1),
                               (f"source: {entry.result.alignments[0].prompt}", 0)] if edit else [],
                      value=entry.index, visible=edit),
            gr.update(label="Edited image" if edit else "Image"),
        )

    def switch(self, entry: Entry | None, index, word):
        """The edit's other image on show: its prompt's word chips (the chosen word stays if it has it), words
        and notes; the filters stay (both images' maps come from one run)."""
        if entry is None or index is None:
            return gr.skip()
        entry = entry.showing(int(index))
        return (entry, self.service.describe(entry), self._word_chips(entry, self.service.choices(entry), word),
                entry.prompt_words, self._key(entry))

    @_user_errors
    def pick(self, history, evt: gr.SelectData):
        """A click on the session gallery makes that entry current."""
        entry = self.service.files(history[evt.index])
        return entry, entry.image, str(entry.bundle)

    @_user_errors
    def open_bundle(self, path: str, history):
        entry = self.service.open_bundle(path)
        history = self.service.add_to_history(history, entry)
        return entry, history, entry.image, str(entry.bundle)

    # -- inspecting an uploaded image -------------------------------------------------------------------------

    @_user_errors
    def preview(self, file: str | None):
        """The uploaded image as it will be inspected (RGB; transparency on white, an animation's first frame), or
        the one-line reason it cannot be."""
        from .inspect import load_image

        if file is None:
            return None
        return load_image(checked_upload(file), name="the uploaded file")

    @_user_errors
    async def inspect_upload(self, file: str | None, prompt: str, concepts: str = "", t: float = 0.5, passes: int = 1,
                             seed: int = 0, fit: str = "resize", history=None, request: gr.Request = None):
        """Map each word of a caption on an uploaded image (no image is generated): the image is VAE-encoded,
        noised to time t and denoised once per pass with the caption.

        Returns the image, the caption's words and a zip bundle (image.png is the uploaded image) that /heatmap reads.
        """
        req = InspectRequest(image=str(checked_upload(file)), prompt=prompt or "", concepts=parse_concepts(concepts),
                             t=t, passes=passes, seed=0 if seed is None else seed, fit=fit)
        session = _session(request)
        entry = await self._run(session, lambda flag: self.service.inspect_image(req, session=session, cancel=flag))
        history = self.service.add_to_history(history, entry)
        return entry.image, entry.prompt_words, str(entry.bundle), entry, history

    def restore_settings(self, entry: Entry | None):
        """The settings an opened bundle recorded, into the Generate controls (those this server accepts)."""
        if entry is None:
            return gr.skip()
        kept = self.service.recorded_settings(entry)
        return [kept.get(name, gr.skip()) for name in SETTINGS]

    # -- inspection ------------------------------------------------------------------------------------------

    def filters(self, layers, resolutions, step_from, step_to, head, alpha, cmap):
        """UI filter values (steps counted from 1) -> `MapFilters` (steps counted from 0)."""
        return self.service.filters(layers, resolutions, int(step_from or 1) - 1, int(step_to or 0) - 1, head,
                                    alpha, cmap)

    def ticked_layers(self, entry: Entry | None, resolutions):
        """Ticking resolutions ticks exactly their layers (the layer ticks are what is drawn)."""
        if entry is None:
            return gr.skip()
        return self.service.choices(entry).layers_at(resolutions or [])

    def ticked_resolutions(self, entry: Entry | None, layers):
        """Ticking layers ticks the resolutions all of whose layers are ticked."""
        if entry is None:
            return gr.skip()
        return self.service.choices(entry).resolutions_of(layers or [])

    def step_range(self, moved: str, entry: Entry | None, step_from, step_to, head):
        """Keep From <= To once a slider is let go: the other one moves along (clamped to the run's steps; a typed
        value past them is clamped too, as the slider shows it). A range narrower than every step draws the mean
        of the heads (per-step maps are head-averaged): the Heads box says so and waits. Runs without Gradio's
        preprocessing (`preprocess=False`), whose bound check would reject a typed value before it is clamped."""
        if entry is None:
            return gr.skip()
        c = self.service.choices(entry)
        n = max(c.num_steps, 1)
        clamp = lambda v: min(n, max(1, int(round(float(v))) if v not in (None, "") else 1))  # noqa: E731
        lo, hi = clamp(step_from), clamp(step_to if step_to not in (None, "") else n)
        if lo > hi:
            lo, hi = (lo, lo) if moved == "from" else (hi, hi)
        every = lo == 1 and hi == n
        heads = gr.update(interactive=bool(c.heads)) if every else gr.update(value="mean", interactive=False)
        return lo, hi, heads

    def _nothing(self, tab: str, why: str):
        """The inspect outputs when no map can be drawn: empty panels and the reason in place of the summary."""
        return (None, None, why, "", None if tab == "grid" else gr.skip(), None if tab == "timeline" else gr.skip(),
                None if tab == "timeline" else gr.skip())

    @_user_errors
    def inspect(self, entry: Entry | None, tab: str, word, layers, resolutions, step_from, step_to, head, alpha,
                cmap):
        """Redraw the word's overlay, map and summary, and the all-words grid or the timeline only when its tab
        is on show (they take several times longer; selecting the tab draws them). The ticked layers are what is
        drawn; what cannot be drawn is said in place of the maps (no error: it would repeat on every change)."""
        if entry is None:
            return gr.skip()
        if not entry.has_maps:
            return self._nothing(tab, self.service.inspect(entry, word).summary)
        if not layers:
            return self._nothing(tab, NO_LAYER)
        try:
            view = self.service.inspect(entry, word, self.filters(layers, None, step_from, step_to, head, alpha,
                                                                  cmap), grid=tab == "grid", timeline=tab == "timeline")
        except ValueError as err:
            return self._nothing(tab, f"Nothing to draw: {err}.")
        grid = gr.skip()
        if tab == "grid":  # a file: Gradio would encode the large grid at a slower PNG level
            grid = None if view.grid is None else str(self.service.png_file(view.grid))
        frames, gif = gr.skip(), gr.skip()
        if tab == "timeline":
            frames = [(str(self.service.png_file(im)), caption) for im, caption in view.frames or []] or None
            gif = None if view.animation is None else str(view.animation)
        return (enlarged(view.overlay), enlarged(view.heatmap), view.summary, colorbar_html(view.colorbar), grid,
                frames, gif)

    def read_value(self, entry: Entry | None, word, layers, resolutions, step_from, step_to, head, alpha, cmap,
                   evt: gr.SelectData):
        """The map's value under a click. The panels show the map enlarged `display_scale` times (Gradio's click
        index is in the pixels of the image it was sent, never enlarged by the browser), so the index is divided
        back to the map's pixel."""
        if entry is None or evt.index is None:
            return gr.skip()
        if not entry.has_maps or not layers:
            return ""
        k = display_scale(entry.image.size)
        x, y = (int(v) // k for v in evt.index)
        try:
            return self.service.value_at(entry, word, self.filters(layers, None, step_from, step_to, head, alpha,
                                                                   cmap), x, y)
        except ValueError as err:
            return f"Nothing to read: {err}."

    def compare_maps(self, cmp: Comparison | None, word, layers, resolutions, step_from, step_to, head, alpha, cmap):
        """A's and B's maps of one word with the ticked layers (none ticked: the model's default view); what
        cannot be drawn is said in the note."""
        if cmp is None:
            return [gr.skip()] * 4
        try:
            return self.service.compare_maps(cmp, word, self.filters(layers or None, None, step_from, step_to, head,
                                                                     alpha, cmap))
        except ValueError as err:
            return cmp.a.image, cmp.b.image, None, f"No map difference: {err}."

    @_user_errors
    def heatmap(self, bundle: FileData, word: str, layers: str = "", resolutions: str = "", step_from: int = 0,
                step_to: int = -1, head: int = -1, alpha: float = 0.5, cmap: str = "jet") -> FileData:
        """The overlay of one word's heat map for a map bundle from /generate.

        layers: comma-separated glob patterns of layer names ("*": every layer); resolutions: e.g. "16x16, 8x8";
        both "": the model's default view (the embedded model: its 16x16 layers); step_from/step_to: 0-based,
        inclusive (-1: last); head: one attention head (-1: mean of heads).
        """
        filters = self.service.filters(layers, resolutions, step_from, step_to, head, alpha, cmap)
        return FileData(path=str(self.service.heatmap_file(uploaded_file(bundle), word, filters)))


def uploaded_file(payload) -> Path:
    """The path of a file the client uploaded, from an API payload; ValueError for anything else.

    gr.api hands the handler its raw payload. Gradio checks and copies a file only when the payload is a
    FileData (a dict whose meta says "gradio.FileData"): its path must be in Gradio's upload folder (an
    upload, or a file this server sent) and Gradio moves it into the endpoint's cache. A plain string or a
    dict without that meta would reach the handler unchecked, so only a checked FileData is accepted, and its
    path must lie in the upload folder. The message is the same whatever the path names (no probing)."""
    from gradio.utils import get_upload_folder, is_in_or_equal

    if isinstance(payload, FileData):
        payload = payload.model_dump()
    if not (isinstance(payload, dict) and isinstance(payload.get("meta"), dict)
            and payload["meta"].get("_type") == "gradio.FileData" and isinstance(payload.get("path"), str)):
        raise ValueError(NOT_UPLOADED)
    path = Path(payload["path"])
    if not (path.is_absolute() and is_in_or_equal(path, get_upload_folder())):
        raise ValueError(NOT_UPLOADED)
    return path


NO_UPLOAD = "upload an image first (PNG, JPEG, WebP, GIF, BMP or TIFF)"


def checked_upload(path) -> Path:
    """The path of a file Gradio's upload put in its upload folder (its component checked it); ValueError for
    nothing uploaded or any other path (the message never says whether it exists)."""
    from gradio.utils import get_upload_folder, is_in_or_equal

    if isinstance(path, dict):  # a FileData payload that reached us whole
        path = path.get("path")
    if not isinstance(path, str) or not path:
        raise ValueError(NO_UPLOAD)
    path = Path(path)
    if not (path.is_absolute() and is_in_or_equal(path, get_upload_folder())):
        raise ValueError(NOT_UPLOADED.replace("the bundle must be a .zip", "the image must be a file"))
    return path


def parse_concepts(text: str | None) -> tuple[str, ...]:
    """ "triangle, background" -> ("triangle", "background")."""
    return tuple(c.strip() for c in (text or "").split(",") if c.strip())


def processor_options(processor: str):
    """Show only the options of the chosen processor."""
    return (gr.update(visible=processor == "capture"), gr.update(visible=processor == "reweight"),
            gr.update(visible=processor == "edit"), gr.update(visible=processor == "edit"),
            gr.update(info=GENERATE_HELP.get(processor, "")))


def colorbar_html(colours: list[str]) -> str:
    if not colours:
        return ""
    stops = ", ".join(html.escape(c) for c in colours)
    return (f'<div class="bar" style="background: linear-gradient(to right, {stops})"></div>'
            '<div class="ends"><span>low</span><span>attention share</span><span>high</span></div>')


def build_demo(service: AttentionService, mechanisms: Mechanisms | None = None) -> gr.Blocks:
    """The UI for one service: a Generate column on the left, the result and its maps on the right; `mechanisms`:
    the four embedded models of the Mechanisms tab (default: loaded from the package when first used)."""
    d = service.defaults()
    h = Handlers(service)
    pixel = dict(type="pil", format="png", interactive=False, elem_classes="pixelated", height=240)
    # Map panels are sent enlarged (`enlarged`), so a click reads its pixel; no corner buttons over the map (the
    # bundle holds the maps).
    readable = {**pixel, "elem_classes": "readable", "buttons": []}
    # Gradio copies every image it sends into its cache; a server runs for weeks: drop copies a day old.
    with gr.Blocks(title="crossattn-sd", delete_cache=(3600, 86400)) as demo:
        current = gr.State(None)  # the Entry on show
        tab = gr.State("map")  # the result tab on show: "map", "grid", "timeline" or "other"
        shown = gr.State(None)  # the folder of the entry whose words and filters are on show
        history = gr.State([])  # this session's entries, newest first
        comparison = gr.State(None)
        gr.Markdown("# crossattn-sd\nSee where each word of your prompt went: per-word attention maps of a diffusion "
                    "model (a UNet's cross-attention or a transformer's joint attention), recorded while it generates. "
                    f"Model: **{d.model}** — {d.description}.",
                    elem_id="title")
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=340):
                prompt = gr.Textbox(label="Prompt", lines=2, max_length=d.max_prompt_chars, elem_id="prompt",
                                    placeholder=d.examples[0] if d.examples else "describe the image")
                concepts = gr.Textbox("", label="Concepts", max_length=d.max_prompt_chars, elem_id="concepts",
                                      placeholder="triangle, green",
                                      info="more words to map, comma-separated; they need not be in the prompt, "
                                           "and the image stays the same")
                with gr.Row():
                    gen_btn = gr.Button("Generate", variant="primary", scale=3, elem_id="generate")
                    stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
                if d.examples:
                    gr.Examples([[e] for e in d.examples], inputs=[prompt], label="Example prompts")
                with gr.Accordion("Image settings", open=True):
                    with gr.Row(equal_height=True):
                        seed = Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, scale=4,
                                      elem_id="seed")
                        dice = gr.Button("Random", scale=1, min_width=90, elem_id="random-seed")
                    with gr.Row():
                        steps = Slider(1, d.max_steps, d.steps, step=1, label="Steps")
                        guidance = Slider(0, d.max_guidance, d.guidance, step=0.1, label="Guidance scale")
                    with gr.Row():
                        width = Slider(d.size_step, d.max_side, d.width, step=d.size_step, label="Width")
                        height = Slider(d.size_step, d.max_side, d.height, step=d.size_step, label="Height")
                    with gr.Row():
                        scheduler = gr.Dropdown(list(d.schedulers), value=d.scheduler, label="Scheduler")
                        per_step = gr.Checkbox(d.per_step, label="Keep per-step maps",
                                               info="for timelines and step ranges")
                    negative = gr.Textbox("", label="Negative prompt", placeholder="used when guidance > 1")
                with gr.Accordion("Attention processor", open=True):
                    processor = gr.Radio(list(d.processors), value="capture", label="Processor",
                                         info=GENERATE_HELP["capture"], elem_id="processor")
                    mode = gr.Radio(list(d.modes), value="exact", label="Capture mode",
                                    info="exact: same image as Diffusers; explicit: probabilities @ values")
                    weights = gr.Textbox("", label="Word weights", placeholder="circle:2, red:0.5", visible=False,
                                         info="word:weight pairs; 1 leaves a word alone, 0 removes it")
                    edit_prompt = gr.Textbox("", label="Edited prompt", visible=False, elem_id="edit-prompt",
                                             placeholder="the prompt with a word changed")
                    inject = Slider(0, 1, 0.8, step=0.05, label="Injection", visible=False,
                                       info="fraction of steps that reuse the source's maps")
                    processor_layers = gr.Textbox("*", label="Apply to layers", elem_id="processor-layers",
                                                  # one star only: Gradio's info text turns *a pair* into italics
                                                  # and has no escape (a backslash shows, the stars still go)
                                                  info="the default is every layer; or comma-separated layer patterns "
                                                       "such as 'up_blocks.*' or map sizes such as '16'")

            with gr.Column(scale=6, min_width=420):
                status = gr.Markdown("Generate an image, then click a word to see where it went.", elem_id="status")
                which = gr.Radio([], label="Maps of", visible=False, elem_id="which-image",
                                 info="an edit made two images: the chips and maps belong to the one chosen here")
                word = gr.Radio([], label="Word", info="click a word of the prompt", elem_id="word-chips")
                with gr.Tabs(elem_id="result-tabs") as result_tabs:
                    with gr.Tab("Heat map", id="map") as map_tab:
                        with gr.Row():
                            other = gr.Image(label="Source image", visible=False, elem_id="other-image", **pixel)
                            image = gr.Image(label="Image", elem_id="image", **pixel)
                            overlay = gr.Image(label="Overlay", elem_id="overlay", **readable)
                            heat = gr.Image(label="Map", elem_id="map", **readable)  # the summary says: click to read
                        colorbar = gr.HTML(elem_id="colorbar")
                        summary = gr.Markdown(elem_id="summary")
                        readout = gr.Markdown(elem_id="readout")
                    with gr.Tab("All words") as grid_tab:
                        grid = gr.Image(label="Every word", type="pil", format="png", interactive=False, height=420,
                                        elem_id="grid")
                    with gr.Tab("Timeline") as timeline_tab:
                        gr.Markdown("The word's map at each denoising step, on one colour scale (needs per-step maps).")
                        frames = gr.Gallery(label="Steps", columns=5, height=330, elem_classes="pixelated",
                                            allow_preview=True, elem_id="timeline")
                        gif = gr.Image(label="Animation", type="filepath", interactive=False, height=200,
                                       elem_id="animation")
                    with gr.Tab("Compare") as compare_tab:
                        gr.Markdown("**A** runs a baseline processor and **B** the processor chosen on the left, "
                                    "with the same prompt and seed.")
                        with gr.Row(equal_height=True):
                            baseline = gr.Radio(["capture", "default"], value="capture", label="A (baseline)", scale=2)
                            cmp_btn = gr.Button("Compare A and B", variant="primary", scale=1)
                        cmp_summary = gr.Markdown(label="Summary", elem_id="cmp-summary")
                        with gr.Row():
                            img_a = gr.Image(label="A", elem_id="cmp-a", **pixel)
                            img_b = gr.Image(label="B", elem_id="cmp-b", **pixel)
                            img_diff = gr.Image(label="|A − B|", elem_id="cmp-diff", **pixel)
                        cmp_word = gr.Dropdown([], label="Word", info="its map in A, in B, and B − A")
                        with gr.Row():
                            map_a = gr.Image(label="A: map", **pixel)
                            map_b = gr.Image(label="B: map", **pixel)
                            map_diff = gr.Image(label="B − A", **pixel)
                        cmp_note = gr.Markdown(elem_id="cmp-note")
                    with gr.Tab("History") as history_tab:
                        with gr.Row(equal_height=True):
                            bundle = gr.File(label="Map bundle: image.png, maps.npz, meta.json, attention.safetensors",
                                             interactive=False, elem_id="bundle", scale=3)
                            upload = gr.UploadButton("Open a bundle (.zip)", file_types=[".zip"], scale=1,
                                                     elem_id="upload")
                        gallery = gr.Gallery(label="This session (click to inspect)", columns=4, height=400,
                                             allow_preview=False, elem_id="history", elem_classes="pixelated")
                        with gr.Accordion("Words and settings", open=False):
                            words = gr.JSON(label="Words")
                            settings = gr.JSON(label="Settings")
                    with gr.Tab("Inspect", id="inspect") as inspect_tab_block:
                        inspect_controls = inspect_tab(d)
                    with gr.Tab("Mechanisms", elem_id="mechanisms-tab") as mechanisms_tab_block:
                        mechanisms_tab(mechanisms or Mechanisms(), prompt, seed)
                with gr.Accordion("Map filters", open=True):
                    with gr.Row():
                        layers = gr.CheckboxGroup([], label="Layers", scale=3, elem_id="layers")
                        resolutions = gr.CheckboxGroup([], label="Resolutions", scale=1, elem_id="resolutions")
                    with gr.Row():
                        step_from = Slider(1, 2, 1, step=1, label="From step", interactive=False, elem_id="step-from")
                        step_to = Slider(1, 2, 2, step=1, label="To step", interactive=False, elem_id="step-to")
                        head = gr.Dropdown(["mean"], value="mean", label="Heads", elem_id="heads",
                                           info="one head needs every step (per-step maps are head-averaged)")
                    with gr.Row():
                        alpha = Slider(0, 1, 0.5, step=0.05, label="Overlay opacity", elem_id="alpha")
                        cmap = gr.Dropdown(list(d.cmaps), value=d.cmaps[0], label="Colour map")

        # -- wiring ------------------------------------------------------------------------------------------
        settings_in = [prompt, negative, seed, steps, guidance, width, height, scheduler, mode, processor, weights,
                       edit_prompt, inject, per_step, processor_layers, concepts]
        filters_in = [layers, resolutions, step_from, step_to, head, alpha, cmap]
        inspect_out = [overlay, heat, summary, colorbar, grid, frames, gif]
        show_out = [status, word, layers, resolutions, step_from, step_to, head, gallery, settings, readout, words,
                    shown, other, which, image]
        private = dict(api_visibility="private")

        processor.change(processor_options, processor, [mode, weights, edit_prompt, inject, processor],
                         queue=False, **private)
        dice.click(service.random_seed, None, seed, queue=False, **private)
        stop_btn.click(h.stop, None, None, queue=False, **private)

        # Generate: arm the session's stop flag at once (so Stop also stops a queued run), then queue the run
        # (one at a time: the pipeline is shared), then show its words and maps.
        (gr.on([gen_btn.click, prompt.submit], h.prepare, None, None, queue=False, trigger_mode="once", **private)
         .then(h.generate, [*settings_in, history], [image, words, bundle, current, history], api_name="generate",
               concurrency_limit=1, concurrency_id="pipeline", show_progress_on=[image, overlay, heat])
         .success(h.show, [current, history, shown], show_out, **private)
         .success(h.inspect, [current, tab, word, *filters_in], inspect_out, **private))

        # Redraw on a change: a word, heads or colour map at once; a slider once it is let go (`release`: not on
        # every move of a drag or every digit typed); ticks after the other filter's ticks follow them.
        compare_maps_out = [map_a, map_b, map_diff, cmp_note]
        at_once = [head.input, alpha.release, cmap.input]
        gr.on([word.input, *at_once], h.inspect, [current, tab, word, *filters_in], inspect_out,
              trigger_mode="always_last", show_progress="minimal", **private)
        gr.on([cmp_word.input, *at_once], h.compare_maps, [comparison, cmp_word, *filters_in], compare_maps_out,
              trigger_mode="always_last", show_progress="minimal", **private)

        def redraw(event):
            (event.success(h.inspect, [current, tab, word, *filters_in], inspect_out, show_progress="minimal",
                           **private)
             .success(h.compare_maps, [comparison, cmp_word, *filters_in], compare_maps_out, **private))

        for moved, slider in (("from", step_from), ("to", step_to)):
            redraw(slider.release(functools.partial(h.step_range, moved), [current, step_from, step_to, head],
                                  [step_from, step_to, head], preprocess=False, queue=False,
                                  trigger_mode="always_last", **private))
        redraw(resolutions.input(h.ticked_layers, [current, resolutions], layers, queue=False,
                                 trigger_mode="always_last", **private))
        redraw(layers.input(h.ticked_resolutions, [current, layers], resolutions, queue=False,
                            trigger_mode="always_last", **private))
        # An edit's two images: the chips and maps follow the one chosen.
        redraw(which.input(h.switch, [current, which, word], [current, status, word, words, shown], queue=False,
                           **private))
        # Switching tabs draws what the new tab shows (the grid and the timeline are drawn only when on show).
        for tab_block, name in ((compare_tab, "other"), (history_tab, "other"), (mechanisms_tab_block, "other")):
            tab_block.select(_returns(name), None, tab, queue=False, **private)
        for tab_block, name in ((map_tab, "map"), (grid_tab, "grid"), (timeline_tab, "timeline")):
            (tab_block.select(_returns(name), None, tab, queue=False, **private)
             .then(h.inspect, [current, tab, word, *filters_in], inspect_out, show_progress="minimal", **private))
        gr.on([heat.select, overlay.select], h.read_value, [current, word, *filters_in], readout, **private)

        (gallery.select(h.pick, history, [current, image, bundle], **private)
         .success(h.show, [current, history, shown], show_out, **private)
         .success(h.inspect, [current, tab, word, *filters_in], inspect_out, **private))
        # An opened bundle also fills the Generate controls with the settings it recorded, the prompt first.
        (upload.upload(h.open_bundle, [upload, history], [current, history, image, bundle], **private)
         .success(h.show, [current, history, shown], show_out, **private)
         .success(h.restore_settings, current, settings_in, **private)
         .success(h.inspect, [current, tab, word, *filters_in], inspect_out, **private))

        (cmp_btn.click(h.prepare, None, None, queue=False, trigger_mode="once", **private)
         .then(h.compare, [*settings_in, baseline, history],
               [comparison, cmp_summary, img_a, img_b, img_diff, cmp_word, history, gallery], api_name="compare",
               concurrency_limit=1, concurrency_id="pipeline", show_progress_on=[img_a, img_b, img_diff])
         .success(h.compare_maps, [comparison, cmp_word, *filters_in], compare_maps_out, **private))

        inspect_tab_block.select(_returns("other"), None, tab, queue=False, **private)
        wire_inspect_tab(h, inspect_controls, current=current, history=history, image=image, words=words, bundle=bundle,
                         result_tabs=result_tabs, tab=tab, shown=shown, show_out=show_out,
                         inspect_in=[current, tab, word, *filters_in], inspect_out=inspect_out)
        gr.api(h.heatmap, api_name="heatmap")
        demo.unload(h.closed)
    return demo


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    """"user:password" -> ("user", "password")."""
    if not auth:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must look like user:password")
    return user, password


def launch(demo: gr.Blocks, **kwargs):
    """Queue and launch a demo with this app's queue limits, upload limit, theme and CSS (kwargs go to
    `Blocks.launch`)."""
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=INSPECT_CONCURRENCY)
    kwargs.setdefault("max_file_size", MAX_UPLOAD_BYTES)
    return demo.launch(theme=THEME, css=CSS, **kwargs)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def serve(host: str = "127.0.0.1", port: int = 7860, model: str | None = None, share: bool = False,
          auth: str | None = None, outputs: str | None = "outputs", allow_any_model: bool = False,
          device: str | None = None, dtype: str | None = None, offload: bool = False,
          service: AttentionService | None = None) -> int:
    """Run the web UI until interrupted (what `crossattn-sd serve` and `python app.py` call); `service`: one
    already built (then the model options are not used)."""
    if service is None:
        service = AttentionService.from_model(model, allow_any_model=allow_any_model, outputs=outputs or None,
                                              device=device, dtype=dtype, offload=offload)
    # SIGTERM (systemd, docker stop, kill) shuts down like Ctrl-C: Gradio closes the server, and the work folder
    # is removed at exit (Python's default SIGTERM ends the process without running any cleanup).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    demo = build_demo(service)
    try:
        launch(demo, server_name=host, server_port=port, share=share, auth=parse_auth(auth))
    except KeyboardInterrupt:  # before `launch` blocks (from then on Gradio catches it and closes the server)
        demo.close()
    finally:
        service.work.remove()
    return 0
