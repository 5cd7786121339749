"""Recording on layers that already have a processor of their own (IP-Adapter and other custom processors).

`install()` hands each factory the layer's current processor. What capture does with it:

- Diffusers' default `AttnProcessor2_0`: replaced by `CaptureProcessor`, which computes the same SDPA (images
  bit-identical) and reuses its queries and keys for the maps.
- Any other processor (IP-Adapter's `IPAdapterAttnProcessor2_0`, whose `encoder_hidden_states` is a tuple
  (text states, [image-prompt states]); the classic `AttnProcessor`; xformers, sliced or fused attention; a
  user's own): wrapped by `CaptureWrapper`. The original processor computes the output, so images are
  exactly what Diffusers computes with it (image-prompt keys and values, scales and masks included); the
  text tokens' probabilities are computed on the side, softmax(scale * Q K^T + mask) from the layer's own
  `to_q`/`to_k`, norms and attention mask, exactly as a plain cross-attention processor would. The price is
  one extra `to_q` and `to_k` projection per wrapped layer and call.
- Processors whose text attention is not that softmax (added key/value projections, Custom Diffusion's own
  key projection) cannot be recorded this way: a one-line error names the class.

Steering processors (`reweight`, `edit`) and capture's `explicit` mode compute `probs @ V` themselves, so
they replace the processor; over one that is not plain softmax attention they would silently drop what it adds
(an IP-Adapter's image prompt): `replacing` refuses with a one-line error naming the class instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from diffusers.models.attention_processor import (
    ADDED_KV_ATTENTION_PROCESSORS,
    AttnProcessor,
    AttnProcessor2_0,
    AttnProcessorNPU,
    CustomDiffusionAttnProcessor,
    CustomDiffusionAttnProcessor2_0,
    CustomDiffusionXFormersAttnProcessor,
    FusedAttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)

from .families.base import Recorder
from .maps import MapStore

# Plain softmax(Q K^T) V over the text tokens, nothing added: what explicit mode and steering may replace.
PLAIN_PROCESSORS = (AttnProcessor, AttnProcessor2_0, AttnProcessorNPU, FusedAttnProcessor2_0, SlicedAttnProcessor,
                    XFormersAttnProcessor)
# Text attention that is not softmax(to_q(h) to_k(text)^T): the side computation would record something else.
UNRECORDABLE = (*ADDED_KV_ATTENTION_PROCESSORS, CustomDiffusionAttnProcessor, CustomDiffusionAttnProcessor2_0,
                CustomDiffusionXFormersAttnProcessor)


def text_query_key(attn, hidden_states: torch.Tensor, text_states: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None):
    """Queries, keys and additive mask of a layer's text attention, as Diffusers' `AttnProcessor2_0` computes them:
    (B, heads, Nq, d), (B, heads, T, d) and (B, heads, 1 or Nq, T) or None."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = text_states.shape
    heads = attn.heads
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if attn.norm_cross:
        text_states = attn.norm_encoder_hidden_states(text_states)
    key = attn.to_k(text_states)
    head_dim = key.shape[-1] // heads
    query = query.view(batch_size, -1, heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, attention_mask


class CaptureWrapper(torch.nn.Module, Recorder):
    """Runs a layer's own processor for the output and records its text tokens' attention on the side.

    An `nn.Module` holding the original, so an IP-Adapter's `to_k_ip`/`to_v_ip` stay inside the UNet's module tree
    while it is installed (device moves and offload hooks still reach them).

    Args:
        original: the layer's processor (kept and called unchanged).
        store (`MapStore`): the per-call store to record into.
        layer (`str`): this layer's name.
    """

    def __init__(self, original, store: MapStore, layer: str):
        super().__init__()
        self.original = original
        self.store = store
        self.layer = layer
        # `Attention.forward` hands a processor only the cross_attention_kwargs its `__call__` names (IP-Adapter's
        # `scale` and `ip_adapter_masks`, ...) and reads that signature from `processor.__call__`: show it the
        # original's. Calls still go to the class's `__call__` below.
        signature = inspect.signature(original.__call__)

        def call(*args, **kwargs):
            return type(self).__call__(self, *args, **kwargs)

        call.__signature__ = signature
        self.__dict__["__call__"] = call

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        # `Attention.forward` passes everything but `attn` and `hidden_states` by keyword; so does the wrapper
        out = self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                            attention_mask=attention_mask, **kwargs)
        text = encoder_hidden_states
        if isinstance(text, tuple):  # IP-Adapter: (text states, [image-prompt states])
            text = text[0]
        elif text is not None and hasattr(self.original, "num_tokens"):  # IP-Adapter's deprecated concatenation
            text = text[:, : text.shape[1] - self.original.num_tokens[0]]
        if text is None:
            return out  # called as self-attention: nothing to record
        with torch.no_grad():
            query, key, mask = text_query_key(attn, hidden_states, text, attention_mask, kwargs.get("temb"))
        rec = self.store.conditional(query.shape[0])
        self.store.record_attention(self.layer, query[rec], key[rec], None if mask is None else mask[rec], attn.scale)
        if getattr(self.store, "concepts", None) is not None:  # words not in the prompt (crossattn_sd/concepts.py)
            from .families.unet import record_concepts

            record_concepts(self.store.concepts, self.layer, attn, query[rec], key[rec],
                            None if mask is None else mask[rec], attn.scale)
        return out


def unet_processor(store: MapStore, layer: str, mode: str, original, steering=None):
    """A UNet layer's recording processor given its current one (the UNet family's `processor`): Diffusers'
    default is replaced by `CaptureProcessor`; any other is wrapped in exact mode, and refused where the output
    would have to change (explicit mode, reweight, edit: they would drop what it adds) or where the side
    computation would record something else (added key/value projections, Custom Diffusion)."""
    from .families.unet import CaptureProcessor

    if mode == "explicit" or steering is not None:
        if not isinstance(original, PLAIN_PROCESSORS):
            what = ("capture (explicit mode)" if steering is None
                    else "reweight" if steering.token_map is None else "edit")
            raise ValueError(f"the {what} processor would replace layer {layer}'s {type(original).__name__} and drop "
                             "what it adds; use capture in exact mode, leave the layer out with layers=..., or remove "
                             "it first (e.g. pipe.unload_ip_adapter())")
        return CaptureProcessor(store, layer, mode, steering)
    if type(original) is AttnProcessor2_0:
        return CaptureProcessor(store, layer, mode)
    if isinstance(original, UNRECORDABLE):
        raise ValueError(f"cannot record layer {layer}: its {type(original).__name__} does not attend to the text "
                         "through to_q/to_k; restore Diffusers' processors (unet.set_default_attn_processor()) or "
                         "leave this layer out with layers=...")
    return CaptureWrapper(original, store, layer)
