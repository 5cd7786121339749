"""The web UI's Mechanisms tab: the Generate column's prompt and seed on the four embedded models side by side.

Laid out by `mechanisms_tab(mechanisms, prompt, seed)` inside `ui.build_demo`; the work is `mechanisms.Mechanisms`
(no Gradio there). Each model gets a column: its image, its map of the chosen word (or, for tiny-film, the reason it
has none) and the pixel judge's verdict per object.
"""

# No `from __future__ import annotations`: Gradio reads handlers' annotations unevaluated (see ui.py).
import html

import gradio as gr

from .mechanisms import MECHANISMS, Mechanisms, Panel

INTRO = ("The same prompt and seed on the four embedded shapes-world models: cross-attention taught where to look "
         "(`tiny`), cross-attention learned from images alone (`tiny-untaught`), joint attention (`tiny-mmdit`) and "
         "FiLM, which has no attention (`tiny-film`). Each image is checked by the pixel judge; each attention model "
         "shows its map of the word below (default: the first object's shape). The models load on first use.")


def panel_markdown(p: Panel) -> str:
    """A model's caption: its name and mechanism, the judge's verdict per object, its time, and any note."""
    verdict = "\n".join(f"- {html.escape(line)}" for line in p.verdict_text().splitlines())
    note = f"\n\n*{html.escape(p.note)}*" if p.note else ""
    return f"**{p.model}**: {p.mechanism} ({p.seconds:.2f} s)\n\n{verdict}{note}"


def mechanisms_tab(mechanisms: Mechanisms, prompt: gr.Textbox, seed: gr.Number) -> None:
    """The tab's components and events (call inside a `gr.Tab`): `prompt` and `seed` are the Generate column's."""
    from .ui import _user_errors, enlarged  # ui imports this module at its top: import back at build time

    gr.Markdown(INTRO)
    with gr.Row(equal_height=True):
        word = gr.Textbox(label="Word", placeholder="circle", scale=3, elem_id="mech-word",
                          info="the word whose map each attention model shows (empty: the first object's shape)")
        run_btn = gr.Button("Run on the four models", variant="primary", scale=1, elem_id="mech-run")
    pixel = dict(type="pil", format="png", interactive=False, elem_classes="pixelated", height=180, buttons=[])
    outputs = []
    with gr.Row(equal_height=False):
        for i, model in enumerate(mechanisms.models):
            with gr.Column(min_width=160, elem_id=f"mech-{model}"):
                image = gr.Image(label=f"{model}: image", elem_id=f"mech-image-{i}", **pixel)
                heat = gr.Image(label=f"{model}: word map", elem_id=f"mech-map-{i}", **pixel)
                text = gr.Markdown(f"**{model}**: {html.escape(MECHANISMS.get(model, ''))}", elem_id=f"mech-text-{i}")
                outputs += [image, heat, text]

    @_user_errors
    def run(prompt_text: str, seed_value, word_text: str):
        panels = mechanisms.run(prompt_text, seed=int(seed_value or 0), word=word_text)
        values = []
        for p in panels:
            values += [enlarged(p.image), enlarged(p.overlay()) if p.heatmap is not None else None, panel_markdown(p)]
        return values

    run_btn.click(run, [prompt, seed, word], outputs, concurrency_limit=1, concurrency_id="mechanisms",
                  api_visibility="private")
    word.submit(run, [prompt, seed, word], outputs, concurrency_limit=1, concurrency_id="mechanisms",
                api_visibility="private")

