"""The web UI's Inspect-an-image tab: an uploaded image's caption words (and concepts) mapped on it.

Laid out by `inspect_tab(defaults)` and wired by `wire_inspect_tab(handlers, controls, ...)` inside
`ui.build_demo`; the work is `service.AttentionService.inspect_image` and `inspect.inspect_image` (no Gradio
there). The result opens on the Heat map tab with the usual filters, overlays and export.
"""

# No `from __future__ import annotations`: Gradio reads handlers' annotations unevaluated (see ui.py).
import math
from dataclasses import dataclass

import gradio as gr

from .service import MAX_SEED
from .ui_components import Number, Slider


@dataclass
class InspectControls:
    """The components of the Inspect-an-image tab."""

    file: gr.File
    preview: gr.Image
    prompt: gr.Textbox
    concepts: gr.Textbox
    t: gr.Slider
    passes: gr.Slider
    seed: gr.Number
    fit: gr.Radio
    button: gr.Button

    @property
    def inputs(self) -> list:
        return [self.file, self.prompt, self.concepts, self.t, self.passes, self.seed, self.fit]


def inspect_tab(d) -> InspectControls:
    """Lay out the Inspect-an-image tab: an upload, its caption and concepts, the noise level, passes, seed, fit."""
    from .inspect import MAX_PIXELS

    gr.Markdown("Upload an image you have and type its caption: each word's map is drawn on *your* image (no new "
                "image is made). The image is encoded by the model's VAE, noised to time **t** and denoised once per "
                f"pass with the caption. At most {MAX_PIXELS:,} pixels ({math.isqrt(MAX_PIXELS)} × "
                f"{math.isqrt(MAX_PIXELS)}); transparency is put on white, an animation gives its first frame. The "
                "filters, overlays and export below work as for a generated image.")
    with gr.Row(equal_height=True):
        file = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="inspect-file", scale=1)
        preview = gr.Image(label="As inspected", type="pil", format="png", interactive=False, height=200,
                           elem_classes="pixelated", elem_id="inspect-preview", scale=1)
    prompt = gr.Textbox(label="Caption", lines=2, max_length=d.max_prompt_chars, elem_id="inspect-prompt",
                        placeholder=d.examples[0] if d.examples else "describe the image")
    concepts = gr.Textbox("", label="Concepts", elem_id="inspect-concepts",
                          placeholder="words not in the caption, comma-separated, e.g. triangle, background")
    with gr.Row():
        t = Slider(0.01, 1, 0.5, step=0.01, label="Noise level t", elem_id="inspect-t",
                   info="in (0, 1]: 1 is pure noise; lower keeps more of the image")
        passes = Slider(1, 8, 1, step=1, label="Passes", elem_id="inspect-passes",
                        info="denoiser calls on fresh noise, averaged")
    with gr.Row(equal_height=True):
        seed = Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="inspect-seed")
        fit = gr.Radio(["resize", "crop"], value="resize", label="Fit to the model's size", elem_id="inspect-fit",
                       info="resize the whole image, or take its centred crop; maps are shown on the original")
    button = gr.Button("Inspect", variant="primary", elem_id="inspect-run")
    return InspectControls(file, preview, prompt, concepts, t, passes, seed, fit, button)


def wire_inspect_tab(h, c: InspectControls, *, current, history, image, words, bundle, result_tabs, tab,
                     shown, show_out, inspect_in, inspect_out) -> None:
    """The tab's events (`h`: the UI's `ui.Handlers`): an upload shows its preview (or why it cannot be read); Inspect runs on the pipeline's
    slot, then shows the words, filters and maps of the new entry on the Heat map tab, as Generate does."""
    private = dict(api_visibility="private")
    c.file.upload(h.preview, c.file, c.preview, **private)
    c.file.clear(lambda: None, None, c.preview, queue=False, **private)
    (c.button.click(h.prepare, None, None, queue=False, trigger_mode="once", **private)
     .then(h.inspect_upload, [*c.inputs, history], [image, words, bundle, current, history], api_name="inspect_image",
           concurrency_limit=1, concurrency_id="pipeline", show_progress_on=[c.button])
     .success(lambda: (gr.Tabs(selected="map"), "map"), None, [result_tabs, tab], queue=False, **private)
     .success(h.show, [current, history, shown], show_out, **private)
     .success(h.inspect, inspect_in, inspect_out, **private))
