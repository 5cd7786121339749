"""Cross-attention processors that record per-token maps, and the context manager that installs them.

In a Stable Diffusion UNet every transformer block has `attn1` (self-attention over image features) and
`attn2` (cross-attention). In `attn2` the image features S2 give the queries, so they define the output
length, and the text-encoder states S1 give the keys and values:

    out = softmax((W_Q S2)(W_K S1)^T / sqrt(d)) W_V S1

`CaptureProcessor` is Diffusers' classic processor plus one call that hands the attention to a `MapStore`
(the probabilities, or in "exact" mode the queries and keys they come from). It runs in one of two modes:

- "exact": the output comes from `F.scaled_dot_product_attention` exactly as in Diffusers' default
  `AttnProcessor2_0`, so images are bit-identical; the probabilities are computed on the side, for the
  recorded (conditional) images only, by the store in batches over steps (`MapStore.record_attention`).
- "explicit": the output is `attention_probs @ V`, the formula end to end (differs from SDPA by ~1e-6). The
  steering processors (see `steering.py`) build on this mode, because they change the probabilities.

Processors are installed and restored only through Diffusers' public API (`attn_processors`,
`set_attn_processor` with every key filled); `attn1` keeps whatever processor it had.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .maps import DEFAULT_MAX_STEP_BYTES, MapStore

MODES = ("exact", "explicit")


class CaptureProcessor:
    """Cross-attention processor that records head-averaged attention probabilities into a `MapStore`.

    Args:
        store (`MapStore`): the per-call store to record into.
        layer (`str`): this layer's name (its key in `unet.attn_processors` without ".processor").
        mode (`str`): "exact" (SDPA output, bit-identical images) or "explicit" (output = probs @ V).
    """

    def __init__(self, store: MapStore, layer: str, mode: str = "exact"):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        self.store = store
        self.layer = layer
        self.mode = mode

    def steer(self, attention_probs: torch.Tensor, batch_size: int, heads: int) -> torch.Tensor:
        """Change the probabilities before they weight the values; (batch * heads, queries, tokens).

        The capture processor leaves them as they are; steering processors override this.
        """
        return attention_probs

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            # (batch * heads, 1 or queries, tokens), the layout `get_attention_scores` expects
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # W_Q S2: image features are the queries
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)  # W_K S1: text states are the keys...
        value = attn.to_v(encoder_hidden_states)  # ...and the values

        heads = attn.heads
        inner_dim = key.shape[-1]
        head_dim = inner_dim // heads
        query = query.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # (B, heads, Nq, d)
        key = key.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # (B, heads, T, d)
        value = value.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # (B, heads, T, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        rec = self.store.conditional(batch_size)  # images whose maps are kept
        if self.mode == "exact":
            sdpa_mask = None
            if attention_mask is not None:
                sdpa_mask = attention_mask.view(batch_size, heads, -1, attention_mask.shape[-1])
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=sdpa_mask, dropout_p=0.0, is_causal=False
            )
            hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, heads * head_dim)
            hidden_states = hidden_states.to(query.dtype)
            # softmax(Q K^T) of the recorded images, computed by the store in one batch over steps
            self.store.record_attention(self.layer, query[rec], key[rec],
                                        None if sdpa_mask is None else sdpa_mask[rec], attn.scale)
        else:
            attention_probs = attn.get_attention_scores(
                _to_batch_heads(query), _to_batch_heads(key), attention_mask
            )  # (B * heads, Nq, T)
            attention_probs = self.steer(attention_probs, batch_size, heads)
            hidden_states = torch.bmm(attention_probs, _to_batch_heads(value))  # (B * heads, Nq, d)
            hidden_states = hidden_states.view(batch_size, heads, -1, head_dim).transpose(1, 2)
            hidden_states = hidden_states.reshape(batch_size, -1, heads * head_dim)
            self.store.record(self.layer, attention_probs[rec.start * heads: rec.stop * heads], heads)

        hidden_states = attn.to_out[0](hidden_states)  # linear proj
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def _to_batch_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B * heads, N, d), the layout of Diffusers' `head_to_batch_dim`."""
    return t.reshape(-1, t.shape[-2], t.shape[-1])


# -- installing -----------------------------------------------------------------------------------------------


def _cross_attention_names(unet, processors: dict) -> list[str]:
    """Names of the cross-attention layers among `processors` (the keys of `unet.attn_processors`), in order."""
    names = []
    for key in processors:
        name = key.removesuffix(".processor")
        if getattr(unet.get_submodule(name), "is_cross_attention", name.endswith("attn2")):
            names.append(name)
    return names


def cross_attention_layers(unet) -> list[str]:
    """Names of the UNet's cross-attention layers, in forward order (keys of `attn_processors` minus '.processor')."""
    return _cross_attention_names(unet, unet.attn_processors)


_RESOLUTION = re.compile(r"^(\d+)(?:x(\d+))?$")


