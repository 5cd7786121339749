"""UNet family (SD 1.x / 2.x, SDXL): cross-attention layers `attn2` on UNet levels; all keys are text tokens.

In a Stable Diffusion UNet every transformer block has `attn1` (self-attention over image features) and
`attn2` (cross-attention). In `attn2` the image features S2 give the queries, so they define the output
length, and the text-encoder states S1 give the keys and values:

    out = softmax((W_Q S2)(W_K S1)^T / sqrt(d)) W_V S1

`CaptureProcessor` is Diffusers' `AttnProcessor2_0` plus one call that hands the attention to the store (the
probabilities, or in "exact" mode the queries and keys they come from). In "exact" mode the output is
`F.scaled_dot_product_attention` as in Diffusers, so images are bit-identical; in "explicit" mode it is
`attention_probs @ V`, the formula end to end (differs from SDPA by ~1e-6).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .base import Family, Recorder, Steering, check_mode, uniform_probs


def layer_hw(latent_hw: tuple[int, int], num_queries: int) -> tuple[int, int]:
    """(h, w) of a layer with `num_queries` pixels in a UNet whose input latent is `latent_hw`.

    UNet downsamplers are stride-2 convolutions with padding 1, so each level has ceil(h/2) x ceil(w/2).
    """
    h, w = latent_hw
    while h * w > num_queries and (h > 1 or w > 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != num_queries:
        raise ValueError(f"cannot place {num_queries} queries on a latent of {latent_hw[0]}x{latent_hw[1]}")
    return h, w


class CaptureProcessor(Recorder):
    """Cross-attention processor that records head-averaged attention probabilities into a `MapStore`.

    Args:
        store (`MapStore`): the per-call store to record into.
        layer (`str`): this layer's name (its key in `unet.attn_processors` without ".processor").
        mode (`str`): "exact" (SDPA output, bit-identical images) or "explicit" (output = probs @ V).
        steering (`Steering`, *optional*): reweight / edit (see `steering.py`); None records only.
    """

    def __init__(self, store, layer: str, mode: str = "exact", steering: Steering | None = None):
        check_mode(mode)
        self.store = store
        self.layer = layer
        self.mode = mode
        self.steering = steering

    def steer(self, attention_probs: torch.Tensor, batch_size: int, heads: int) -> torch.Tensor:
        """Change the probabilities (batch * heads, queries, tokens) before they weight the values."""
        if self.steering is None:
            return attention_probs
        return self.steering.steer_probs(attention_probs, self.store.conditional(batch_size), heads, self.store)

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
        concepts = getattr(self.store, "concepts", None)
        if concepts is not None:  # words not in the prompt, on the side (crossattn_sd/concepts.py)
            concept_mask = None if attention_mask is None else (
                attention_mask.view(batch_size, heads, -1, attention_mask.shape[-1])[rec])
            record_concepts(concepts, self.layer, attn, query[rec], key[rec], concept_mask, attn.scale)
        steering = self.steering
        if self.mode == "exact" and not (steering is not None and steering.needs_probs(self.store)):
            sdpa_mask = None
            if attention_mask is not None:
                sdpa_mask = attention_mask.view(batch_size, heads, -1, attention_mask.shape[-1])
            if steering is not None:  # reweight: sum_j p_j w_j v_j = SDPA(Q, K, w * V)
                value = steering.scale_values(value, rec, (0, None))
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=sdpa_mask, dropout_p=0.0, is_causal=False
            )
            hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, heads * head_dim)
            hidden_states = hidden_states.to(query.dtype)
            # softmax(Q K^T) of the recorded images, computed by the store in one batch over steps
            self.store.record_attention(self.layer, query[rec], key[rec],
                                        None if sdpa_mask is None else sdpa_mask[rec], attn.scale,
                                        **_weights_kwarg(steering))
        else:
            if steering is not None and steering.uniform:  # every query attends equally to every token
                attention_probs = uniform_probs(batch_size * heads, query.shape[2], key.shape[2], attention_mask,
                                                query.dtype, query.device)  # (B * heads, Nq, T)
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


CONCEPT_KINDS = ("joint", "concepts-only")


def record_concepts(concepts, layer: str, attn, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> None:
    """Record the recorded images' queries (n, heads, Nq, d) against the concepts' keys, beside the prompt's
    `key` (n, heads, T, d) and additive `mask` (n, heads, 1 or Nq, T): "joint", the softmax over the prompt's
    tokens and the concepts (the concept columns kept); "concepts-only", the softmax over the concepts alone.
    Nothing here reaches the layer's output. A layer's concept keys are computed once per call (the concept
    states do not change between steps). Without gradients, unless `concepts.requires_grad` (the trainer's
    concept grounding, `tiny/train.py`)."""
    with torch.set_grad_enabled(concepts.requires_grad):
        concept_key = concepts.cache.get(layer)
        if concept_key is None:
            states = concepts.states.to(device=key.device, dtype=attn.to_k.weight.dtype)
            if attn.norm_cross:
                states = attn.norm_encoder_hidden_states(states)
            concept_key = attn.to_k(states)
            concept_key = concept_key.view(1, -1, attn.heads, key.shape[-1]).transpose(1, 2)  # (1, heads, Tc, d)
            if attn.norm_k is not None:
                concept_key = attn.norm_k(concept_key)
            concepts.cache[layer] = concept_key
        concept_key = concept_key.to(key.dtype).expand(query.shape[0], -1, -1, -1)
        stores = concepts.stores
        if "joint" in stores:
            joint_mask = None if mask is None else F.pad(mask, (0, concept_key.shape[2]))
            stores["joint"].record_attention(layer, query, torch.cat([key, concept_key], dim=2), joint_mask, scale,
                                             columns=(key.shape[2], None))
        if "concepts-only" in stores:
            stores["concepts-only"].record_attention(layer, query, concept_key, None, scale)


def _weights_kwarg(steering: Steering | None) -> dict:
    """`record_attention`'s token_weights argument: only when reweighting (duck-typed stores lack it)."""
    if steering is None or steering.token_weights is None:
        return {}
    return {"token_weights": steering.token_weights}


