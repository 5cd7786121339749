"""crossattn-sd: generate images and see where each word of the prompt went.

Subcommands: generate, inspect, compare, batch, mechanisms, serve, train-tiny, eval-tiny, eval-seg, presets. Run
`crossattn-sd SUBCOMMAND --help`.
A thin argparse layer over the same functions the web UI calls.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

from .config import EMBEDDED_PRESET
from .names import safe_name


def _add_run_options(p: argparse.ArgumentParser, *, device_default: str) -> None:
    """The options of one generation that `generate`, `compare` and `batch` share (batch: every row's defaults)."""
    p.add_argument("--model", default=None, help="preset name (see `crossattn-sd presets`), local Diffusers "
                   "folder, or Hub id; default: the embedded shapes-world model")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (used when guidance > 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model preset's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: preset's)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: preset's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: preset's)")
    p.add_argument("--scheduler", default="default", help="scheduler: default, dpm++, euler, euler-a, ddim, unipc, pndm")
    p.add_argument("--mode", default="exact", choices=("exact", "explicit"),
                   help="capture mode: exact (images identical to Diffusers) or explicit (probs @ V)")
    p.add_argument("--processor", default="capture", choices=("default", "capture", "reweight", "edit", "uniform"),
                   help="attention processor on the cross-attention layers (uniform: each pixel gets the mean of "
                        "the text values on the chosen --layers; UNet models)")
    p.add_argument("--weights", default="", help="reweight: word:weight pairs, e.g. 'circle:2.0, red:0.5'")
    p.add_argument("--edit-prompt", default=None, help="edit: the edited prompt (same seed, source maps injected)")
    p.add_argument("--inject", type=float, default=0.8, help="edit: fraction of steps that use the source's maps")
    p.add_argument("--layers", default="*", help="cross-attention layers the processor goes on, comma-separated: "
                   "glob patterns of layer names ('up_blocks.*') or map resolutions ('16': longer side 16, '16x12')")
    p.add_argument("--per-step", action="store_true", help="also keep per-step maps (timelines, step ranges)")
    p.add_argument("--concept", dest="concepts", action="append", default=None, metavar="WORD",
                   help="also map this word, which need not be in the prompt (repeatable; one word each); the image "
                   "is the same as without it")
    p.add_argument("--concept-kind", default=None, choices=("joint", "concepts-only", "output", "attention"),
                   help="the concept maps written as maps.npz and overlays: UNet joint (softmax over the prompt and "
                   "the concepts) or concepts-only; SD3 output (ConceptAttention) or attention (default: the "
                   "model's)")
    p.add_argument("--per-step-tokens", default="prompt", choices=("prompt", "all"),
                   help="per-step maps keep the prompt's own token columns (start, words, end) or all (with padding)")
    p.add_argument("--per-step-dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="dtype of per-step maps (float16: half the memory)")
    p.add_argument("--per-step-by", default="layer", choices=("layer", "resolution"),
                   help="one per-step map per layer, or per resolution (its layers summed: for long timelines)")
    p.add_argument("--device", default=None, help=f"cuda, mps or cpu (default: {device_default})")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="model dtype (default: float16 on CUDA for real checkpoints, else float32)")
    p.add_argument("--offload", action="store_true", help="model CPU offload via accelerate (saves GPU memory)")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the text prompt (quote it)")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if needed)")
    _add_run_options(p, device_default="best available")
    p.add_argument("--word", action="append", default=None, metavar="W",
                   help="write overlays for this word (or --concept) only (repeatable); default: every word")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity, 0..1")
    p.add_argument("--cmap", default="jet", help="matplotlib colour map for overlays")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", type=Path, help="prompt file: .txt (one prompt a line), .jsonl or .csv with columns "
                   "prompt, negative_prompt, seed, steps, guidance, height, width, scheduler, mode, processor, "
                   "weights, edit_prompt, inject, layers, per_step, per_step_tokens, per_step_dtype, per_step_by, "
                   "concepts, concept_kind (the options below are every row's defaults)")
    p.add_argument("--out", required=True, type=Path, help="output folder: a bundle folder per row and index.jsonl "
                   "(a rerun into the same folder skips finished rows)")
    _add_run_options(p, device_default="this process's accelerate device")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: torch's or "
                   "accelerate's choice); files are identical across runs at the same thread count")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", type=Path, help="the image file (PNG, JPEG, WebP, GIF, BMP, TIFF; at most 2048 x 2048 "
                   "pixels; transparency on white, an animation's first frame)")
    p.add_argument("--prompt", required=True, help="the caption whose words are mapped (quote it)")
    p.add_argument("--concept", action="append", default=[], metavar="WORD",
                   help="also map this word, which need not be in the caption (repeatable): overlay-concept-<word>.png")
    p.add_argument("--concept-kind", default=None, choices=("joint", "concepts-only", "output", "attention"),
                   help="the concept maps written: UNet joint or concepts-only; SD3 output (ConceptAttention) or "
                        "attention (default: the model's default kind)")
    p.add_argument("--t", type=float, default=0.5, help="noise level in (0, 1]: 1 is pure noise")
    p.add_argument("--passes", type=int, default=1, help="denoiser calls on fresh noise, averaged (1..32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--fit", default="resize", choices=("resize", "crop"),
                   help="how the image is brought to the model's size: resize it whole, or take its centred crop "
                        "(maps are drawn on the original either way)")
    p.add_argument("--height", type=int, default=None, help="the height the model sees (default: preset's)")
    p.add_argument("--width", type=int, default=None, help="the width the model sees (default: preset's)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <image name>-maps next to it)")
    p.add_argument("--model", default=None, help="preset name, local Diffusers folder, or Hub id; default: the "
                   "embedded shapes-world model")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="model dtype (default: float16 on CUDA for real checkpoints, else float32)")
    p.add_argument("--word", action="append", default=None, metavar="W",
                   help="write overlays for this word only (repeatable); default: every word")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity, 0..1")
    p.add_argument("--cmap", default="jet", help="matplotlib colour map for overlays")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the help text already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser(serve_prog: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; `serve_prog` names the `serve` command in its usage line (app.py: "python app.py")."""
    fmt = HelpFormatter
    parser = argparse.ArgumentParser(prog="crossattn-sd", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate an image and write image.png, maps.npz, meta.json, overlays",
                         description="Generate an image and write image.png (settings in its PNG text chunk), "
                         "maps.npz (one float32 (H, W) map per word), meta.json, attention.safetensors and "
                         "overlay-<word>.png per word.", formatter_class=fmt)
    _add_generation_args(gen)

    ins = sub.add_parser("inspect", help="maps of an image you have: each word of its caption on the image",
                         description="Map each word of a caption on an existing image (no image is generated): the "
                         "image is VAE-encoded, noised to time --t and denoised once per pass with the caption inside "
                         "capture; writes the bundle generate writes (image.png is the image), overlay-<word>.png "
                         "per word.", formatter_class=fmt)
    _add_inspect_args(ins)

    cmp = sub.add_parser("compare", help="two processors, same prompt and seed: both images and their difference",
                         description="Generate the same prompt and seed with two processors (A: --processor-a, "
                         "B: the generation flags) and write a/, b/, compare.png and difference.png.",
                         formatter_class=fmt)
    _add_generation_args(cmp)
    cmp.add_argument("--processor-a", default="capture", choices=("default", "capture"),
                     help="the baseline processor A (the web UI's Compare tab defaults to capture too)")

    serve = sub.add_parser("serve", help="run the web UI", formatter_class=fmt,
                           **({"prog": serve_prog} if serve_prog else {}))
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    serve.add_argument("--port", type=int, default=7860, help="port")
    serve.add_argument("--model", default=EMBEDDED_PRESET.name, help="model preset name (see `crossattn-sd presets`)")
    serve.add_argument("--share", action="store_true", help="create a public Gradio share link")
    serve.add_argument("--auth", default=None, help="user:password required to use the UI")
    serve.add_argument("--outputs", default="outputs", help="save every generation here ('' to disable)")
    serve.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    serve.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                       help="model dtype (default: float16 on CUDA for real checkpoints, else float32)")
    serve.add_argument("--offload", action="store_true", help="model CPU offload via accelerate (saves GPU memory)")
    serve.add_argument("--allow-any-model", action="store_true",
                       help="let --model be any local folder or Hub id, not only a preset")

    train = sub.add_parser("train-tiny", help="train an embedded shapes-world model (--model unet or mmdit)",
                           add_help=False)
    train.add_argument("args", nargs=argparse.REMAINDER, help="see `crossattn-sd train-tiny --help`")
    ev = sub.add_parser("eval-tiny", help="evaluate the embedded model on held-out captions", add_help=False)
    ev.add_argument("args", nargs=argparse.REMAINDER, help="see `crossattn-sd eval-tiny --help`")
    seg = sub.add_parser("eval-seg", help="zero-shot segmentation of rendered and generated shapes-world images",
                         add_help=False)
    seg.add_argument("args", nargs=argparse.REMAINDER, help="see `crossattn-sd eval-seg --help`")
    sub.add_parser("presets", help="list the model presets in crossattn_sd/configs/", formatter_class=fmt)
    batch = sub.add_parser("batch", help="generate every prompt of a file: a bundle folder per row and an index",
                           description="Generate every row of a prompt file into a bundle folder each (image.png, "
                           "maps.npz, meta.json, attention.safetensors) and index.jsonl (status, words, files, "
                           "timings, errors). Resumable; under `accelerate launch -m crossattn_sd batch ...` the rows "
                           "are split between the processes.", formatter_class=fmt)
    _add_batch_args(batch)
    mech = sub.add_parser("mechanisms", help="the same prompt and seed on the four embedded models (cross-attention, "
                          "untaught cross-attention, joint attention, FiLM): images, verdicts and a word's maps",
                          description="Generate the prompt with one seed on tiny, tiny-untaught, tiny-mmdit and "
                          "tiny-film; write each image, each attention model's map of the chosen word, "
                          "mechanisms.png (side by side) and mechanisms.json (the judge's verdict per object, seconds, "
                          "notes).", formatter_class=fmt)
    mech.add_argument("prompt", help="a caption of the shapes world, e.g. 'a red circle on the left and a blue square "
                      "on the right' (others are drawn but not judged)")
    mech.add_argument("--out", required=True, type=Path, help="output folder (created if needed)")
    mech.add_argument("--seed", type=int, default=0, help="seed of the initial noise, the same for every model")
    mech.add_argument("--word", default=None, help="the word whose maps are shown (default: the first object's shape)")
    mech.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser


def _spec(args):
    from .steering import ProcessorSpec, parse_weights

    return ProcessorSpec(args.processor, mode=args.mode, weights=parse_weights(args.weights),
                         edit_prompt=args.edit_prompt, inject=args.inject, layers=args.layers)


# Options that only one processor reads: given with another, they would be ignored without a word.
_PROCESSOR_OPTIONS = {"weights": ("reweight", "--weights"), "edit_prompt": ("edit", "--edit-prompt")}


def check_generation_args(args):
    """The run's ProcessorSpec; refuses bad generation arguments before the model loads (ValueError naming the
    flag and the fix).

    What depends on the model (size multiples, scheduler compatibility, words of the prompt) is checked by
    `generate` once it has loaded; everything else fails here, in a second instead of after the load."""
    if not args.prompt.strip():
        raise ValueError("the prompt is empty; type what the image should show, e.g. 'a red circle on the left'")
    for name, (processor, flag) in _PROCESSOR_OPTIONS.items():
        if getattr(args, name) and args.processor != processor:
            raise ValueError(f"{flag} applies to --processor {processor} only (got --processor {args.processor}); "
                             f"add --processor {processor} or drop {flag}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"steps={args.steps} is out of range; use a value >= 1")
    if not 0 <= args.alpha <= 1:
        raise ValueError(f"alpha={args.alpha} is out of range; use 0..1")
    from .overlay import CMAPS
    from .pipeline import SCHEDULERS

    if args.cmap not in CMAPS:
        raise ValueError(f"unknown --cmap {args.cmap!r}; use one of {', '.join(CMAPS)}")
    if args.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown --scheduler {args.scheduler!r}; use one of {', '.join(SCHEDULERS)}")
    from .concepts import check_concepts

    check_concepts(args.concepts, _preset_vocabulary(args))  # an empty, repeated or unknown --concept
    if args.concepts and args.processor == "default":
        raise ValueError("--concept needs maps; the default processor records none (use --processor capture)")
    return _spec(args)  # the ProcessorSpec; refuses bad weights, a missing edit prompt, inject out of range


def _progress(quiet: bool):
    if quiet:
        return None, None
    from tqdm.auto import tqdm

    bar = tqdm(total=None, desc="denoising", unit="step", file=sys.stderr)

    def update(step: int, total: int):
        bar.total = total
        bar.n = step
        bar.refresh()

    return update, bar


def _has_word(alignment, word: str) -> bool:
    try:
        return bool(alignment.indices_of(word))
    except ValueError:
        return False


def write_outputs(result, out: Path, words=None, alpha: float = 0.5, cmap: str = "jet") -> list[Path]:
    """Save the result and an overlay per chosen word and image; returns the overlay paths.

    The first image's overlays are overlay-<word>.png, image i's (e.g. an edit's edited image) overlay-<i>-<word>.png;
    each image gets the chosen words its own prompt has (default: all of them).
    """
    from .overlay import blend

    result.save(out)
    if not result.store.sums:
        return []
    paths = []
    for i, alignment in enumerate(result.alignments):
        own = list(dict.fromkeys(w.lower() for w in alignment.word_texts))
        for word in own if not words else [w for w in words if _has_word(alignment, w)]:
            path = out / (f"overlay-{safe_name(word)}.png" if i == 0 else f"overlay-{i}-{safe_name(word)}.png")
            blend(result.images[i], result.heatmap(word, image_index=i), alpha, cmap).save(path)
            paths.append(path)
        for concept, m in result.concept_maps(i).items():  # the result's default concept kind
            if words and concept.lower() not in (w.lower() for w in words):
                continue
            name = f"overlay-concept-{safe_name(concept)}.png"
            path = out / (name if i == 0 else name.replace("overlay-", f"overlay-{i}-", 1))
            blend(result.images[i], m, alpha, cmap).save(path)
            paths.append(path)
    return paths


@contextlib.contextmanager
def _library_truncation_notes_off():
    """Diffusers and transformers each log their own note when a prompt is cut at the tokenizer's limit; the
    CLI names the dropped words itself, in words rather than sub-tokens, so their notes are held back."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    saved = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(saved[0])
        transformers_logging.set_verbosity(saved[1])


def _preset_vocabulary(args) -> tuple[str, ...]:
    """The closed vocabulary of the preset --model names (the embedded models'), else ()."""
    from .config import EMBEDDED, load_presets

    preset = load_presets().get(EMBEDDED_PRESET.name if args.model in (None, EMBEDDED) else args.model)
    return preset.vocabulary if preset else ()


def _vocabulary_note(args) -> None:
    """Name the prompt's words a closed-vocabulary preset never saw, before its model loads."""
    from .config import EMBEDDED, load_presets
    from .tokens import vocabulary_note

    presets = load_presets()
    preset = presets.get(EMBEDDED_PRESET.name if args.model in (None, EMBEDDED) else args.model)
    note = preset and vocabulary_note([args.prompt, args.edit_prompt], preset.vocabulary)
    if note:
        print(f"note: {note}", file=sys.stderr)


def _run_generate(args, spec, pipe=None):
    from .pipeline import generate, load_pipeline
    from .tokens import VocabularyWarning

    if pipe is None:
        _vocabulary_note(args)
        pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, offload=args.offload)
    progress, bar = _progress(args.quiet)
    try:
        with _library_truncation_notes_off(), warnings.catch_warnings():
            warnings.simplefilter("ignore", VocabularyWarning)  # said before the model loaded
            # the dropped words are reported once, by cmd_generate
            result = generate(pipe, args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                              steps=args.steps, guidance_scale=args.guidance, height=args.height, width=args.width,
                              scheduler=None if args.scheduler == "default" else args.scheduler,
                              per_step=args.per_step, per_step_tokens=args.per_step_tokens,
                              per_step_dtype=args.per_step_dtype, per_step_by=args.per_step_by, processor=spec,
                              progress=progress, concepts=args.concepts if spec.name != "default" else None,
                              concept_kind=args.concept_kind)
    finally:
        if bar is not None:
            bar.close()
    return pipe, result


