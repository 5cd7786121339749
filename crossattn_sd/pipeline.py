"""Loading pipelines (embedded default, presets, local folders, Hub ids) and `generate(...)`.

`generate` is the one function the CLI, the web UI and the Python API share: it validates its input, runs a
Diffusers pipeline inside `capture()` (or a steering processor), and returns a `GenerationResult` that owns
the images, the prompt's word alignment and the recorded maps.
"""

from __future__ import annotations

import inspect
import json
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .config import (EMBEDDED, EMBEDDED_MODEL_DIR, EMBEDDED_PRESET, MAP_LAYERS, PACKAGE_DIR, PACKAGE_SOURCE,
                     GenerationDefaults, load_presets)
from .families import family_of
from .maps import DEFAULT_MAX_STEP_BYTES
from .processors import MODES
from .result import GenerationResult
from .concepts import check_concepts
from .tokens import VocabularyWarning, align_prompt, misaligned_words, vocabulary_note

# Scheduler names offered by the CLI and UI -> Diffusers class name (created from the model's own config).
SCHEDULERS = {
    "default": None,
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
}


class GenerationCancelled(RuntimeError):
    """Raised by `generate` when its `cancel` event was set; the pipeline's processors are restored."""


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1 or Path(model).exists()


def load_pipeline(model: str | None = None, *, device: str | None = None, dtype: torch.dtype | str | None = None,
                  offload: bool = False, allow_hub: bool = True):
    """Load a Diffusers text-to-image pipeline ready for `generate`.

    Args:
        model (`str`, *optional*): `None` or "embedded" for the embedded shapes-world model; a preset name from
            `crossattn_sd/configs/` (e.g. "sd15"); a local folder in Diffusers layout; or a Hugging Face Hub id.
        device (`str`, *optional*): "cuda", "mps" or "cpu"; default: the best available.
        dtype (`torch.dtype` or `str`, *optional*): default float16 on CUDA for real checkpoints, else float32.
        offload (`bool`): use accelerate's model CPU offload (CUDA only) to save GPU memory.
        allow_hub (`bool`): whether Hub ids may be loaded (the web UI turns this off unless allowed).

    Returns:
        A `DiffusionPipeline` with a `crossattn_defaults` attribute (steps, guidance, size for this model).
    """
    from transformers.utils import logging as transformers_logging

    # Diffusers' pipeline classes import CLIPImageProcessor (the safety checker's feature extractor), for
    # which transformers 5 warns that torchvision is missing: irrelevant here (no image processor runs).
    transformers_logging.get_logger("transformers.utils.import_utils").setLevel(transformers_logging.ERROR)
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # component-loading bars are noise in a CLI and a server log
    transformers_logging.disable_progress_bar()  # (transformers draws its own "Loading weights" bar)
    presets = load_presets()
    preset = None
    name = EMBEDDED if model is None else str(model)
    if name in presets:
        preset = presets[name]
        name = preset.source
    elif name == EMBEDDED:
        preset = presets[EMBEDDED_PRESET.name]  # configs/tiny.yaml
    packaged = name == EMBEDDED or name.startswith(PACKAGE_SOURCE)
    if packaged:
        source = EMBEDDED_MODEL_DIR if name == EMBEDDED else PACKAGE_DIR / name[len(PACKAGE_SOURCE):]
        if not (source / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the embedded model {name!r} is missing from this install ({source}); reinstall crossattn-sd, or "
                "train it with `crossattn-sd train-tiny` (README: The embedded model) and ship the export there"
            )
    elif _looks_like_path(name):
        source = Path(name).expanduser()
        if not source.exists():
            raise FileNotFoundError(f"model folder {str(source)!r} does not exist; pass an existing folder "
                                    "in Diffusers layout (with model_index.json), a preset name or a Hub id")
        if not (source / "model_index.json").is_file():
            raise FileNotFoundError(f"{str(source)!r} has no model_index.json; it is not a Diffusers pipeline "
                                    "folder (save one with pipe.save_pretrained(folder))")
    else:
        if not allow_hub and preset is None:  # presets are vetted; other Hub ids need permission
            raise PermissionError(f"loading Hub id {name!r} is not allowed here; start the server with "
                                  "--allow-any-model to allow it, or pick a preset")
        source = name

    device = device or default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.float16 if device == "cuda" and not packaged else torch.float32
    try:  # (`torch_dtype` is deprecated in 0.42)
        pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, **_absent_components(source))
    except OSError as err:
        if isinstance(source, str):
            raise OSError(
                f"could not load {source!r} from the Hugging Face Hub: it is not in the local cache and the Hub "
                f"could not be reached ({type(err).__name__}). On a machine with network run `hf download "
                f"{source}` (or load it once), then work offline with HF_HUB_OFFLINE=1; or pass a local folder."
            ) from err
        raise
    try:
        family_of(pipe)
    except ValueError as err:
        raise ValueError(f"{name!r}: {err}") from None
    if offload:
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.crossattn_defaults = GenerationDefaults.from_preset(preset) if preset else GenerationDefaults()
    pipe.crossattn_source = "embedded" if name == EMBEDDED else str(source)
    return pipe


