"""Cross-attention processors that record per-token maps, and the context manager that installs them.

In a Stable Diffusion UNet every transformer block has `attn1` (self-attention over image features) and
`attn2` (cross-attention). In `attn2` the image features S2 give the queries, so they define the output
length, and the text-encoder states S1 give the keys and values:

    out = softmax((W_Q S2)(W_K S1)^T / sqrt(d)) W_V S1

`CaptureProcessor` is Diffusers' classic processor plus one call that hands the probabilities to a
`MapStore`. It runs in one of two modes:

- "exact": the output comes from `F.scaled_dot_product_attention` exactly as in Diffusers' default
  `AttnProcessor2_0`, so images are bit-identical; the probabilities are computed on the side, for the
  recorded (conditional) images only.
- "explicit": the output is `attention_probs @ V`, the formula end to end (differs from SDPA by ~1e-6). The
  steering processors (see `steering.py`) build on this mode, because they change the probabilities.

Processors are installed and restored only through Diffusers' public API (`attn_processors`,
`set_attn_processor`); `attn1` keeps whatever processor it had.
"""

from __future__ import annotations

import fnmatch
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
            rows = slice(rec.start * heads, rec.stop * heads)
            attention_probs = attn.get_attention_scores(
                _to_batch_heads(query[rec]), _to_batch_heads(key[rec]),
                None if attention_mask is None else attention_mask[rows],
            )
        else:
            attention_probs = attn.get_attention_scores(
                _to_batch_heads(query), _to_batch_heads(key), attention_mask
            )  # (B * heads, Nq, T)
            attention_probs = self.steer(attention_probs, batch_size, heads)
            hidden_states = torch.bmm(attention_probs, _to_batch_heads(value))  # (B * heads, Nq, d)
            hidden_states = hidden_states.view(batch_size, heads, -1, head_dim).transpose(1, 2)
            hidden_states = hidden_states.reshape(batch_size, -1, heads * head_dim)
            attention_probs = attention_probs[rec.start * heads: rec.stop * heads]
        self.store.record(self.layer, attention_probs, heads)

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


def cross_attention_layers(unet) -> list[str]:
    """Names of the UNet's cross-attention layers, in forward order (keys of `attn_processors` minus '.processor')."""
    names = []
    for key in unet.attn_processors:
        name = key.removesuffix(".processor")
        if getattr(unet.get_submodule(name), "is_cross_attention", name.endswith("attn2")):
            names.append(name)
    return names


def match_layers(names: Iterable[str], layers: str | Iterable[str] = "*") -> list[str]:
    """The names matching one glob pattern or any of several ("*" for all, "up_blocks.*", ...)."""
    patterns = [layers] if isinstance(layers, str) else list(layers)
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


ProcessorFactory = Callable[[MapStore, str], object]


@contextmanager
def install(unet, store: MapStore, factory: ProcessorFactory, layers: str | Iterable[str] = "*") -> Iterator[MapStore]:
    """Install `factory(store, layer)` on the matching cross-attention layers; restore the originals on exit.

    Every key of `unet.attn_processors` is filled: unmatched layers (and all self-attention) keep their
    processor. A forward pre-hook on the UNet tells the store where each UNet evaluation starts, with the
    latent size (maps are reshaped from it, so non-square images work) and the timestep.
    """
    originals = dict(unet.attn_processors)
    chosen = set(match_layers(cross_attention_layers(unet), layers))
    if not chosen:
        raise ValueError(
            f"layers={layers!r} matches no cross-attention layer; names look like "
            f"{cross_attention_layers(unet)[0]!r} (use glob patterns such as '*' or 'up_blocks.*')"
        )
    new = {key: factory(store, key.removesuffix(".processor")) if key.removesuffix(".processor") in chosen
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


def guidance_probe(pipe) -> Callable[[], bool] | bool:
    """Ask a pipeline, at each UNet call, whether its batch is [unconditional, conditional]."""
    if not hasattr(pipe, "unet"):
        return False  # a bare UNet: the caller's batch is taken as all-conditional
    return lambda: bool(getattr(pipe, "do_classifier_free_guidance", False))


@contextmanager
def capture(pipe, mode: str = "exact", layers: str | Iterable[str] = "*", *, per_step: bool = False,
            keep_heads: bool = False, max_step_bytes: int = DEFAULT_MAX_STEP_BYTES) -> Iterator[MapStore]:
    """Record cross-attention maps of everything `pipe` generates inside the `with` block.

    Works on any Diffusers pipeline with a `unet` (or on a bare `UNet2DConditionModel`). The original
    processors are restored on exit, also after an exception.

    Args:
        pipe: a Diffusers pipeline (or UNet).
        mode (`str`): "exact" (images bit-identical to Diffusers' default processor) or "explicit".
        layers (`str` or list of `str`): glob patterns over cross-attention layer names; "*" for all.
        per_step (`bool`): also keep each step's maps (for timestep ranges and timelines).
        keep_heads (`bool`): also keep per-head sums.
        max_step_bytes (`int`): per-step memory budget; past it per-step detail is dropped with a warning.

    Example:
        >>> with crossattn_sd.capture(pipe) as maps:
        ...     image = pipe("a red circle on the left").images[0]
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    store = MapStore(per_step=per_step, keep_heads=keep_heads, max_step_bytes=max_step_bytes,
                     cfg=guidance_probe(pipe))
    unet = getattr(pipe, "unet", pipe)
    with install(unet, store, lambda s, layer: CaptureProcessor(s, layer, mode), layers):
        yield store