def layer_sizes(unet, latent_size: tuple[int, int] | int | None = None,
                names: Iterable[str] | None = None) -> dict[str, tuple[int, int]]:
    """Map size (h, w) of each cross-attention layer for a latent of `latent_size` (default: the UNet's
    `sample_size`), read from the UNet's blocks: every down block with a downsampler halves the size (rounding
    up, like Diffusers' stride-2 convolution), every up block with an upsampler doubles it back."""
    if latent_size is None:
        latent_size = unet.config.sample_size
    h, w = (latent_size, latent_size) if isinstance(latent_size, int) else tuple(int(v) for v in latent_size)
    level_sizes = [(h, w)]
    for _ in range(len(getattr(unet, "down_blocks", ()))):
        lh, lw = level_sizes[-1]
        level_sizes.append(((lh + 1) // 2, (lw + 1) // 2))
    levels, level = {}, 0
    for i, block in enumerate(getattr(unet, "down_blocks", ())):
        levels[f"down_blocks.{i}."] = level
        level += getattr(block, "downsamplers", None) is not None
    levels["mid_block."] = level
    for i, block in enumerate(getattr(unet, "up_blocks", ())):
        levels[f"up_blocks.{i}."] = level
        level -= getattr(block, "upsamplers", None) is not None
    sizes = {}
    for name in cross_attention_layers(unet) if names is None else names:
        prefix = next((p for p in levels if name.startswith(p)), None)
        if prefix is not None:
            sizes[name] = level_sizes[max(levels[prefix], 0)]
    return sizes


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


ProcessorFactory = Callable[[MapStore, str, object], object]  # (store, layer, the layer's current processor)


@contextmanager
def install(unet, store: MapStore, factory: ProcessorFactory, layers: str | Iterable[str] = "*",
            latent_size: tuple[int, int] | int | None = None) -> Iterator[MapStore]:
    """Install `factory(store, layer, original)` on the cross-attention layers `layers` selects (glob patterns or
    resolutions, see `match_layers`; resolutions are those of a `latent_size` latent, default the UNet's
    `sample_size`); restore the originals on exit. `original` is the layer's current processor, so a factory can
    wrap it or refuse it (see `compose.py`).

    Every key of `unet.attn_processors` is filled in one `set_attn_processor` call: unmatched layers (and all
    self-attention) keep their processor. A forward pre-hook on the UNet tells the store where each UNet
    evaluation starts, with the latent size (maps are reshaped from it, so non-square images work) and the
    timestep.
    """
    originals = dict(unet.attn_processors)
    cross = _cross_attention_names(unet, originals)
    selectors = [layers] if isinstance(layers, str) else list(layers)
    by_size = any(_RESOLUTION.match(sel.strip()) for sel in selectors)
    sizes = layer_sizes(unet, latent_size, cross) if by_size else None  # a walk over the UNet only when needed
    chosen = set(match_layers(cross, layers, sizes))
    if not chosen:
        sizes = sizes or layer_sizes(unet, latent_size, cross)
        example = repr(cross[0]) if cross else "(this UNet has none)"
        found = sorted({f"{h}x{w}" for h, w in sizes.values()}, key=lambda r: -int(r.split("x")[0]))
        shown = layers if isinstance(layers, str) else ", ".join(layers)
        raise ValueError(f"layers={shown!r} matches no cross-attention layer; names look like {example} and map "
                         f"sizes are {', '.join(found) or '(none)'} (use glob patterns such as '*' or "
                         "'up_blocks.*', or resolutions such as '16')")
    new = {key: factory(store, key.removesuffix(".processor"), proc) if key.removesuffix(".processor") in chosen
           else proc for key, proc in originals.items()}

    def on_unet_call(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if isinstance(timestep, torch.Tensor):  # meta tensors (shape-only UNets) have no value to read
            timestep = timestep.flatten()[0].item() if timestep.numel() and not timestep.is_meta else None
        store.begin_call(tuple(sample.shape[-2:]), timestep)

    hook = unet.register_forward_pre_hook(on_unet_call, with_kwargs=True)
    try:
        unet.set_attn_processor(new)
        yield store
    finally:
        hook.remove()
        unet.set_attn_processor(originals)
    store.flush()  # the maps are complete when the block ends


def guidance_probe(pipe) -> Callable[[], bool] | bool:
    """Ask a pipeline, at each UNet call, whether its batch is [unconditional, conditional]."""
    if not hasattr(pipe, "unet"):
        return False  # a bare UNet: the caller's batch is taken as all-conditional
    return lambda: bool(getattr(pipe, "do_classifier_free_guidance", False))


@contextmanager
def capture(pipe, mode: str = "exact", layers: str | Iterable[str] = "*", *, per_step: bool = False,
            keep_heads: bool = False, max_step_bytes: int = DEFAULT_MAX_STEP_BYTES,
            latent_size: tuple[int, int] | int | None = None) -> Iterator[MapStore]:
    """Record cross-attention maps of everything `pipe` generates inside the `with` block.

    Works on any Diffusers pipeline with a `unet` (or on a bare `UNet2DConditionModel`). The original
    processors are restored on exit, also after an exception.

    Args:
        pipe: a Diffusers pipeline (or UNet).
        mode (`str`): "exact" (images bit-identical to Diffusers' default processor) or "explicit".
        layers (`str` or list of `str`): glob patterns over cross-attention layer names ("*" for all), or map
            resolutions ("16": longer side 16; "16x12": exact size) of a `latent_size` latent.
        per_step (`bool`): also keep each step's maps (for timestep ranges and timelines).
        keep_heads (`bool`): also keep per-head sums.
        max_step_bytes (`int`): per-step memory budget; past it per-step detail is dropped with a warning.
        latent_size (`int` or `(h, w)`, *optional*): the latent size resolution selectors refer to (image size
            // `pipe.vae_scale_factor`); default the UNet's `sample_size`.

    Example:
        >>> with crossattn_sd.capture(pipe) as maps:
        ...     image = pipe("a red circle on the left").images[0]
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    store = MapStore(per_step=per_step, keep_heads=keep_heads, max_step_bytes=max_step_bytes,
                     cfg=guidance_probe(pipe))
    from .compose import capture_factory  # compose builds on CaptureProcessor

    unet = getattr(pipe, "unet", pipe)
    with install(unet, store, capture_factory(mode), layers, latent_size):
        yield store