def native_size(pipe) -> int:
    """The image side the model was made for: its denoiser's `sample_size` times the VAE factor."""
    return family_of(pipe).native_latent_size() * int(getattr(pipe, "vae_scale_factor", 8))


def _absent_components(source) -> dict:
    """Components a local pipeline folder was saved without (null in its model_index.json, e.g. an SD3 pipeline
    without T5): Diffusers loads such a folder only when they are passed as None."""
    index = Path(source) / "model_index.json"
    if not index.is_file():
        return {}
    entries = json.loads(index.read_text())
    return {k: None for k, v in entries.items() if isinstance(v, list) and len(v) == 2 and v[0] is None}


def size_multiple(pipe) -> int:
    """Height and width must be multiples of this: the VAE factor, and 8 (Diffusers' pipelines check it)."""
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    return factor * 8 // math.gcd(factor, 8)


def schedulers_for(pipe) -> list[str]:
    """The names in `SCHEDULERS` that can sample `pipe`'s model: all of them, except that a model trained on a
    zero-terminal-SNR schedule (like the embedded one) needs a scheduler that supports `rescale_betas_zero_snr`."""
    if not pipe.scheduler.config.get("rescale_betas_zero_snr"):
        return list(SCHEDULERS)
    import diffusers

    return [n for n, c in SCHEDULERS.items()
            if c is None or "rescale_betas_zero_snr" in inspect.signature(getattr(diffusers, c).__init__).parameters]


def _make_scheduler(pipe, name: str | None):
    if name is None or SCHEDULERS.get(name) is None:
        if name is not None and name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)}")
        return None
    import diffusers

    # PNDM as Stable Diffusion configures it (PLMS only): its Runge-Kutta warm-up fails below 4 steps and costs
    # 4 UNet calls a step, and a config from another scheduler would turn it on.
    extra = {"skip_prk_steps": True} if name == "pndm" else {}
    cls = getattr(diffusers, SCHEDULERS[name])
    if name not in schedulers_for(pipe):
        # the model was trained to start from pure noise (SNR 0 at t=T); this scheduler would start elsewhere
        raise ValueError(f"scheduler {name!r} cannot follow this model's zero-terminal-SNR noise schedule; "
                         f"use one of {', '.join(schedulers_for(pipe))}")
    return cls.from_config(pipe.scheduler.config, **extra)


def _check_int(name: str, value, low: int, high: int | None = None, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name}={value} is out of range; use a value {rng}{hint}")
    return value


