"""Web UI latency: how long the Inspect panel takes to redraw when the user changes one control.

Generates one image with the UI's defaults (per-step maps on, as the UI has them for the embedded model), then
times `ui.Handlers.inspect`, the handler that every word chip, filter, opacity and colour-map change runs. It
reads the stored maps only (no diffusion) and returns the overlay, the map, the numeric summary and the colour
bar, plus the all-words grid or the timeline (frames and GIF) when their tab is on show. Timings include
encoding the returned images as PNG, which Gradio does before it sends them. Each change alternates between two
values, so every timed call really redraws. The issue's target: under 100 ms.

    python benchmarks/ui_latency.py                         # the embedded model
    python benchmarks/ui_latency.py --model /tmp/pipeline   # a Diffusers folder (copy one a trainer rewrites)
"""

import argparse
import io
import os
import statistics
import sys
import time

TARGET_MS = 100.0
TABS = {"map": "Heat map tab", "grid": "All words tab", "timeline": "Timeline tab"}  # Handlers.inspect's `tab`


def make_service(model: str):
    """The service the UI would run for `model`; a folder of the embedded model's shape gets its preset."""
    from crossattn_sd.config import EMBEDDED_MODEL_DIR, get_preset
    from crossattn_sd.pipeline import load_pipeline
    from crossattn_sd.service import AttentionService

    if model == "embedded":
        if not (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
            sys.exit(f"the embedded model is not installed ({EMBEDDED_MODEL_DIR}); pass --model PATH, e.g. a copy "
                     "of runs/tiny/pipeline")
        return AttentionService.from_model("tiny", device="cpu")
    pipe = load_pipeline(model, device="cpu")
    tiny = get_preset("tiny")
    if int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor) == tiny.height:  # e.g. a training export
        return AttentionService(tiny, pipe=pipe)
    return AttentionService.from_model(model, allow_any_model=True, pipe=pipe)


def png_bytes(values) -> int:
    """Encode every image among the handler's outputs as PNG, as Gradio's postprocessing does; total bytes."""
    from PIL import Image

    total = 0
    for value in values:
        images = [value] if isinstance(value, Image.Image) else [v[0] for v in value] if isinstance(value, list) else []
        for im in (im for im in images if isinstance(im, Image.Image)):  # files are written by the handler
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            total += buf.tell()
    return total


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options this script shares with screenshots.py: which model, prompt and seed to generate."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded",
                        help="'embedded' (default), a preset name or a local Diffusers folder")
    parser.add_argument("--prompt", default=None, help="prompt to generate (default: the preset's first example)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generation")
    return parser


def main(argv=None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per change")
    parser.add_argument("--no-per-step", action="store_true", help="generate without per-step maps (no timeline)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import torch

    from crossattn_sd.service import GenerateRequest
    from crossattn_sd.ui import Handlers

    torch.set_num_threads(args.threads)
    service = make_service(args.model)
    d = service.defaults()
    prompt = args.prompt or (d.examples[0] if d.examples else "a photo of a cat on a red sofa")
    start = time.perf_counter()
    entry = service.generate(GenerateRequest(prompt, seed=args.seed, steps=args.steps,
                                             per_step=not args.no_per_step))
    generated = time.perf_counter() - start
    handlers = Handlers(service)
    c = service.choices(entry)
    layers = [name for _, name in c.layers]
    n = max(c.num_steps, 1)
    base = dict(word=c.default_word, layers=layers, resolutions=c.resolutions, step_from=1, step_to=n, head="mean",
                alpha=0.5, cmap="jet")
    others = [w for w in c.words if w != c.default_word] or [c.default_word]
    # Each change: the control and its two alternating values.
    changes = {
        "word": ("word", [others[0], c.default_word]),
        "layers (up blocks only)": ("layers", [[l for l in layers if l.startswith("up")] or layers, layers]),
        "resolution (largest only)": ("resolutions", [c.resolutions[:1], c.resolutions]),
        "step range (second half)": ("step_from", [max(1, n // 2), 1]),
        "head (one head)": ("head", ["0" if c.heads else "mean", "mean"]),
        "alpha": ("alpha", [0.8, 0.5]),
        "colour map": ("cmap", ["viridis", "jet"]),
    }
    if not c.has_steps:
        del changes["step range (second half)"]

    def call(tab, values):
        return handlers.inspect(entry, tab, values["word"], values["layers"], values["resolutions"],
                                values["step_from"], values["step_to"], values["head"], values["alpha"], values["cmap"])

    for tab in TABS:
        call(tab, base)  # warm-up: colour maps, fonts
    rows = []
    for label, (key, alternatives) in changes.items():
        row = []
        for tab in TABS:
            wall_ms, cpu_ms = [], []
            values = dict(base)
            for i in range(args.repeats):
                values[key] = alternatives[i % 2]
                wall, cpu = time.perf_counter(), time.process_time()
                png_bytes(call(tab, values))
                wall_ms.append(1000 * (time.perf_counter() - wall))
                cpu_ms.append(1000 * (time.process_time() - cpu))
            row.append((statistics.median(wall_ms), statistics.median(cpu_ms)))
        rows.append((label, row))

    image = entry.image
    print(f"model: {args.model} · prompt: {prompt!r} · {image.width}x{image.height}, {entry.result.settings['steps']} "
          f"steps, {len(c.words)} words, {len(layers)} layers, per-step maps: {c.has_steps} · generation "
          f"{generated:.1f} s · torch threads {args.threads} · median of {args.repeats} calls")
    print(f"Redraw after one change, handler + PNG encoding, for each result tab on show: median wall ms (CPU ms of "
          f"this process; lower than wall when other jobs share the cores). Target < {TARGET_MS:.0f} ms.")
    print(f"{'change':28s}" + "".join(f"{name:>20s}" for name in TABS.values()))
    for label, row in rows:
        cells = "".join(f"{f'{wall:.1f} ({cpu:.1f})':>18s}{'  ' if wall < TARGET_MS else ' !'}" for wall, cpu in row)
        print(f"{label:28s}{cells}")
    print("! = over the target (wall time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
