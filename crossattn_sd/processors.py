"""Installing the recording processors, and `capture()`: maps of everything a pipeline generates in a block.

The per-architecture facts (which layers see text, where their image tokens sit, where a step begins, which
processor records them) come from the model's family adapter (`crossattn_sd.families`); this module names no
architecture. Each family's processor computes the layer's output exactly as Diffusers' own processor does
("exact" mode, bit-identical images) or spelled out as probs @ V ("explicit" mode, for steering and training),
plus one call that hands the attention to a `MapStore`.

Processors are installed and restored only through Diffusers' public API (`attn_processors`,
`set_attn_processor` with every key filled); layers that see no text keep whatever processor they had.
"""

from __future__ import annotations

import fnmatch
import inspect
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch

from .families import MODES, Family, Recorder, family_of, is_pipeline
from .families.unet import CaptureProcessor, layer_hw  # noqa: F401  (the UNet's processor, importable here)
from .maps import DEFAULT_MAX_STEP_BYTES, MapStore


def cross_attention_layers(model) -> list[str]:
    """Names of the text-conditioned attention layers of a pipeline's denoiser (or a bare model), in forward
    order: a UNet's cross-attention `attn2` layers, SD3's joint `attn` layers."""
    return family_of(model).layers()


def layer_sizes(model, latent_size: tuple[int, int] | int | None = None,
                names: Iterable[str] | None = None) -> dict[str, tuple[int, int]]:
    """Map size (h, w) of each text-attention layer for a latent of `latent_size` (default: the model's
    `sample_size`), from the model's family (a UNet's levels, a transformer's patch grid)."""
    return family_of(model).layer_sizes(latent_size, None if names is None else list(names))


_RESOLUTION = re.compile(r"^(\d+)(?:x(\d+))?$")


def match_layers(names: Iterable[str], layers: str | Iterable[str] = "*",
                 sizes: dict[str, tuple[int, int]] | None = None) -> list[str]:
    """The names matching any of one or several selectors: glob patterns over layer names ("*" for all,
    "up_blocks.*", ...) or map resolutions ("16" matches a map whose longer side is 16, "16x12" an exact
    h x w), read from `sizes` (see `layer_sizes`)."""
    selectors = [layers] if isinstance(layers, str) else list(layers)
    names = list(names)
    chosen = set()
    for sel in selectors:
        res = _RESOLUTION.match(sel.strip())
        if res is None:
            chosen.update(n for n in names if fnmatch.fnmatchcase(n, sel.strip()))
            continue
        if sizes is None:
            raise ValueError(f"layer selector {sel!r} is a resolution, but the layers' map sizes are unknown here; "
                             "use glob patterns of layer names such as 'up_blocks.*'")
        a, b = int(res.group(1)), res.group(2)
        chosen.update(n for n in names if n in sizes
                      and (sizes[n] == (a, int(b)) if b is not None else max(sizes[n]) == a))
    return [n for n in names if n in chosen]


ProcessorFactory = Callable[..., object]  # (store, layer) or (store, layer, original)


@contextmanager
def install(model, store: MapStore, factory: ProcessorFactory, layers: str | Iterable[str] = "*",
            latent_size: tuple[int, int] | int | None = None) -> Iterator[MapStore]:
    """Install `factory(store, layer)` (or `factory(store, layer, original)`, given the layer's processor
    before installing) on the text-attention layers `layers` selects (glob patterns or resolutions, see
    `match_layers`; resolutions are those of a `latent_size` latent, default the model's `sample_size`);
    restore the originals on exit, also after an error.

    `model` is a denoiser (UNet, transformer), a pipeline, or a family adapter (`families.family_of`) whose
    processors the factory makes (per-call state such as Flux's text length lives in it). Every key of `attn_processors` is filled in one
    `set_attn_processor` call: unmatched layers keep their processor. A forward pre-hook on the model tells the
    store where each model evaluation starts, with the latent size (maps are reshaped from it, so non-square
    images work) and the timestep; the store places each layer's tokens on the grid the family gives.
    A model that already has this package's processors installed is refused (nesting would adopt them as the
    "originals").
    """
    family = model if isinstance(model, Family) else family_of(model)  # the per-call adapter
    model = family.model
    family.latent_hint = family.latent_hw(latent_size)
    originals = dict(model.attn_processors)
    nested = [k for k, p in originals.items() if isinstance(p, Recorder)]
    if nested:
        raise RuntimeError(f"crossattn-sd processors are already installed on this {type(model).__name__} "
                           f"({nested[0].removesuffix('.processor')}, ...); finish the first capture() block before "
                           "starting another")
    text_layers = family.layers(originals)
    selectors = [layers] if isinstance(layers, str) else list(layers)
    by_size = any(_RESOLUTION.match(sel.strip()) for sel in selectors)
    sizes = family.layer_sizes(latent_size, text_layers) if by_size else None  # a model walk only when needed
    chosen = set(match_layers(text_layers, layers, sizes))
    if not chosen:
        sizes = sizes or family.layer_sizes(latent_size, text_layers)
        example = repr(text_layers[0]) if text_layers else f"(this {type(model).__name__} has none)"
        found = sorted({f"{h}x{w}" for h, w in sizes.values()}, key=lambda r: -int(r.split("x")[0]))
        shown = layers if isinstance(layers, str) else ", ".join(layers)
        raise ValueError(f"layers={shown!r} matches no {family.layer_kind} layer; names look like {example} and "
                         f"map sizes are {', '.join(found) or '(none)'} (use glob patterns such as '*' or "
                         f"'{text_layers[0].split('.')[0] if text_layers else 'up_blocks'}.*', or resolutions "
                         "such as '16')")
    with_original = _takes_original(factory)
    new = {}
    for key, proc in originals.items():
        name = key.removesuffix(".processor")
        if name not in chosen:
            new[key] = proc
        else:
            new[key] = factory(store, name, proc) if with_original else factory(store, name)
    if hasattr(store, "grid"):  # a MapStore (duck-typed recorders place tokens themselves)
        store.grid = family.token_grid

    def on_model_call(module, args, kwargs):
        latent_hw, timestep = family.step_input(args, kwargs)
        if isinstance(timestep, torch.Tensor):  # meta tensors (shape-only models) have no value to read
            timestep = timestep.flatten()[0].item() if timestep.numel() and not timestep.is_meta else None
        store.begin_call(latent_hw, timestep)

    hook = model.register_forward_pre_hook(on_model_call, with_kwargs=True)
    try:
        model.set_attn_processor(new)
        yield store
    finally:
        hook.remove()
        model.set_attn_processor(originals)
    store.flush()  # the maps are complete when the block ends


