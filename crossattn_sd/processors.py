"""Installing the recording processors, and `capture()`: maps of everything a pipeline generates in a block.

The per-architecture facts (which layers see text, where their image tokens sit, where a step begins, which
processor records them) come from the model's family adapter (`crossattn_sd.families`); this module names no
architecture. Each family's processor computes the layer's output exactly as Diffusers' own processor does
("exact" mode, bit-identical images) or spelled out as probs @ V ("explicit" mode, for steering and training),
plus one call that hands the attention to a `MapStore`.

Processors are installed and restored only through Diffusers' public API: each attention layer's
`get_processor` / `set_processor`, the calls `AttentionMixin.attn_processors` / `set_attn_processor` make, on the
layers one walk over the model finds (`Family.attn_processors`; Diffusers' `set_attn_processor` walks the model
twice per call and `install` sets twice, ~1 % of a generation on the embedded model), every layer given; layers
that see no text keep whatever processor they had.
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


def select_layers(family: Family, layers: str | Iterable[str] = "*", latent_size=None,
                  text_layers: list[str] | None = None) -> set[str]:
    """The family's text-attention layers (`text_layers`, default all) that `layers` selects (see `match_layers`;
    resolutions of a `latent_size` latent); selecting none is a ValueError naming the layers and sizes there are."""
    text_layers = family.layers() if text_layers is None else text_layers
    if not text_layers:
        raise ValueError(f"this {type(family.model).__name__} has no {family.layer_kind} layers, so there is nothing "
                         "to steer or record (a model conditioned without attention, such as tiny-film's FiLM UNet); "
                         "use the capture or default processor")
    selectors = [layers] if isinstance(layers, str) else list(layers)
    by_size = any(_RESOLUTION.match(sel.strip()) for sel in selectors)
    sizes = family.layer_sizes(latent_size, text_layers) if by_size else None  # a model walk only when needed
    chosen = set(match_layers(text_layers, layers, sizes))
    if not chosen:
        sizes = sizes or family.layer_sizes(latent_size, text_layers)
        example = repr(text_layers[0]) if text_layers else f"(this {type(family.model).__name__} has none)"
        found = sorted({f"{h}x{w}" for h, w in sizes.values()}, key=lambda r: -int(r.split("x")[0]))
        shown = layers if isinstance(layers, str) else ", ".join(layers)
        raise ValueError(f"layers={shown!r} matches no {family.layer_kind} layer; names look like {example} and "
                         f"map sizes are {', '.join(found) or '(none)'} (use glob patterns such as '*' or "
                         f"'{text_layers[0].split('.')[0] if text_layers else 'up_blocks'}.*', or resolutions "
                         "such as '16')")
    return chosen


ProcessorFactory = Callable[..., object]  # (store, layer) or (store, layer, original)


@contextmanager
def install(model, store: MapStore, factory: ProcessorFactory, layers: str | Iterable[str] = "*",
            latent_size: tuple[int, int] | int | None = None, *,
            processors: dict | None = None) -> Iterator[MapStore]:
    """Install `factory(store, layer)` (or `factory(store, layer, original)`, given the layer's processor
    before installing) on the text-attention layers `layers` selects (glob patterns or resolutions, see
    `match_layers`; resolutions are those of a `latent_size` latent, default the model's `sample_size`);
    restore the originals on exit, also after an error.

    `model` is a denoiser (UNet, transformer), a pipeline, or a family adapter (`families.family_of`) whose
    processors the factory makes (per-call state such as Flux's text length lives in it). Every key of the family's
    `attn_processors()` (each attention layer's, as Diffusers' `attn_processors` lists them) is filled in one
    `set_attn_processor` call: unmatched layers keep their processor. A forward pre-hook on the model tells the
    store where each model evaluation starts, with the latent size (maps are reshaped from it, so non-square
    images work) and the timestep; the store places each layer's tokens on the grid the family gives. A call
    the family does not record (a guidance call beside the conditional one, `Family.recorded_call`) runs with
    the original processors, swapped in for that call only.
    A model that already has this package's processors installed is refused (nesting would adopt them as the
    "originals"). `processors`: the family's `attn_processors()` if the caller has just read them (each read is a
    walk over the model).
    """
    family = model if isinstance(model, Family) else family_of(model)  # the per-call adapter
    model = family.model
    family.latent_hint = family.latent_hw(latent_size)
    originals = dict(family.attn_processors() if processors is None else processors)
    nested = [k for k, p in originals.items() if isinstance(p, Recorder)]
    if nested:
        raise RuntimeError(f"crossattn-sd processors are already installed on this {type(model).__name__} "
                           f"({nested[0].removesuffix('.processor')}, ...); finish the first capture() block before "
                           "starting another")
    chosen = select_layers(family, layers, latent_size, family.layers(originals))
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

    guidance_call = []  # set while a guidance call runs on the original processors

    def on_model_call(module, args, kwargs):
        if not family.recorded_call(args, kwargs):  # e.g. Flux's negative prompt: Diffusers' own, unrecorded
            family.set_attn_processor(originals)
            guidance_call.append(True)
            return
        step = family.step_input(args, kwargs)
        if step is None:  # a call that is no step records nothing
            return
        latent_hw, timestep = step
        if isinstance(timestep, torch.Tensor):  # meta tensors (shape-only models) have no value to read
            timestep = timestep.flatten()[0].item() if timestep.numel() and not timestep.is_meta else None
        store.begin_call(latent_hw, timestep)

    def after_model_call(module, args, output):
        if guidance_call:
            guidance_call.clear()
            family.set_attn_processor(new)

    hooks = [model.register_forward_pre_hook(on_model_call, with_kwargs=True),
             model.register_forward_hook(after_model_call)]
    try:
        family.set_attn_processor(new)
        yield store
    finally:
        for hook in hooks:
            hook.remove()
        family.set_attn_processor(originals)
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
    if not family_of(pipe).batched_guidance:  # guidance as separate calls (Flux): every batch is conditional
        return False
    return lambda: bool(getattr(pipe, "do_classifier_free_guidance", False))


@contextmanager
def capture(pipe, mode: str = "exact", layers: str | Iterable[str] = "*", *, per_step: bool = False,
            keep_heads: bool = False, max_step_bytes: int = DEFAULT_MAX_STEP_BYTES,
            latent_size: tuple[int, int] | int | None = None, step_columns: Iterable[int] | None = None,
            per_step_dtype: torch.dtype | str = torch.float32, per_step_device: str | None = "cpu",
            per_step_by: str = "layer", concepts: Sequence[str] | None = None, concept_kind: str | None = None,
            concept_template: str | None = None) -> Iterator[MapStore]:
    """Record cross-attention maps of everything `pipe` generates inside the `with` block.

    Works on the pipelines of every family in `crossattn_sd.families` (SD 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1,
    FLUX.2, Chroma, Qwen-Image, Z-Image, Sana) and on their bare denoisers (`UNet2DConditionModel`,
    `SD3Transformer2DModel`, `FluxTransformer2DModel`, ...).
    The original processors are restored on exit, also after an exception. A model without text-attention layers
    (tiny-film's FiLM UNet) records nothing with `layers="*"`.

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
        step_columns (list of `int`, *optional*): the token columns per-step maps keep (with one more: the
            others' sum), e.g. `tokens.prompt_columns([align_prompt(pipe.tokenizer, prompt)])`; default all.
        per_step_dtype (`torch.dtype` or `str`): dtype of the per-step maps (float16 halves them).
        per_step_device (`str`, *optional*): where per-step maps are kept: the CPU by default (copied from a GPU
            without stalling it); None keeps them on the model's device.
        per_step_by (`str`): "layer", or "resolution" to keep one per-step map per resolution (its layers summed).
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
                     cfg=guidance_probe(pipe), step_columns=step_columns, per_step_dtype=per_step_dtype,
                     per_step_device=per_step_device, per_step_by=per_step_by)
    family = family_of(pipe)
    everything = all(sel.strip() == "*" for sel in ([layers] if isinstance(layers, str) else list(layers)))
    processors = family.attn_processors()  # read once, for this check and for install
    if everything and not family.layers(processors):  # no text attention at all (FiLM's UNet): nothing to record
        yield store
        return
    with concept_maps(pipe, family, store, concepts, concept_kind, concept_template), \
            install(family, store, lambda s, layer, original: family.processor(s, layer, mode, original), layers,
                    latent_size, processors=processors):
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