def cmd_generate(args) -> int:
    _, result = _run_generate(args, check_generation_args(args))
    for w in args.word or ():  # validate before writing anything (an edit's word may be in either prompt)
        if not any(_has_word(a, w) for a in result.alignments) and w.lower() not in map(str.lower, result.concepts):
            result.alignments[0].indices_of(w)  # raises ValueError naming the word and the prompt's words
    overlays = write_outputs(result, args.out, args.word, args.alpha, args.cmap)
    print(f"wrote {args.out}/image.png, maps.npz, meta.json, attention.safetensors and {len(overlays)} overlay(s)")
    if result.dropped_words:
        print(f"note: the tokenizer's length limit dropped: {' '.join(result.dropped_words)}", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    from .inspect import check_inspect_args, inspect_image, load_image
    from .overlay import CMAPS

    from .concepts import check_concepts

    check_inspect_args(args.prompt, args.t, args.passes, args.fit)  # before the model loads
    check_concepts(args.concept, _preset_vocabulary(args))
    if not 0 <= args.alpha <= 1:
        raise ValueError(f"alpha={args.alpha} is out of range; use 0..1")
    if args.cmap not in CMAPS:
        raise ValueError(f"unknown --cmap {args.cmap!r}; use one of {', '.join(CMAPS)}")
    image = load_image(args.image) if args.image.is_file() else None
    if image is None:
        raise ValueError(f"image file {str(args.image)!r} does not exist" if not args.image.exists()
                         else f"{args.image} is not a file; give an image file")
    _vocabulary_note(argparse.Namespace(model=args.model, prompt=args.prompt, edit_prompt=None))
    from .pipeline import load_pipeline
    from .tokens import VocabularyWarning

    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    with _library_truncation_notes_off(), warnings.catch_warnings():
        warnings.simplefilter("ignore", VocabularyWarning)  # said before the model loaded
        result = inspect_image(pipe, image, args.prompt, concepts=args.concept, t=args.t, passes=args.passes,
                               seed=args.seed, fit=args.fit, height=args.height, width=args.width,
                               concept_kind=args.concept_kind)
    for w in args.word or ():  # a word of the caption or a concept
        if not _has_word(result.alignments[0], w) and w.lower() not in map(str.lower, result.concepts):
            result.alignments[0].indices_of(w)  # raises ValueError naming the word and the prompt's words
    out = args.out or args.image.with_name(f"{args.image.stem}-maps")
    overlays = write_outputs(result, out, args.word, args.alpha, args.cmap)
    print(f"wrote {out}/image.png (the image), maps.npz, meta.json, attention.safetensors and {len(overlays)} "
          "overlay(s)")
    if result.dropped_words:
        print(f"note: the tokenizer's length limit dropped: {' '.join(result.dropped_words)}", file=sys.stderr)
    return 0


def cmd_compare(args) -> int:
    import numpy as np
    from PIL import Image

    from .overlay import captioned
    from .steering import ProcessorSpec

    spec_b = check_generation_args(args)
    spec_a = ProcessorSpec(args.processor_a, mode=args.mode)
    pipe, res_a = _run_generate(args, spec_a)
    _, res_b = _run_generate(args, spec_b, pipe)  # one load for both runs
    write_outputs(res_a, args.out / "a", args.word, args.alpha, args.cmap)
    write_outputs(res_b, args.out / "b", args.word, args.alpha, args.cmap)
    image_a, image_b = res_a.images[0], res_b.images[-1]  # an edit returns [source, edit]: compare the edit
    a = np.asarray(image_a, dtype=np.int16)
    b = np.asarray(image_b, dtype=np.int16)
    diff = np.abs(a - b).max(axis=-1)
    scale = 255.0 / max(1, diff.max())
    diff_img = Image.fromarray((diff * scale).astype(np.uint8)).convert("RGB")
    diff_img.save(args.out / "difference.png")
    tiles = [captioned(image_a, f"A: {spec_a.name}", 3), captioned(image_b, f"B: {spec_b.name}", 3),
             captioned(diff_img, f"|A-B| (max {int(diff.max())})", 3)]
    sheet = Image.new("RGB", (sum(t.width for t in tiles), tiles[0].height), "white")
    x = 0
    for t in tiles:
        sheet.paste(t, (x, 0))
        x += t.width
    sheet.save(args.out / "compare.png")
    summary = {"a": spec_a.to_dict(), "b": spec_b.to_dict(), "max_abs_pixel_difference": int(diff.max()),
               "mean_abs_pixel_difference": float(np.abs(a - b).mean())}
    (args.out / "compare.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}/compare.png (max pixel difference {int(diff.max())})")
    return 0


def cmd_serve(args) -> int:
    from .ui import serve

    return serve(host=args.host, port=args.port, model=args.model, share=args.share, auth=args.auth,
                 outputs=args.outputs or None, allow_any_model=args.allow_any_model, device=args.device,
                 dtype=args.dtype, offload=args.offload)


def cmd_batch(args) -> int:
    from .batch import COLUMNS, process_state, read_rows, run_batch, summary_text

    defaults = {c: getattr(args, c) for c in COLUMNS if c != "prompt"}
    defaults["concepts"] = ", ".join(args.concepts or ())  # every row's concepts (a row's column replaces them)
    rows = read_rows(args.prompts, defaults)  # before any loading
    cpu = True if args.device == "cpu" else None
    state = process_state(cpu)  # first: accelerate may set the thread count of CPU processes
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    def load(device: str):
        from .pipeline import load_pipeline

        return load_pipeline(args.model, device=args.device or device, dtype=args.dtype, offload=args.offload)

    index = run_batch(rows, args.out, load, model=args.model, cpu=cpu, progress=not args.quiet)
    if state.is_main_process:
        print(summary_text(index, args.out))
    return 0  # failed rows are data (in the index), not a failed run: launchers report a non-zero exit as a crash


def cmd_mechanisms(args) -> int:
    import torch

    from .mechanisms import Mechanisms, save

    if args.threads:
        torch.set_num_threads(args.threads)
    panels = Mechanisms().run(args.prompt, seed=args.seed, word=args.word)
    save(panels, args.out, args.prompt, args.seed)
    for p in panels:
        verdict = p.verdict_text().replace("\n", "; ")
        shown = f"map of {p.word!r}: {args.out / f'{p.model}-{p.word}.png'}" if p.heatmap is not None else p.note
        print(f"{p.model} ({p.mechanism}), {p.seconds:.2f} s\n  {verdict}\n  {shown}")
    print(f"side by side: {args.out / 'mechanisms.png'}")
    return 0


def cmd_presets(args) -> int:
    from .config import load_presets

    for name, preset in load_presets().items():
        print(f"{name:14s} {preset.source:48s} {preset.description}")
    return 0


def main(argv: list[str] | None = None, serve_prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train-tiny":
        from .tiny.train import main as train_main

        return train_main(argv[1:])
    if argv and argv[0] == "eval-tiny":
        from .tiny.evaluate import main as eval_main

        return eval_main(argv[1:])
    if argv and argv[0] == "eval-seg":
        from .tiny.segment import main as seg_main

        return seg_main(argv[1:])
    args = build_parser(serve_prog).parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    commands = {"generate": cmd_generate, "inspect": cmd_inspect, "compare": cmd_compare, "serve": cmd_serve,
                "presets": cmd_presets, "batch": cmd_batch, "mechanisms": cmd_mechanisms}
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, PermissionError, OSError) as err:
        print(f"crossattn-sd: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
