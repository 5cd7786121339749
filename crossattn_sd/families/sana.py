"""Sana family (`SanaPipeline`): linear self-attention and real cross-attention in each transformer block.

Each `SanaTransformerBlock` has `attn1`, a linear (kernel) self-attention over the image tokens that sees no text
(`SanaLinearAttnProcessor2_0`, left alone), and `attn2`, a cross-attention whose queries are the image tokens
and whose keys and values are the caption's tokens (`SanaAttnProcessor2_0`), as in a UNet's `attn2`:

    out = softmax((W_Q S2)(W_K S1)^T / sqrt(d) + mask) W_V S1

The mask is the caption's padding as a bias (-10000 on padded tokens), applied to the maps as to the output. The
image tokens are the latent's patches in raster order: the token grid is (latent h // patch, latent w // patch).
Guidance is batched as [unconditional, conditional].

Text positions: Gemma 2's. The pipeline prepends its "complex human instruction" to the (lower-cased, stripped)
prompt, tokenizes the whole, and keeps the first token and the last `max_sequence_length - 1`: the prompt's own
tokens are the words; the instruction's tail and the padding belong to no word. `generate` turns Sana's aspect-ratio
binning off so that the image has the size asked for (a multiple of the VAE's factor 32).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

from .base import Family, PatchGrid, Recorder, Steering, check_mode


class SanaCaptureProcessor(Recorder):
    """`SanaAttnProcessor2_0` plus one call that records the image queries' attention to the caption's tokens.

    Args:
        store (`MapStore`): the per-call store to record into.
        layer (`str`): this layer's name.
        mode (`str`): "exact" (SDPA output, bit-identical images) or "explicit" (output = probs @ V).
        steering (`Steering`, *optional*): reweight / edit; None records only.
    """

    def __init__(self, store, layer: str, mode: str = "exact", steering: Steering | None = None):
        check_mode(mode)
        self.store = store
        self.layer = layer
        self.mode = mode
        self.steering = steering

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # scaled_dot_product_attention expects attention_mask shape to be
            # (batch, heads, source_length, target_length)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)  # W_Q S2: the image tokens are the queries

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states

        key = attn.to_k(encoder_hidden_states)  # W_K S1: the caption's states are the keys...
        value = attn.to_v(encoder_hidden_states)  # ...and the values

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, Nq, d)

        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, T, d)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        rec = self.store.conditional(batch_size)  # the conditional half under guidance
        steering = self.steering
        if self.mode == "exact" and not (steering is not None and steering.needs_probs(self.store)):
            if steering is not None:  # reweight: sum_j p_j w_j v_j = SDPA(Q, K, w * V)
                value = steering.scale_values(value, rec, (0, None))
            # the output of sdp = (batch, num_heads, seq_len, head_dim)
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
            kwargs = {} if steering is None or steering.token_weights is None else {
                "token_weights": steering.token_weights}
            self.store.record_attention(self.layer, query[rec], key[rec],
                                        None if attention_mask is None else attention_mask[rec],
                                        1 / math.sqrt(head_dim), **kwargs)
        else:
            hidden_states = self._explicit(query, key, value, attention_mask, rec)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        hidden_states = hidden_states / attn.rescale_output_factor

        return hidden_states

    def _explicit(self, query, key, value, attention_mask, rec: slice) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d) + mask) V spelled out, the probabilities steered and recorded."""
        batch_size, heads = query.shape[:2]
        scores = torch.matmul(query, key.transpose(-1, -2)).mul_(1 / math.sqrt(query.shape[-1]))
        if attention_mask is not None:
            scores = scores + attention_mask
        attention_probs = scores.softmax(dim=-1).reshape(batch_size * heads, *scores.shape[2:])  # (B * heads, Nq, T)
        if self.steering is not None:
            attention_probs = self.steering.steer_probs(attention_probs, rec, heads, self.store)
        self.store.record(self.layer, attention_probs[rec.start * heads: rec.stop * heads], heads)
        return torch.matmul(attention_probs.view(batch_size, heads, *attention_probs.shape[1:]), value)


class SanaFamily(PatchGrid, Family):
    """`SanaTransformer2DModel`: cross-attention `attn2` layers; maps on the patch grid (latent // patch_size)."""

    name = "sana"
    description = "SanaTransformer2DModel (Sana)"
    denoiser_attr = "transformer"
    model_classes = ("SanaTransformer2DModel",)
    layer_kind = "cross-attention"

    def is_text_layer(self, name: str, module) -> bool:
        return name.endswith(".attn2")  # attn1 is the linear self-attention

    def step_input(self, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        timestep = args[2] if len(args) > 2 else kwargs.get("timestep")
        return tuple(hidden_states.shape[-2:]), timestep

    def processor(self, store, layer, mode="exact", original=None, steering=None):
        if original is not None and type(original).__name__ != "SanaAttnProcessor2_0":
            raise ValueError(f"layer {layer} has processor {type(original).__name__}; crossattn-sd records Sana's "
                             "own SanaAttnProcessor2_0 only (load the pipeline without that processor)")
        return SanaCaptureProcessor(store, layer, mode, steering)

    # -- text ----------------------------------------------------------------------------------------------

    def text_parts(self, pipe) -> list[str]:
        return ["gemma"]

    def text_positions(self, pipe, prompt, part=None, max_sequence_length=None):
        """The prompt's words at their positions among the `max_sequence_length` text positions the pipeline keeps
        (`SanaPipeline.encode_prompt`: the first token and the last `max_sequence_length - 1` of the instruction,
        the prompt and the padding)."""
        from ..tokens import align_in_text

        if part not in (None, "gemma"):
            raise ValueError(f"text part {part!r} is not in this pipeline; use gemma")
        length = self.max_sequence_length(pipe, max_sequence_length)
        instruction = _call_default(pipe, "complex_human_instruction", None)
        if instruction:
            prefix = "\n".join(instruction)
            total = len(pipe.tokenizer.encode(prefix)) + length - 2
        else:
            prefix, total = "", length
        text = prefix + prompt.lower().strip()  # `_text_preprocessing` without `clean_caption`
        enc = pipe.tokenizer(text, padding="max_length", max_length=total, truncation=True, add_special_tokens=True,
                             return_offsets_mapping=True, padding_side="right")  # as `encode_prompt` sets it
        keep = [0] + list(range(total - length + 1, total))  # select_index = [0] + range(-length + 1, 0)
        lead = len(prompt) - len(prompt.lstrip())  # stripped
        return align_in_text(pipe.tokenizer, prompt, text, len(prefix) - lead, enc, keep, start=(0,))

    @staticmethod
    def max_sequence_length(pipe, value: int | None = None) -> int:
        return int(value) if value is not None else int(_call_default(pipe, "max_sequence_length", 300))

    def pipeline_kwargs(self, pipe, max_sequence_length=None):
        return {"max_sequence_length": self.max_sequence_length(pipe, max_sequence_length),
                "use_resolution_binning": False}


def _call_default(pipe, name: str, fallback):
    """The default of the pipeline call's argument `name`."""
    param = inspect.signature(type(pipe).__call__).parameters.get(name)
    return fallback if param is None or param.default is inspect.Parameter.empty else param.default