def generate(
    pipe,
    prompt: str | Sequence[str],
    *,
    negative_prompt: str | Sequence[str] | None = None,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    mode: str = "exact",
    per_step: bool = False,
    num_images_per_prompt: int = 1,
    scheduler: str | None = None,
    layers: str | Sequence[str] = "*",
    keep_heads: bool = False,
    max_step_bytes: int = DEFAULT_MAX_STEP_BYTES,
    processor=None,
    map_layers: str | None = None,
    text_part: str | None = None,
    max_sequence_length: int | None = None,
    concepts: Sequence[str] | None = None,
    concept_kind: str | None = None,
    concept_template: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> GenerationResult:
    """Generate images and record every word's cross-attention maps.

    Args:
        pipe: a Diffusers pipeline of a supported family (SD 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1), e.g. from
            `load_pipeline()`.
        prompt (`str` or list of `str`): the prompt(s); an empty prompt is allowed (it has no words).
        negative_prompt (`str` or list, *optional*): what to steer away from (only with guidance > 1).
        seed (`int`): seed of the initial noise (drawn on the CPU, so it is the same image on any device).
        steps (`int`, *optional*): denoising steps; default from the model's preset.
        guidance_scale (`float`, *optional*): classifier-free guidance; <= 1 turns it off.
        height, width (`int`, *optional*): image size, multiples of `size_multiple(pipe)`.
        mode (`str`): "exact" (images bit-identical to Diffusers' default processor) or "explicit".
        per_step (`bool`): also keep per-step maps (timestep ranges, timelines).
        num_images_per_prompt (`int`): images per prompt.
        scheduler (`str`, *optional*): one of `SCHEDULERS`; default keeps the pipeline's own.
        layers (`str` or list): the cross-attention layers to record: glob patterns of layer names
            ("up_blocks.*") or map resolutions ("16": longer side 16; "16x12": exact size).
        keep_heads (`bool`): also keep per-head maps.
        max_step_bytes (`int`): memory budget for per-step maps.
        processor (`ProcessorSpec`, *optional*): a steering processor (see `steering.py`); default: capture.
            The edit processor returns two images, [source, edit], for one source prompt.
        map_layers (`str`, *optional*): the result's default map view, "all" (every layer) or "finest" (the
            largest map size); default from the model's preset.
        text_part (`str`, *optional*): which encoder's text positions the words index where a model has
            several in one sequence (SD3: "t5" when the pipeline has T5, else "clip"); default the first.
        max_sequence_length (`int`, *optional*): SD3's T5 length; default the preset's, else the pipeline's (256).
        concepts (list of `str`, *optional*): words to map that need not be in the prompt, one word each
            (`result.concepts`, `result.heatmap(concept)`); the images are bit-identical to the call without them.
        concept_kind (`str`, *optional*): the result's default concept map kind (UNet: "joint" or
            "concepts-only"; SD3: "output" or "attention"); default the family's (see the README).
        concept_template (`str`, *optional*): the text each concept is encoded in, "{}" standing for it (only the
            concept's own tokens are kept); default `concepts.DEFAULT_TEMPLATE`.
        progress (callable, *optional*): called as `progress(step, total)` after each denoising step.
        cancel (`threading.Event`, *optional*): set it to stop; `GenerationCancelled` is raised.

    Returns:
        `GenerationResult`
    """
    from .steering import ProcessorSpec, use_processor

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a string or a non-empty list of strings")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        negative_prompt = list(negative_prompt)
        if len(negative_prompt) != len(prompts):
            raise ValueError(f"got {len(negative_prompt)} negative prompts for {len(prompts)} prompts; give one "
                             "per prompt, or a single string")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    defaults = getattr(pipe, "crossattn_defaults", None) or GenerationDefaults()
    map_layers = defaults.map_layers if map_layers is None else map_layers
    if map_layers not in MAP_LAYERS:
        raise ValueError(f"map_layers={map_layers!r} is not a map view; use one of {', '.join(MAP_LAYERS)}")
    family = family_of(pipe)
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    native = native_size(pipe)
    parts = family.text_parts(pipe)
    text_part = parts[0] if text_part is None else text_part
    if text_part not in parts:
        raise ValueError(f"text_part={text_part!r} is not a text part of this model; use one of {', '.join(parts)}")
    if max_sequence_length is None:
        max_sequence_length = defaults.max_sequence_length  # tiny-mmdit: 0 (no T5, so no zero tokens)
    if max_sequence_length is not None:
        max_sequence_length = _check_int("max_sequence_length", max_sequence_length, 0, 512)
    steps = _check_int("steps", defaults.steps if steps is None else steps, 1, 1000)
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    num_images_per_prompt = _check_int("num_images_per_prompt", num_images_per_prompt, 1, 64)
    guidance_scale = float(defaults.guidance if guidance_scale is None else guidance_scale)
    if not math.isfinite(guidance_scale) or not 0 <= guidance_scale <= 100:
        raise ValueError(f"guidance_scale={guidance_scale} is out of range; use a value between 0 and 100")
    multiple = size_multiple(pipe)
    hint = f" that is a multiple of {multiple}"
    height = _check_int("height", (defaults.height or native) if height is None else height, multiple, 8192, hint)
    width = _check_int("width", (defaults.width or native) if width is None else width, multiple, 8192, hint)
    for name, value in (("height", height), ("width", width)):
        if value % multiple:
            lo = value // multiple * multiple
            raise ValueError(f"{name}={value} is not a multiple of {multiple} (the VAE factor and the pipeline "
                             f"require it); use {max(lo, multiple)} or {lo + multiple}")
    spec = processor if processor is not None else ProcessorSpec("capture", mode=mode)
    concepts = check_concepts(concepts, defaults.vocabulary)  # before anything runs
    new_scheduler = _make_scheduler(pipe, scheduler)

    note = vocabulary_note(spec.result_prompts(prompts), defaults.vocabulary)
    if note:
        warnings.warn(note, VocabularyWarning, stacklevel=2)

    def align(p: str):
        return family.text_positions(pipe, p, text_part, max_sequence_length)

    alignments = [align(p) for p in spec.result_prompts(prompts)]
    if text_part == "clip" and getattr(pipe, "tokenizer_2", None) is not None:
        for a in alignments:  # SDXL, SD3: CLIP positions are keyed by the first tokenizer's
            moved = misaligned_words(a, align_prompt(pipe.tokenizer_2, a.prompt))
            if moved:
                warnings.warn(f"the two CLIP tokenizers put {', '.join(map(repr, moved))} at different positions in "
                              f"{a.prompt!r}, so those words' maps mix neighbouring tokens; runs of '!' cause this "
                              "(write '!' once)", RuntimeWarning, stacklevel=2)
    alignments = [a for a in alignments for _ in range(num_images_per_prompt)]  # one per image

    def on_step_end(p, i, t, callback_kwargs):
        if progress is not None:
            progress(i + 1, p.num_timesteps)  # not `steps`: PNDM (SD 1.5's default) takes steps + 1
        if cancel is not None and cancel.is_set():
            p._interrupt = True
        return callback_kwargs

    generator = torch.Generator(device="cpu").manual_seed(seed)
    if spec.name == "edit":  # source and edit each draw the noise a plain call would (the pipeline's own way)
        generator = [generator, torch.Generator(device="cpu").manual_seed(seed)]
    call_prompts, call_negative = spec.batch_prompts(prompts, negative_prompt)
    old_scheduler = pipe.scheduler
    try:
        if new_scheduler is not None:
            pipe.scheduler = new_scheduler
        with use_processor(pipe, spec, prompts=prompts, steps=steps, per_step=per_step, keep_heads=keep_heads,
                           max_step_bytes=max_step_bytes, layers=layers,
                           num_images_per_prompt=num_images_per_prompt,
                           latent_size=(height // factor, width // factor), alignment=align, concepts=concepts,
                           concept_kind=concept_kind, concept_template=concept_template) as store:
            out = pipe(
                prompt=call_prompts, **_negative(pipe, call_negative), num_inference_steps=steps,
                guidance_scale=guidance_scale, height=height, width=width,
                num_images_per_prompt=num_images_per_prompt, generator=generator,
                callback_on_step_end=on_step_end, **family.pipeline_kwargs(pipe, max_sequence_length),
            )
    finally:
        pipe.scheduler = old_scheduler
    if cancel is not None and cancel.is_set():
        raise GenerationCancelled("generation was cancelled")
    images = list(out.images)
    settings = dict(
        prompt=prompts[0] if isinstance(prompt, str) else prompts,
        edit_source_prompt=prompts[0] if spec.name == "edit" else None,
        negative_prompt=negative_prompt, seed=seed, steps=steps, guidance_scale=guidance_scale,
        height=height, width=width, mode=spec.mode, per_step=per_step,
        num_images_per_prompt=num_images_per_prompt, scheduler=scheduler or "default",
        scheduler_class=type(new_scheduler or old_scheduler).__name__, layers=layers, keep_heads=keep_heads,
        processor=spec.to_dict(), model=getattr(pipe, "crossattn_source", None) or pipe.config.get("_name_or_path"),
        map_layers=map_layers, family=family.name, text_part=text_part, text_parts=parts, concepts=concepts,
        concept_kind=None if store.concepts is None else store.concepts.default_kind,
        concept_template=None if store.concepts is None else store.concepts.template,
        **family.pipeline_kwargs(pipe, max_sequence_length),
    )
    return GenerationResult(images=images, alignments=alignments, store=store, settings=settings)


def _negative(pipe, negative_prompt) -> dict:
    """The pipeline call's `negative_prompt` argument; pipelines without one (FLUX.2) refuse a non-empty one."""
    import inspect

    if "negative_prompt" in inspect.signature(type(pipe).__call__).parameters:
        return {"negative_prompt": negative_prompt}
    given = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt or [])
    if any(given):
        raise ValueError(f"{type(pipe).__name__} takes no negative prompt; leave negative_prompt empty")
    return {}