def _takes_original(factory) -> bool:
    """Whether a processor factory takes the layer's original processor: a third parameter named `original`,
    or three required positional parameters."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return False
    required = [p for p in params
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) >= 3 or any(p.name == "original" for p in params[2:])


def guidance_probe(pipe) -> Callable[[], bool] | bool:
    """Ask a pipeline, at each denoiser call, whether its batch is [unconditional, conditional]."""
    if not is_pipeline(pipe):
        return False  # a bare model: the caller's batch is taken as all-conditional
    return lambda: bool(getattr(pipe, "do_classifier_free_guidance", False))


@contextmanager
def capture(pipe, mode: str = "exact", layers: str | Iterable[str] = "*", *, per_step: bool = False,
            keep_heads: bool = False, max_step_bytes: int = DEFAULT_MAX_STEP_BYTES,
            latent_size: tuple[int, int] | int | None = None, concepts: Sequence[str] | None = None,
            concept_kind: str | None = None, concept_template: str | None = None) -> Iterator[MapStore]:
    """Record cross-attention maps of everything `pipe` generates inside the `with` block.

    Works on the pipelines of every family in `crossattn_sd.families` (SD 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1)
    and on their bare denoisers (`UNet2DConditionModel`, `SD3Transformer2DModel`, `FluxTransformer2DModel`).
    The original processors are restored on exit, also after an exception.

    Args:
        pipe: a Diffusers pipeline (or its denoiser).
        mode (`str`): "exact" (images bit-identical to Diffusers' default processor) or "explicit".
        layers (`str` or list of `str`): glob patterns over cross-attention layer names ("*" for all), or map
            resolutions ("16": longer side 16; "16x12": exact size) of a `latent_size` latent.
        per_step (`bool`): also keep each step's maps (for timestep ranges and timelines).
        keep_heads (`bool`): also keep per-head sums.
        max_step_bytes (`int`): per-step memory budget; past it per-step detail is dropped with a warning.
        latent_size (`int` or `(h, w)`, *optional*): the latent size resolution selectors refer to (image size
            // `pipe.vae_scale_factor`); default the model's `sample_size`.
        concepts (list of `str`, *optional*): words that need not be in the prompt, one word each, mapped on the
            side (the images do not change); the store's `concepts` holds their maps (`crossattn_sd/concepts.py`).
        concept_kind (`str`, *optional*): the default concept map kind (UNet: "joint" or "concepts-only"; SD3:
            "output" or "attention"); default the family's.
        concept_template (`str`, *optional*): the text a concept is encoded in, its "{}" replaced by the concept
            (only the concept's own tokens are kept); default `concepts.DEFAULT_TEMPLATE`.

    Example:
        >>> with crossattn_sd.capture(pipe) as maps:
        ...     image = pipe("a red circle on the left").images[0]
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    store = MapStore(per_step=per_step, keep_heads=keep_heads, max_step_bytes=max_step_bytes,
                     cfg=guidance_probe(pipe))
    family = family_of(pipe)
    with concept_maps(pipe, family, store, concepts, concept_kind, concept_template), \
            install(family, store, lambda s, layer, original: family.processor(s, layer, mode, original), layers,
                    latent_size):
        yield store


@contextmanager
def concept_maps(pipe, family: Family, store: MapStore, concepts: Sequence[str] | None,
                 kind: str | None = None, template: str | None = None) -> Iterator[object]:
    """Record the concepts (checked, then encoded by `pipe`'s text encoder) beside `store`; nothing without them."""
    from .concepts import check_concepts

    defaults = getattr(pipe, "crossattn_defaults", None)
    names = check_concepts(concepts, getattr(defaults, "vocabulary", None) or ())
    if not names:
        yield None
        return
    if not is_pipeline(pipe):
        raise ValueError(f"concepts need the pipeline's text encoder; pass the pipeline, not its bare "
                         f"{type(pipe).__name__}")
    with family.concept_recorder(pipe, store, names, kind, template) as recorded:
        yield recorded
