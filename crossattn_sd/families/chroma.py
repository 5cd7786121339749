"""Chroma family (`ChromaPipeline`): FLUX.1's architecture with a T5 attention mask and guidance as a second call.

- Layers, token grid and the [text; image] joint sequence are FLUX.1's (`flux.py`): double-stream blocks
  `transformer_blocks.N.attn` and single-stream blocks `single_transformer_blocks.N.attn`, 2x2-packed latents.
- The pipeline passes an attention mask over the T5 padding (every padding token but the first is masked), which
  each block turns into a (B, 1, N, N) mask of the joint sequence. The maps are computed with that mask exactly as
  the layer's output is: SDPA adds a float mask to the scores and drops the False keys of a boolean one. (Diffusers
  0.42.1's pipeline hands the blocks a float 0/1 mask, which SDPA adds: padding keys get no boost, the rest +1.)
- Classifier-free guidance runs the transformer a second time on the same latents, after the conditional call,
  with the negative prompt: that call is no step and records nothing (`SeparateGuidance`).

Text positions: T5's (the pipeline's only tokenizer, `tokenizer`), `max_sequence_length` of them (512 by default).
"""

from __future__ import annotations

import math

import torch

from .base import SeparateGuidance, additive_mask, check_mode
from .flux import FluxCaptureProcessor, FluxFamily


class ChromaCaptureProcessor(FluxCaptureProcessor):
    """`FluxAttnProcessor` (Chroma's blocks use it) plus one call that records the image queries' attention to
    the text tokens under the layer's attention mask; the recorded rows come from the family."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))

            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # the joint sequence is [text; image]; a single-stream block's text length comes from the call
        num_text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.family.num_text
        rec = self.family.recorded(self.store, query.shape[0])
        recording = rec.stop > rec.start
        if self.steering is not None and recording:  # reweight: sum_j p_j w_j v_j = SDPA(Q, K, w * V)
            value = self.steering.scale_values(value.transpose(1, 2), rec, (0, num_text)).transpose(1, 2)

        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        if recording:
            self._record(query, key, attention_mask, rec, num_text)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

            return hidden_states, encoder_hidden_states
        else:
            return hidden_states

    def _record(self, query, key, attention_mask, rec, num_text):
        mask = None
        if attention_mask is not None:
            # The block's mask is the outer product m_i * m_j of the per-token mask, and every image token's m_i
            # is 1: each image query's row of the mask is the same, so one row, broadcast, is the whole block.
            rows = attention_mask[rec]
            if rows.shape[-2] > 1:
                rows = rows[:, :, num_text:num_text + 1].clone()
            mask = additive_mask(rows, query.dtype)
        kwargs = {} if self.steering is None or self.steering.token_weights is None else {
            "token_weights": self.steering.token_weights}
        self.store.record_attention(self.layer, query[rec, num_text:].transpose(1, 2), key[rec].transpose(1, 2),
                                    mask, 1 / math.sqrt(query.shape[-1]), columns=(0, num_text), **kwargs)


class ChromaFamily(SeparateGuidance, FluxFamily):
    """`ChromaTransformer2DModel`: FLUX.1's blocks and grid, a mask over the T5 padding, guidance as its own call."""

    name = "chroma"
    description = "ChromaTransformer2DModel (Chroma)"
    model_classes = ("ChromaTransformer2DModel",)

    def step_input(self, args, kwargs):
        names = ("hidden_states", "encoder_hidden_states", "timestep", "img_ids", "txt_ids", "attention_mask")
        given = dict(zip(names, args), **kwargs)
        if self.unconditional_call(given["hidden_states"], given.get("timestep")):
            return None
        return super().step_input((), {k: given.get(k) for k in ("encoder_hidden_states", "timestep", "img_ids")})

    def processor(self, store, layer, mode="exact", original=None, steering=None):
        check_mode(mode)
        if mode != "exact":
            raise ValueError("Chroma layers record in exact mode only (explicit mode and edit are not available "
                             "for Chroma yet); use mode='exact'")
        return ChromaCaptureProcessor(store, layer, self, steering)

    def text_positions(self, pipe, prompt, part=None, max_sequence_length=None):
        from ..tokens import align_prompt

        if part not in (None, "t5"):
            raise ValueError(f"text part {part!r} is not in this pipeline; use t5")
        return align_prompt(pipe.tokenizer, prompt, self.max_sequence_length(pipe, max_sequence_length))