def _to_batch_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B * heads, N, d), the layout of Diffusers' `head_to_batch_dim`."""
    return t.reshape(-1, t.shape[-2], t.shape[-1])


class UNetFamily(Family):
    """`UNet2DConditionModel`: cross-attention `attn2` layers; maps on the UNet's levels."""

    name = "unet"
    description = "UNet2DConditionModel (SD 1.x, 2.x, SDXL)"
    denoiser_attr = "unet"
    model_classes = ("UNet2DConditionModel",)
    layer_kind = "cross-attention"
    uniform_attention = True

    def is_text_layer(self, name: str, module) -> bool:
        return bool(getattr(module, "is_cross_attention", name.endswith("attn2")))

    def token_grid(self, latent_hw, num_queries):
        return layer_hw(latent_hw, num_queries)

    def layer_sizes(self, latent_hw=None, names=None) -> dict[str, tuple[int, int]]:
        """Map size (h, w) of each cross-attention layer for a latent of `latent_hw` (default: the UNet's
        `sample_size`), read from the UNet's blocks: every down block with a downsampler halves the size
        (rounding up, like Diffusers' stride-2 convolution), every up block with an upsampler doubles it back."""
        unet = self.model
        h, w = self.latent_hw(latent_hw)
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
        for name in self.layers() if names is None else names:
            prefix = next((p for p in levels if name.startswith(p)), None)
            if prefix is not None:
                sizes[name] = level_sizes[max(levels[prefix], 0)]
        return sizes

    def step_input(self, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        return tuple(sample.shape[-2:]), timestep

    def processor(self, store, layer, mode="exact", original=None, steering=None):
        """Replace Diffusers' default processor; wrap or refuse any other (IP-Adapter, xformers, ...: `compose`)."""
        if original is None:
            return CaptureProcessor(store, layer, mode, steering)
        from ..compose import unet_processor

        return unet_processor(store, layer, mode, original, steering)

    @contextmanager
    def concept_recorder(self, pipe, store, names, kind=None, template=None):
        """Encode the concepts with the pipeline's own `encode_prompt` (SDXL: both encoders, joined per token, as
        the prompt is) and record them beside `store` in every recording processor (`record_concepts`)."""
        from ..concepts import (DEFAULT_TEMPLATE, Concepts, attach, check_template, concept_text,
                                concept_token_positions)

        kind = CONCEPT_KINDS[0] if kind is None else kind
        if kind not in CONCEPT_KINDS:
            raise ValueError(f"concept map kind {kind!r} is not one of this model's: {', '.join(CONCEPT_KINDS)}")
        template = check_template(DEFAULT_TEMPLATE if template is None else template)
        positions = [concept_token_positions(pipe.tokenizer, c, template) for c in names]
        tokenizer_2 = getattr(pipe, "tokenizer_2", None)
        for c, p in zip(names, positions):
            if tokenizer_2 is not None and concept_token_positions(tokenizer_2, c, template) != p:
                raise ValueError(f"the two tokenizers split concept {c!r} differently; give another word")
        with torch.no_grad():
            embeds = pipe.encode_prompt(prompt=[concept_text(c, template) for c in names],
                                        device=pipe._execution_device, num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)[0]  # (concepts, T, dim)
        states = torch.cat([embeds[i, list(p)] for i, p in enumerate(positions)])[None]  # (1, Tc, dim)
        groups, start = [], 0
        for p in positions:
            groups.append(tuple(range(start, start + len(p))))
            start += len(p)
        attach(store, Concepts.like(store, names, groups, CONCEPT_KINDS, states, default_kind=kind,
                                    template=template))
        yield store.concepts

    def text_positions(self, pipe, prompt, part=None, max_sequence_length=None):
        """The first tokenizer's positions (SDXL joins its two encoders' states position by position)."""
        from ..tokens import align_prompt

        return align_prompt(pipe.tokenizer, prompt)

    def text_conditioning(self, pipe, prompt, size, max_sequence_length=None):
        """`encode_prompt`'s states; SDXL (`addition_embed_type: text_time`) adds the pooled text and the size ids
        its pipeline builds: original size, crop (0, 0), target size."""
        device = self.model.device
        if self.model.config.get("addition_embed_type") == "text_time":
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=embeds.dtype, device=device)
            return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        embeds, _ = pipe.encode_prompt(prompt, device, 1, False)
        return {"encoder_hidden_states": embeds}

    def denoise(self, latents, timestep, conditioning):
        return self.model(latents, timestep, **conditioning, return_dict=False)[0]
