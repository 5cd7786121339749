"""SD3 family (SD3, SD3.5): joint attention over [image; text] in `transformer_blocks.N.attn`.

Each joint layer projects the image tokens (`hidden_states`, the latent's patches in raster order) and the
text tokens (`encoder_hidden_states`) with their own weights and attends over the joined sequence
[image; text] in one softmax. The image queries' rows have an image->text block: a pixel's share of attention
going to each text token, the joint-attention counterpart of a UNet's cross-attention map. `JointCaptureProcessor`
records that block of the softmax over the WHOLE key sequence (its rows sum to less than 1: the rest went to
image tokens), computed on the side in chunks of queries (`maps.text_attention`); the layer's output is
computed exactly as Diffusers' `JointAttnProcessor2_0` computes it.

The last block has `context_pre_only=True` (no text output): it is recorded too. SD3.5's dual-attention blocks
have a second, image-only attention `attn2` that sees no text: it keeps its processor.

A layer whose processor is neither of Diffusers' joint defaults (an IP-Adapter's) keeps it under exact capture,
unrecorded (`Family.keeps`).

Skip-layer guidance (`skip_guidance_layers`) runs an extra transformer call per step on the conditional prompt
with some blocks skipped: that call runs Diffusers' own processors and is not recorded.

Text positions: CLIP's `tokenizer_max_length` positions (the two CLIP encoders joined per position), then T5's
`max_sequence_length` positions (zeros when the pipeline has no T5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Family, PatchGrid, Recorder, Steering, check_mode, joint_steer, weights_kwarg


class JointCaptureProcessor(Recorder):
    """`JointAttnProcessor2_0` plus one call that records the image queries' attention to the text tokens.

    Args:
        store (`MapStore`): the per-call store to record into.
        layer (`str`): this layer's name (its key in `transformer.attn_processors` without ".processor").
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
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        *args,
        **kwargs,
    ) -> torch.FloatTensor:
        residual = hidden_states

        batch_size = hidden_states.shape[0]

        # `sample` projections.
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # `context` projections.
        if encoder_hidden_states is not None:
            encoder_hidden_states_query_proj = attn.add_q_proj(encoder_hidden_states)
            encoder_hidden_states_key_proj = attn.add_k_proj(encoder_hidden_states)
            encoder_hidden_states_value_proj = attn.add_v_proj(encoder_hidden_states)

            encoder_hidden_states_query_proj = encoder_hidden_states_query_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            encoder_hidden_states_key_proj = encoder_hidden_states_key_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            encoder_hidden_states_value_proj = encoder_hidden_states_value_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)

            if attn.norm_added_q is not None:
                encoder_hidden_states_query_proj = attn.norm_added_q(encoder_hidden_states_query_proj)
            if attn.norm_added_k is not None:
                encoder_hidden_states_key_proj = attn.norm_added_k(encoder_hidden_states_key_proj)

            query = torch.cat([query, encoder_hidden_states_query_proj], dim=2)
            key = torch.cat([key, encoder_hidden_states_key_proj], dim=2)
            value = torch.cat([value, encoder_hidden_states_value_proj], dim=2)

        num_image = residual.shape[1]  # the joint sequence is [image; text]
        text = (num_image, None)
        rec = self.store.conditional(batch_size)
        steering = self.steering
        if self.mode == "exact" and not (steering is not None and steering.needs_probs(self.store)):
            if steering is not None:  # reweight: sum_j p_j w_j v_j = SDPA(Q, K, w * V)
                value = steering.scale_values(value, rec, text)
            hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
            hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
            hidden_states = hidden_states.to(query.dtype)
            if encoder_hidden_states is not None:
                self.store.record_attention(self.layer, query[rec, :, :num_image], key[rec], None,
                                            1 / math.sqrt(head_dim), columns=text, **weights_kwarg(steering))
        else:
            hidden_states = self._explicit(query, key, value, num_image, rec, encoder_hidden_states is not None)
            hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
            hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            # Split the attention outputs.
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        else:
            return hidden_states

    def _explicit(self, query, key, value, num_image: int, rec: slice, has_text: bool) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d)) V spelled out, with the image->text block steered and recorded."""
        batch_size, heads = query.shape[:2]
        probs = torch.matmul(query, key.transpose(-1, -2)).mul_(1 / math.sqrt(query.shape[-1])).softmax(dim=-1)
        if has_text:
            probs = probs.reshape(batch_size * heads, *probs.shape[2:])  # (B * heads, N, N)
            if self.steering is not None:
                probs = joint_steer(probs, self.steering, rec, heads, slice(0, num_image), slice(num_image, None),
                                    self.store)
            self.store.record(self.layer, probs[rec.start * heads: rec.stop * heads, :num_image, num_image:], heads)
            probs = probs.view(batch_size, heads, *probs.shape[1:])
        return torch.matmul(probs, value)


class SD3Family(PatchGrid, Family):
    """`SD3Transformer2DModel`: joint [image; text] attention; maps on the patch grid (latent // patch_size)."""

    name = "sd3"
    description = "SD3Transformer2DModel (SD3, SD3.5)"
    denoiser_attr = "transformer"
    model_classes = ("SD3Transformer2DModel",)
    layer_kind = "joint-attention"

    def is_text_layer(self, name: str, module) -> bool:
        return getattr(module, "add_k_proj", None) is not None  # the text projections of a joint layer

    def step_input(self, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        timestep = args[3] if len(args) > 3 else kwargs.get("timestep")
        return tuple(hidden_states.shape[-2:]), timestep

    def recorded_call(self, args, kwargs):
        """Skip-layer guidance's extra call (`skip_layers`: the conditional prompt with some blocks skipped) is
        not recorded: the maps come from the [unconditional, conditional] call of each step."""
        skip_layers = args[7] if len(args) > 7 else kwargs.get("skip_layers")
        return not skip_layers

    def default_processors(self):
        from diffusers.models.attention_processor import FusedJointAttnProcessor2_0, JointAttnProcessor2_0

        return (JointAttnProcessor2_0, FusedJointAttnProcessor2_0)  # ours computes both (unfused projections)

    def processor(self, store, layer, mode="exact", original=None, steering=None):
        if self.keeps(layer, original, mode, steering):  # an IP-Adapter's: kept, unrecorded
            return original
        return JointCaptureProcessor(store, layer, mode, steering)

    def concept_recorder(self, pipe, store, names, kind=None, template=None):
        """ConceptAttention's concept stream through the joint blocks (`concepts_sd3.py`)."""
        from .concepts_sd3 import concept_recorder

        return concept_recorder(self, pipe, store, names, kind, template)

    # -- text ----------------------------------------------------------------------------------------------

    def text_parts(self, pipe) -> list[str]:
        """"t5" first when the pipeline has a T5 encoder (its part holds the whole prompt, up to
        `max_sequence_length` tokens, where CLIP's stops at 77), else "clip" only."""
        has_t5 = getattr(pipe, "text_encoder_3", None) is not None and getattr(pipe, "tokenizer_3", None) is not None
        return ["t5", "clip"] if has_t5 else ["clip"]

    def text_positions(self, pipe, prompt, part=None, max_sequence_length=None):
        """The words of `part` ("clip" or "t5"; default the first of `text_parts`) at their positions in the
        whole text sequence: CLIP's positions, then T5's (or zeros) after them."""
        from ..tokens import align_prompt, offset_alignment

        parts = self.text_parts(pipe)
        part = parts[0] if part is None else part
        if part not in parts:
            raise ValueError(f"text part {part!r} is not in this pipeline; use one of {', '.join(parts)}")
        max_sequence_length = self.max_sequence_length(pipe, max_sequence_length)
        clip = align_prompt(pipe.tokenizer, prompt, getattr(pipe, "tokenizer_max_length", None))
        if "t5" in parts:
            t5 = align_prompt(pipe.tokenizer_3, prompt, max_sequence_length)
            t5_tokens = t5.tokens
        else:
            t5, t5_tokens = None, ("<zeros>",) * max_sequence_length
        tokens = clip.tokens + t5_tokens
        if part == "clip":
            return offset_alignment(clip, 0, tokens)
        return offset_alignment(t5, len(clip.tokens), tokens)

    @staticmethod
    def max_sequence_length(pipe, value: int | None = None) -> int:
        """T5's length: `value`, or the pipeline call's default (256 in Diffusers 0.42)."""
        if value is not None:
            return int(value)
        import inspect

        default = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
        return int(default.default) if default is not None and default.default is not inspect._empty else 256

    def pipeline_kwargs(self, pipe, max_sequence_length=None):
        return {"max_sequence_length": self.max_sequence_length(pipe, max_sequence_length)}

    def text_conditioning(self, pipe, prompt, size, max_sequence_length=None):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=self.model.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length(pipe, max_sequence_length))
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def denoise(self, latents, timestep, conditioning):
        return self.model(hidden_states=latents, timestep=timestep, **conditioning, return_dict=False)[0]
