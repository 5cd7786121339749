"""Flux family (FLUX.1): joint attention with the text first, in double- and single-stream blocks.

- Double-stream blocks `transformer_blocks.N.attn` project text (`encoder_hidden_states`) and image with their
  own weights and attend over [text; image].
- Single-stream blocks `single_transformer_blocks.N.attn` receive [text; image] already joined as
  `hidden_states`, with no encoder states; the text length is read from the transformer call (its
  `encoder_hidden_states`) at the start of each step.
- The image tokens are the latent packed in 2x2 patches: the token grid is (latent h // 2, latent w // 2),
  read from the call's `img_ids` (row and column of each token), or from the call's latent size when the ids
  have no values (meta tensors).

`FluxCaptureProcessor` is Diffusers' `FluxAttnProcessor` plus one store call: the image queries' share of the
softmax over the whole joint key sequence going to each text token (see `sd3.py`), computed on the side in
chunks. Text positions: T5's (`tokenizer_2`), `max_sequence_length` of them.
"""

from __future__ import annotations

import math

import torch

from .base import Family, Recorder, Steering, check_mode


class FluxCaptureProcessor(Recorder):
    """`FluxAttnProcessor` plus one call that records the image queries' attention to the text tokens.

    Args:
        store (`MapStore`): the per-call store to record into.
        layer (`str`): this layer's name.
        family (`FluxFamily`): the per-call adapter, which knows the current call's text length.
        steering (`Steering`, *optional*): reweight (through the values); None records only.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, store, layer: str, family: "FluxFamily", steering: Steering | None = None):
        self.store = store
        self.layer = layer
        self.family = family
        self.steering = steering

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
        rec = self.store.conditional(query.shape[0])
        if self.steering is not None:  # reweight: sum_j p_j w_j v_j = SDPA(Q, K, w * V); (B, N, heads, d)
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
        kwargs = {} if self.steering is None or self.steering.token_weights is None else {
            "token_weights": self.steering.token_weights}
        self.store.record_attention(self.layer, query[rec, num_text:].transpose(1, 2), key[rec].transpose(1, 2),
                                    None, 1 / math.sqrt(query.shape[-1]), columns=(0, num_text), **kwargs)

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


class FluxFamily(Family):
    """`FluxTransformer2DModel`: double-stream [text; image] and single-stream blocks; 2x2-packed latents."""

    name = "flux"
    description = "FluxTransformer2DModel (FLUX.1)"
    denoiser_attr = "transformer"
    model_classes = ("FluxTransformer2DModel",)
    layer_kind = "joint-attention"
    pack = 2  # FluxPipeline packs 2x2 latent patches into one token

    def __init__(self, model):
        super().__init__(model)
        self.num_text = 0  # this call's text length (set at each step, read by single-stream blocks)

    def is_text_layer(self, name: str, module) -> bool:
        return name.startswith(("transformer_blocks.", "single_transformer_blocks.")) and name.endswith(".attn")

    def native_latent_size(self) -> int:
        return 128  # FluxPipeline.default_sample_size (1024 px with the VAE's factor 8)

    def token_grid(self, latent_hw, num_queries):
        h, w = latent_hw[0] // self.pack, latent_hw[1] // self.pack
        if h * w != num_queries:
            raise ValueError(f"cannot place {num_queries} image tokens on a {latent_hw[0]}x{latent_hw[1]} latent "
                             f"packed in {self.pack}x{self.pack} patches")
        return h, w

    def layer_sizes(self, latent_hw=None, names=None):
        h, w = self.latent_hw(latent_hw)
        return {name: (h // self.pack, w // self.pack) for name in (self.layers() if names is None else names)}

    def step_input(self, args, kwargs):
        names = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids")
        given = dict(zip(names, args), **kwargs)
        text = given.get("encoder_hidden_states")
        self.num_text = 0 if text is None else int(text.shape[1])
        ids = given["img_ids"]
        if ids.is_meta:  # shapes only: the latent size the call was installed for
            latent_hw = self.latent_hint
        else:
            ids = ids.reshape(-1, ids.shape[-1])
            latent_hw = (int(ids[:, 1].max()) + 1) * self.pack, (int(ids[:, 2].max()) + 1) * self.pack
        return tuple(latent_hw), given.get("timestep")

    def processor(self, store, layer, mode="exact", original=None, steering=None):
        check_mode(mode)
        if mode != "exact":
            raise ValueError("Flux layers record in exact mode only (explicit mode and edit are not available "
                             "for Flux yet); use mode='exact'")
        return FluxCaptureProcessor(store, layer, self, steering)

    def text_parts(self, pipe) -> list[str]:
        return ["t5"]

    def text_positions(self, pipe, prompt, part=None, max_sequence_length=None):
        from ..tokens import align_prompt

        if part not in (None, "t5"):
            raise ValueError(f"text part {part!r} is not in this pipeline; use t5")
        return align_prompt(pipe.tokenizer_2, prompt, self.max_sequence_length(pipe, max_sequence_length))

    @staticmethod
    def max_sequence_length(pipe, value: int | None = None) -> int:
        from .sd3 import SD3Family

        return SD3Family.max_sequence_length(pipe, value)

    def pipeline_kwargs(self, pipe, max_sequence_length=None):
        return {"max_sequence_length": self.max_sequence_length(pipe, max_sequence_length)}
