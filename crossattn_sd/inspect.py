"""Inspecting an image the model did not make: `inspect_image(pipe, image, prompt)` and `load_image(file)`.

The image is VAE-encoded with the pipeline's own image processor and VAE (latents scaled and shifted as the
pipeline's img2img counterpart does), noised to time `t` with the pipeline's own noise schedule, and the denoiser
runs once per pass on the caption inside `capture()`, through the model's family adapter (`Family.text_conditioning`
and `Family.denoise`), so the maps are recorded by the same processors and store as a generation's. Passes draw
fresh noise from one seeded generator and the store averages them. No image is generated: the result holds the
uploaded image, and its maps are drawn over it at its own size.

Classifier-free guidance is not used: guidance mixes two predictions after the attention ran, and the
unconditional half's attention (to the empty prompt) is never recorded anyway, so one conditional call per pass
records exactly the maps a guided step would record, at half the cost.

The model takes a size it can denoise (default: its preset's generation size; `height`/`width` pick another
multiple of `size_multiple(pipe)`). `fit="resize"` scales the whole image to it (the aspect may change; the maps are
stretched back over the whole image); `fit="crop"` takes the largest centred region of that aspect and scales it
(the maps cover that region; the rest of the image has no map: 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .families import family_of
from .maps import DEFAULT_MAX_STEP_BYTES, MapStore
from .processors import MODES, concept_maps, install
from .result import GenerationResult

MAX_PIXELS = 2048 * 2048  # larger images are refused: every word's map is drawn at the image's own size
MAX_PASSES = 32
FITS = ("resize", "crop")
FORMATS = "PNG, JPEG, WebP, GIF, BMP or TIFF"


def load_image(source, *, name: str | None = None) -> Image.Image:
    """An image file (a path or a binary file object), a PIL image or a uint8 array as the 8-bit RGB image that is
    inspected.

    Conversions (each documented, none silent about failure): transparency (RGBA, LA, a palette with a
    transparent colour) is composited on white; CMYK and other colour modes are converted to RGB by PIL;
    16-bit and 32-bit grey images are scaled to 8 bits (PIL's own conversion would clip them to white); an
    animated image (GIF, APNG, WebP) gives its first frame; a photo's EXIF orientation is applied.

    Raises:
        ValueError: not an image PIL can read, an empty image, or more than `MAX_PIXELS` pixels (one line naming
            the file by its base name and the limit).
    """
    from PIL import ImageOps, UnidentifiedImageError

    label = name or (Path(source).name if isinstance(source, (str, Path)) else "the image")
    if isinstance(source, np.ndarray):  # (H, W) or (H, W, 3 or 4) uint8, e.g. the shapes world's `render`
        source = Image.fromarray(source)
    if isinstance(source, Image.Image):
        _check_size(source.size, label)
        return _to_rgb(source)
    try:
        with Image.open(source) as im:
            _check_size(im.size, label)  # before decoding: a small file may declare a huge image
            im.seek(0)  # an animation's first frame
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im))
    except UnidentifiedImageError:
        raise ValueError(f"{label} is not an image this app can read; upload a {FORMATS} file") from None
    except Image.DecompressionBombError:
        raise ValueError(f"{label} is too large; the limit is {MAX_PIXELS:,} pixels "
                         f"({math.isqrt(MAX_PIXELS)} x {math.isqrt(MAX_PIXELS)}); downscale it first") from None
    except (OSError, SyntaxError, EOFError) as err:  # a truncated or corrupt file of a known format
        why = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise ValueError(f"{label} cannot be read as an image ({why}); upload a complete {FORMATS} file") from None


def _check_size(size: tuple[int, int], label: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"{label} is empty ({width}x{height} pixels); upload an image with something in it")
    if width * height > MAX_PIXELS:
        raise ValueError(f"{label} is {width}x{height} = {width * height:,} pixels; the limit is {MAX_PIXELS:,} "
                         f"({math.isqrt(MAX_PIXELS)} x {math.isqrt(MAX_PIXELS)}); downscale it first")


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB: transparency on white, high bit depths scaled (see `load_image`)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        if im.mode == "F" and a.max() <= 1.0:
            top = 1.0  # a float image in [0, 1]
        grey = np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def model_view(size: tuple[int, int], target: tuple[int, int], fit: str) -> tuple[int, int, int, int]:
    """The region (top, left, height, width) of an image of `size` (H, W) that the model sees at `target` (h, w):
    the whole image ("resize"), or the largest centred region of the target's aspect ("crop")."""
    if fit not in FITS:
        raise ValueError(f"fit={fit!r} is not a fit; use one of {', '.join(FITS)}")
    height, width = size
    if fit == "resize":
        return 0, 0, height, width
    h, w = target
    if width * h > height * w:  # wider than the target: crop the sides
        cw = max(1, min(width, round(height * w / h)))
        return 0, (width - cw) // 2, height, cw
    ch = max(1, min(height, round(width * h / w)))
    return (height - ch) // 2, 0, ch, width


def noised(pipe, latents: torch.Tensor, t: float, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`latents` noised to time `t` by the pipeline's noise schedule, and the timestep the denoiser is given.

    Flow matching (a scheduler with `scale_noise`: SD3, FLUX): x_t = (1 - t) x_0 + t noise, timestep
    t x num_train_timesteps (`scale_noise` on a copy of the scheduler without its sampling shift, so t is the flow's
    own time). DDPM-style schedules (`alphas_cumprod`: SD, SDXL, the embedded model): the forward process
    sqrt(a_k) x_0 + sqrt(1 - a_k) noise at timestep k = round(t x (num_train_timesteps - 1)), by `DDPMScheduler.
    add_noise` on the pipeline scheduler's config (the same betas, zero-terminal-SNR rescaling included; a
    multistep sampler's own `add_noise` only takes timesteps of its inference schedule)."""
    scheduler = pipe.scheduler
    if hasattr(scheduler, "scale_noise"):
        flow = type(scheduler).from_config(scheduler.config, shift=1.0, use_dynamic_shifting=False,
                                           shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
                                           use_beta_sigmas=False, invert_sigmas=False)
        flow.set_timesteps(sigmas=[float(t)], device=latents.device)
        timestep = flow.timesteps[:1]
        return flow.scale_noise(latents, timestep, noise), timestep
    if getattr(scheduler, "alphas_cumprod", None) is not None:
        from diffusers import DDPMScheduler

        ddpm = DDPMScheduler.from_config(scheduler.config)
        timestep = torch.tensor([round(float(t) * (ddpm.config.num_train_timesteps - 1))], device=latents.device)
        return ddpm.add_noise(latents, noise, timestep), timestep
    raise ValueError(f"cannot noise an image with {type(scheduler).__name__}: it has neither scale_noise (flow "
                     "matching) nor alphas_cumprod (DDPM-style)")


def encode_image(pipe, image: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int]) -> torch.Tensor:
    """The VAE latents (1, C, h, w) of the `box` (top, left, height, width) of `image` at `size` (H, W), with the
    pipeline's image processor and VAE: the mean of the latent distribution (deterministic), scaled as the
    pipeline's img2img does: (latents - shift_factor) x scaling_factor (shift 0 unless the VAE has one: SD3)."""
    top, left, h, w = box
    x = pipe.image_processor.preprocess(image, height=size[0], width=size[1],
                                        crops_coords=(left, top, left + w, top + h))
    vae = pipe.vae
    x = x.to(device=vae.device, dtype=vae.dtype)
    latents = vae.encode(x).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def check_inspect_args(prompt, t, passes, fit) -> tuple[float, int]:
    """Refuse a bad prompt, `t`, `passes` or `fit` (ValueError naming the value and the fix); returns (t, passes)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty; describe the image, e.g. 'a red circle on the left'")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 < t <= 1:
        raise ValueError(f"t={t!r} is out of range; use a noise level in (0, 1], e.g. 0.5 (1 is pure noise)")
    if isinstance(passes, bool) or not isinstance(passes, (int, float)) or int(passes) != passes \
            or not 1 <= passes <= MAX_PASSES:
        raise ValueError(f"passes={passes!r} is out of range; use a whole number 1..{MAX_PASSES}")
    if fit not in FITS:
        raise ValueError(f"fit={fit!r} is not a fit; use one of {', '.join(FITS)}")
    return float(t), int(passes)


@torch.no_grad()
def inspect_image(pipe, image, prompt: str, *, concepts: Sequence[str] = (), t: float = 0.5, passes: int = 1,
                  seed: int = 0, fit: str = "resize", height: int | None = None, width: int | None = None,
                  mode: str = "exact", layers: str | Sequence[str] = "*", per_step: bool = False,
                  keep_heads: bool = False, max_step_bytes: int = DEFAULT_MAX_STEP_BYTES, map_layers: str | None = None,
                  text_part: str | None = None, max_sequence_length: int | None = None, concept_kind: str | None = None,
                  concept_template: str | None = None) -> GenerationResult:
    """Where each word of a caption lands on an image the model did not make (see the module docstring).

    Args:
        pipe: a pipeline of a family with `text_conditioning` (the UNet family: SD 1.x/2.x, SDXL, the embedded
            model; SD3/SD3.5 and tiny-mmdit), e.g. from `load_pipeline()`.
        image: a PIL image, or an image file (path or binary file object), read by `load_image`.
        prompt (`str`): the caption whose words are mapped.
        concepts (list of `str`): words to map that need not be in the caption, one word each
            (`result.heatmap(concept)`, as in `generate`); they do not change the denoiser's call.
        t (`float`): the noise level, in (0, 1]: 1 is pure noise (nothing of the image is left), small values
            keep the image almost intact. 0.5 by default.
        passes (`int`): denoiser calls, each on fresh noise; their maps are averaged (1..32).
        seed (`int`): seed of the noise (drawn on the CPU, so the same on every device).
        fit (`str`): "resize" (the whole image, stretched to the model's size) or "crop" (the centred region of
            the model's aspect); the maps are drawn on the original image either way.
        height, width (`int`, *optional*): the size the model sees; default the preset's generation size.
        mode, layers, per_step, keep_heads, max_step_bytes, map_layers, text_part, max_sequence_length,
            concept_kind, concept_template: as in `generate` (per_step keeps each pass's maps).

    Returns:
        `GenerationResult` whose image is the (RGB) uploaded image; `settings["inspect"]` records t, the timestep,
        the passes, the fit, the image's size and the box the model saw (`result.map_box()`).
    """
    from .concepts import check_concepts
    from .config import MAP_LAYERS, GenerationDefaults
    from .pipeline import _check_int, native_size, size_multiple

    t, passes = check_inspect_args(prompt, t, passes, fit)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    family = family_of(pipe)
    defaults = getattr(pipe, "crossattn_defaults", None) or GenerationDefaults()
    concepts = check_concepts(concepts, defaults.vocabulary)  # before anything runs
    image = load_image(image)
    map_layers = defaults.map_layers if map_layers is None else map_layers
    if map_layers not in MAP_LAYERS:
        raise ValueError(f"map_layers={map_layers!r} is not a map view; use one of {', '.join(MAP_LAYERS)}")
    multiple, native = size_multiple(pipe), native_size(pipe)
    hint = f" that is a multiple of {multiple}"
    height = _check_int("height", (defaults.height or native) if height is None else height, multiple, 8192, hint)
    width = _check_int("width", (defaults.width or native) if width is None else width, multiple, 8192, hint)
    for name, value in (("height", height), ("width", width)):
        if value % multiple:
            raise ValueError(f"{name}={value} is not a multiple of {multiple}; use {value // multiple * multiple or multiple}")
    parts = family.text_parts(pipe)
    text_part = parts[0] if text_part is None else text_part
    if text_part not in parts:
        raise ValueError(f"text_part={text_part!r} is not a text part of this model; use one of {', '.join(parts)}")
    if max_sequence_length is None:
        max_sequence_length = defaults.max_sequence_length
    try:
        conditioning = family.text_conditioning(pipe, prompt, (height, width), max_sequence_length)
    except NotImplementedError as err:
        raise ValueError(str(err)) from None
    alignment = family.text_positions(pipe, prompt, text_part, max_sequence_length)

    box = model_view((image.height, image.width), (height, width), fit)
    latents = encode_image(pipe, image, (height, width), box).to(family.model.dtype)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    timestep = None
    # capture()'s pieces with an all-conditional batch: capture(pipe) would ask the pipeline whether its last call
    # used guidance, and this call is not the pipeline's
    store = MapStore(per_step=per_step, keep_heads=keep_heads, max_step_bytes=max_step_bytes, cfg=False)
    factory = lambda s, layer, original: family.processor(s, layer, mode, original)  # noqa: E731
    with concept_maps(pipe, family, store, concepts, concept_kind, concept_template), \
            install(family, store, factory, layers, tuple(latents.shape[-2:])):
        for _ in range(passes):
            noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
            noisy, timestep = noised(pipe, latents, t, noise.to(latents.device, latents.dtype))
            family.denoise(noisy.to(family.model.dtype), timestep.expand(latents.shape[0]), conditioning)
    scheduler = pipe.scheduler
    settings = dict(
        prompt=prompt, negative_prompt=None, seed=seed, steps=passes, guidance_scale=1.0, height=height,
        width=width, mode=mode, per_step=per_step, num_images_per_prompt=1, scheduler="default",
        scheduler_class=type(scheduler).__name__, layers=layers, keep_heads=keep_heads,
        processor={"name": "capture", "mode": mode, "weights": [], "edit_prompt": None, "inject": 0.8, "layers": "*"},
        model=getattr(pipe, "crossattn_source", None) or pipe.config.get("_name_or_path"), map_layers=map_layers,
        family=family.name, text_part=text_part, text_parts=parts, concepts=concepts,
        concept_kind=None if store.concepts is None else store.concepts.default_kind,
        concept_template=None if store.concepts is None else store.concepts.template,
        **family.pipeline_kwargs(pipe, max_sequence_length),
        inspect=dict(t=t, timestep=float(timestep[0]), passes=passes, fit=fit, image_size=[image.height, image.width],
                     box=list(box)),
    )
    return GenerationResult(images=[image], alignments=[alignment], store=store, settings=settings)

