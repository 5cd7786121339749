"""The web UI: `build_demo(service)` lays out components and wires events; `serve(...)` runs it.

The only module that imports Gradio. The work is done by `service.AttentionService`; `Handlers` only turns
component values into the service's arguments and its results into component values, and turns the service's
`ValueError`s into `gr.Error` messages. Generation (the shared pipeline) runs one at a time through the queue;
inspection reads the session's stored maps and runs concurrently.

    python app.py                      # or: crossattn-sd serve
    from gradio_client import Client   # API: /generate, /heatmap, /compare (see the README)
"""

# No `from __future__ import annotations` here: Gradio reads a handler's return annotation unevaluated, and
# the /heatmap API documents its file output only if `FileData` is a class, not a string.
import functools
import html
from collections.abc import Callable

import gradio as gr
from gradio.data_classes import FileData

from .service import MAX_SEED, AttentionService, Comparison, Entry, GenerateRequest

QUEUE_SIZE = 32  # requests waiting beyond this are refused ("queue full") rather than piling up
INSPECT_CONCURRENCY = 4  # inspection handlers running at once; generation always runs one at a time
THEME = gr.themes.Soft(primary_hue="indigo", neutral_hue="slate",
                       font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
CSS = """
/* Small models make small images: scale them up to the frame (Gradio's default, scale-down, never
   enlarges), without blurring the map's cells. */
.pixelated img { image-rendering: pixelated; object-fit: contain !important; }
#title h1 { margin-bottom: 0; }
#colorbar .bar { height: 12px; border-radius: 3px; }
#colorbar .ends { display: flex; justify-content: space-between; font-size: 0.8em; opacity: 0.8; }
"""
GENERATE_HELP = {
    "default": "Diffusers' own attention: the baseline. Records no maps.",
    "capture": "Records every word's maps; exact mode gives the same image as Diffusers.",
    "reweight": "Scales the attention chosen words get (prompt-to-prompt re-weighting).",
    "edit": "Prompt-to-prompt editing: the edited prompt reuses the source's maps for the first steps.",
}


def _naming_range_errors(component: gr.components.Component) -> gr.components.Component:
    """`component`, whose out-of-range error names the input: Gradio's own check says only "Value 0 is less than
    minimum value 1". Wraps the instance's `preprocess` (Gradio calls it on the instance): a subclass would make
    Gradio's component metaclass write a `ui.pyi` stub next to this module at import."""
    preprocess = component.preprocess

    def named(payload):
        try:
            return preprocess(payload)
        except gr.Error as err:
            raise gr.Error(f"{component.label}: {err.message}", print_exception=False) from None

    component.preprocess = named
    return component


def Slider(*args, **kwargs) -> gr.Slider:  # noqa: N802 (stands in for the component class)
    return _naming_range_errors(gr.Slider(*args, **kwargs))


def Number(*args, **kwargs) -> gr.Number:  # noqa: N802
    return _naming_range_errors(gr.Number(*args, **kwargs))


def _user_errors(fn: Callable) -> Callable:
    """Show the service's ValueErrors (bad input) as Gradio error messages. A stopped generation is not an
    error: it leaves every output as it was (an error would cover the previous images) and says so."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, PermissionError, FileNotFoundError) as err:
            raise gr.Error(str(err), print_exception=False) from err
        except RuntimeError as err:
            from .pipeline import GenerationCancelled  # torch is loaded by now; not at import

            if isinstance(err, GenerationCancelled):
                gr.Warning("Stopped. Your previous results are kept.", title="Stopped")
                return gr.skip()  # one skip() leaves all of the event's outputs alone
            raise
    return wrapper


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

    @staticmethod
    def request(prompt, negative_prompt, seed, steps, guidance, width, height, scheduler, mode, processor, weights,
                edit_prompt, inject, per_step, processor_layers) -> GenerateRequest:
        return GenerateRequest(prompt=prompt or "", negative_prompt=negative_prompt or "",
                               seed=0 if seed is None else seed, steps=steps, guidance=guidance, width=width,
                               height=height, scheduler=scheduler, mode=mode, processor=processor,
                               weights=weights or "", edit_prompt=edit_prompt or "", inject=inject, per_step=per_step,
                               processor_layers=processor_layers or "*")

    @_user_errors
    def generate(self, prompt: str, negative_prompt: str = "", seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, width: int | None = None, height: int | None = None,
                 scheduler: str = "default", mode: str = "exact", processor: str = "capture", weights: str = "",
                 edit_prompt: str = "", inject: float = 0.8, per_step: bool | None = None,
                 processor_layers: str = "*", history=None, request: gr.Request = None, progress=gr.Progress()):
        """Generate an image and record every word's cross-attention maps.

        Returns the image, the prompt's words and a zip bundle (image.png, maps.npz, meta.json,
        attention.safetensors) that /heatmap reads.
        """
        req = self.request(prompt, negative_prompt, seed, steps, guidance, width, height, scheduler, mode,
                           processor, weights, edit_prompt, inject, per_step, processor_layers)
        entry = self.service.generate(req, session=_session(request), progress=_progress(progress))
        history = self.service.add_to_history(history, entry)
        return entry.image, entry.prompt_words, str(entry.bundle), entry, history

    @_user_errors
    def compare(self, prompt, negative_prompt, seed, steps, guidance, width, height, scheduler, mode, processor,
                weights, edit_prompt, inject, per_step, processor_layers="*", baseline: str = "capture", history=None,
                request: gr.Request = None, progress=gr.Progress()):
        """The same prompt and seed with a baseline processor (A) and the chosen processor (B)."""
        req = self.request(prompt, negative_prompt, seed, steps, guidance, width, height, scheduler, mode,
                           processor, weights, edit_prompt, inject, per_step, processor_layers)
        cmp = self.service.compare(req, baseline, session=_session(request), progress=_progress(progress))
        history = self.service.add_to_history(history, cmp.a, cmp.b)
        words = self.service.choices(cmp.b).words
        word = self.service.choices(cmp.b).default_word
        return (cmp, cmp.summary, cmp.a.image, cmp.b.image, cmp.difference,
                gr.update(choices=words, value=word), history, self.gallery(history))

    # -- showing an entry ------------------------------------------------------------------------------------

    @staticmethod
    def gallery(history):
        return [(str(e.image_path), e.caption) for e in history or []]

    def show(self, entry: Entry | None, history, shown: str | None):
        """Fill the word chips and filters with what the entry recorded (unless it is already on show: a
        stopped run or a click on the current entry keeps the chosen word and filters)."""
        if entry is None or str(entry.folder) == shown:
            return gr.skip()
        c = self.service.choices(entry)
        n = max(c.num_steps, 1)
        steps = dict(minimum=1, maximum=max(n, 2), interactive=c.has_steps)
        settings = {**entry.result.settings, "dropped_words": entry.dropped_words}
        return (
            self.service.describe(entry),
            gr.update(choices=c.words, value=c.default_word),
            gr.update(choices=c.layers, value=[name for _, name in c.layers]),
            gr.update(choices=c.resolutions, value=c.default_resolutions),
            gr.update(value=1, **steps),
            gr.update(value=n, **steps),
            gr.update(choices=["mean", *map(str, range(c.heads))], value="mean"),
            self.gallery(history),
            settings,
            "",
            entry.prompt_words,
            str(entry.folder),
        )

    @_user_errors
    def pick(self, history, evt: gr.SelectData):
        """A click on the session gallery makes that entry current."""
        entry = history[evt.index]
        return entry, entry.image, str(entry.bundle)

    @_user_errors
    def open_bundle(self, path: str, history):
        entry = self.service.open_bundle(path)
        history = self.service.add_to_history(history, entry)
        return entry, history, entry.image, str(entry.bundle)

    # -- inspection ------------------------------------------------------------------------------------------

    def filters(self, layers, resolutions, step_from, step_to, head, alpha, cmap):
        """UI filter values (steps counted from 1) -> `MapFilters` (steps counted from 0)."""
        return self.service.filters(layers, resolutions, int(step_from or 1) - 1, int(step_to or 0) - 1, head,
                                    alpha, cmap)

    @_user_errors
    def inspect(self, entry: Entry | None, tab: str, word, layers, resolutions, step_from, step_to, head, alpha,
                cmap):
        """Redraw the word's overlay, map and summary, and the all-words grid or the timeline only when its tab
        is on show (they take several times longer; selecting the tab draws them)."""
        if entry is None:
            return gr.skip()
        view = self.service.inspect(entry, word, self.filters(layers, resolutions, step_from, step_to, head, alpha,
                                                              cmap), grid=tab == "grid", timeline=tab == "timeline")
        grid = gr.skip()
        if tab == "grid":  # a file: Gradio would encode the large grid at a slower PNG level
            grid = None if view.grid is None else str(self.service.png_file(view.grid))
        frames, gif = gr.skip(), gr.skip()
        if tab == "timeline":
            frames = [(str(self.service.png_file(im)), caption) for im, caption in view.frames or []] or None
            gif = None if view.animation is None else str(view.animation)
        return view.overlay, view.heatmap, view.summary, colorbar_html(view.colorbar), grid, frames, gif

    @_user_errors
    def read_value(self, entry: Entry | None, word, layers, resolutions, step_from, step_to, head, alpha, cmap,
                   evt: gr.SelectData):
        if entry is None:
            return gr.skip()
        x, y = evt.index
        return self.service.value_at(entry, word, self.filters(layers, resolutions, step_from, step_to, head,
                                                               alpha, cmap), int(x), int(y))

    @_user_errors
    def compare_maps(self, cmp: Comparison | None, word, layers, resolutions, step_from, step_to, head, alpha, cmap):
        if cmp is None:
            return [gr.skip()] * 4
        return self.service.compare_maps(cmp, word, self.filters(layers, resolutions, step_from, step_to, head,
                                                                 alpha, cmap))

    @_user_errors
    def heatmap(self, bundle: FileData, word: str, layers: str = "", resolutions: str = "", step_from: int = 0,
                step_to: int = -1, head: int = -1, alpha: float = 0.5, cmap: str = "jet") -> FileData:
        """The overlay of one word's heat map for a map bundle from /generate.

        layers: comma-separated glob patterns of layer names ("*": every layer); resolutions: e.g. "16x16, 8x8";
        both "": the model's default view (the embedded model: its 16x16 layers); step_from/step_to: 0-based,
        inclusive (-1: last); head: one attention head (-1: mean of heads).
        """
        path = bundle["path"] if isinstance(bundle, dict) else getattr(bundle, "path", bundle)
        filters = self.service.filters(layers, resolutions, step_from, step_to, head, alpha, cmap)
        return FileData(path=str(self.service.heatmap_file(path, word, filters)))


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


def build_demo(service: AttentionService) -> gr.Blocks:
    """The UI for one service: a Generate column on the left, the result and its maps on the right."""
    d = service.defaults()
    h = Handlers(service)
    pixel = dict(type="pil", format="png", interactive=False, elem_classes="pixelated", height=240)
    # Gradio copies every image it sends into its cache; a server runs for weeks: drop copies a day old.
    with gr.Blocks(title="crossattn-sd", delete_cache=(3600, 86400)) as demo:
        current = gr.State(None)  # the Entry on show
        tab = gr.State("map")  # the result tab on show: "map", "grid", "timeline" or "other"
        shown = gr.State(None)  # the folder of the entry whose words and filters are on show
        history = gr.State([])  # this session's entries, newest first
        comparison = gr.State(None)
        gr.Markdown("# crossattn-sd\nSee where each word of your prompt went: per-word cross-attention maps of "
                    f"a Stable Diffusion model, recorded while it generates. Model: **{d.model}** — {d.description}.",
                    elem_id="title")
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=340):
                prompt = gr.Textbox(label="Prompt", lines=2, max_length=d.max_prompt_chars, elem_id="prompt",
                                    placeholder=d.examples[0] if d.examples else "describe the image")
                with gr.Row():
                    gen_btn = gr.Button("Generate", variant="primary", scale=3, elem_id="generate")
                    stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
                if d.examples:
                    gr.Examples([[e] for e in d.examples], inputs=[prompt], label="Example prompts")
                with gr.Accordion("Image settings", open=True):
                    with gr.Row(equal_height=True):
                        seed = Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, scale=4, elem_id="seed")
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
                    edit_prompt = gr.Textbox("", label="Edited prompt", visible=False,
                                             placeholder="the prompt with a word changed")
                    inject = Slider(0, 1, 0.8, step=0.05, label="Injection", visible=False,
                                       info="fraction of steps that reuse the source's maps")
                    processor_layers = gr.Textbox("*", label="Apply to layers", elem_id="processor-layers",
                                                  info="'*' for all; layer patterns such as 'up_blocks.*' or map "
                                                       "sizes such as '16', comma-separated")

            with gr.Column(scale=6, min_width=420):
                status = gr.Markdown("Generate an image, then click a word to see where it went.", elem_id="status")
                word = gr.Radio([], label="Word", info="click a word of the prompt", elem_id="word-chips")
                with gr.Tabs():
                    with gr.Tab("Heat map") as map_tab:
                        with gr.Row():
                            image = gr.Image(label="Image", elem_id="image", **pixel)
                            overlay = gr.Image(label="Overlay", elem_id="overlay", **pixel)
                            heat = gr.Image(label="Map", elem_id="map", **pixel)  # the summary says: click to read
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
                    with gr.Tab("History & export") as history_tab:
                        with gr.Row(equal_height=True):
                            bundle = gr.File(label="Map bundle: image.png, maps.npz, meta.json, attention.safetensors",
                                             interactive=False, elem_id="bundle", scale=3)
                            upload = gr.UploadButton("Open a bundle (.zip)", file_types=[".zip"], scale=1, elem_id="open-bundle")
                        gallery = gr.Gallery(label="This session (click to inspect)", columns=6, height=220,
                                             allow_preview=False, elem_id="history", elem_classes="pixelated")
                        with gr.Accordion("Words and settings", open=False):
                            words = gr.JSON(label="Words")
                            settings = gr.JSON(label="Settings")
                with gr.Accordion("Map filters", open=True):
                    with gr.Row():
                        layers = gr.CheckboxGroup([], label="Layers", scale=3)
                        resolutions = gr.CheckboxGroup([], label="Resolutions", scale=1)
                    with gr.Row():
                        step_from = Slider(1, 2, 1, step=1, label="From step", interactive=False)
                        step_to = Slider(1, 2, 2, step=1, label="To step", interactive=False)
                        head = gr.Dropdown(["mean"], value="mean", label="Heads", elem_id="heads")
                    with gr.Row():
                        alpha = Slider(0, 1, 0.5, step=0.05, label="Overlay opacity")
                        cmap = gr.Dropdown(list(d.cmaps), value=d.cmaps[0], label="Colour map")

        # -- wiring ------------------------------------------------------------------------------------------
        settings_in = [prompt, negative, seed, steps, guidance, width, height, scheduler, mode, processor, weights,
                       edit_prompt, inject, per_step, processor_layers]
        filters_in = [layers, resolutions, step_from, step_to, head, alpha, cmap]
        inspect_out = [overlay, heat, summary, colorbar, grid, frames, gif]
        show_out = [status, word, layers, resolutions, step_from, step_to, head, gallery, settings, readout, words,
                    shown]
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

        gr.on([word.input, *(c.input for c in filters_in)], h.inspect, [current, tab, word, *filters_in], inspect_out,
              trigger_mode="always_last", show_progress="minimal", **private)
        # Switching tabs draws what the new tab shows (the grid and the timeline are drawn only when on show).
        for tab_block, name in ((compare_tab, "other"), (history_tab, "other")):
            tab_block.select(_returns(name), None, tab, queue=False, **private)
        for tab_block, name in ((map_tab, "map"), (grid_tab, "grid"), (timeline_tab, "timeline")):
            (tab_block.select(_returns(name), None, tab, queue=False, **private)
             .then(h.inspect, [current, tab, word, *filters_in], inspect_out, show_progress="minimal", **private))
        gr.on([heat.select, overlay.select], h.read_value, [current, word, *filters_in], readout, **private)

        (gallery.select(h.pick, history, [current, image, bundle], **private)
         .success(h.show, [current, history, shown], show_out, **private)
         .success(h.inspect, [current, tab, word, *filters_in], inspect_out, **private))
        (upload.upload(h.open_bundle, [upload, history], [current, history, image, bundle], **private)
         .success(h.show, [current, history, shown], show_out, **private)
         .success(h.inspect, [current, tab, word, *filters_in], inspect_out, **private))

        compare_maps_out = [map_a, map_b, map_diff, cmp_note]
        (cmp_btn.click(h.prepare, None, None, queue=False, trigger_mode="once", **private)
         .then(h.compare, [*settings_in, baseline, history],
               [comparison, cmp_summary, img_a, img_b, img_diff, cmp_word, history, gallery], api_name="compare",
               concurrency_limit=1, concurrency_id="pipeline", show_progress_on=[img_a, img_b, img_diff])
         .success(h.compare_maps, [comparison, cmp_word, *filters_in], compare_maps_out, **private))
        gr.on([cmp_word.input, *(c.input for c in filters_in)], h.compare_maps, [comparison, cmp_word, *filters_in],
              compare_maps_out, trigger_mode="always_last", show_progress="minimal", **private)

        gr.api(h.heatmap, api_name="heatmap")
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
    """Queue and launch a demo with this app's queue limits, theme and CSS (kwargs go to `Blocks.launch`)."""
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=INSPECT_CONCURRENCY)
    return demo.launch(theme=THEME, css=CSS, **kwargs)


def serve(host: str = "127.0.0.1", port: int = 7860, model: str | None = None, share: bool = False,
          auth: str | None = None, outputs: str | None = "outputs", allow_any_model: bool = False,
          device: str | None = None, dtype: str | None = None, offload: bool = False) -> int:
    """Run the web UI until interrupted (what `crossattn-sd serve` and `python app.py` call)."""
    service = AttentionService.from_model(model, allow_any_model=allow_any_model, outputs=outputs or None,
                                          device=device, dtype=dtype, offload=offload)
    launch(build_demo(service), server_name=host, server_port=port, share=share, auth=parse_auth(auth))
    return 0
