"""Flux family (FLUX.1): joint attention with the text first, in double- and single-stream blocks.

- Double-stream blocks `transformer_blocks.N.attn` project text (`encoder_hidden_states`) and image with their
  own weights and attend over [text; image].
- Single-stream blocks `single_transformer_blocks.N.attn` receive [text; image] already joined as
  `hidden_states`, with no encoder states; the text length is read from the transformer call (its
  `encoder_hidden_states`) at the start of each step.
- The image tokens are the latent packed in 2x2 patches: the token grid is (latent h // 2, latent w // 2),
  read from the call's `img_ids` rows (t, row, column) with t = 0, the generated image (Kontext appends
  reference-image tokens with t = 1 after it: only the generated image's queries are recorded, over the whole
  key sequence), or from the call's latent size when the ids have no values (meta tensors).
- True classifier-free guidance (`true_cfg_scale > 1` with a negative prompt) calls the transformer a second
  time per step on the same latents with the negative prompt: that call runs Diffusers' own processors and is
  not recorded (nor steered), so the maps are the conditional prompt's.
- A layer whose processor is not Diffusers' default (an IP-Adapter's `FluxIPAdapterAttnProcessor`) keeps it under
  exact capture and is not recorded (a warning says so); steering and explicit mode refuse it by name.

`FluxRecorder.attend` is the one step every FLUX.1 and FLUX.2 processor shares, in place of Diffusers'
`dispatch_attention_fn(query, key, value, attn_mask=attention_mask)`: in exact mode that same call, plus the
image queries' share of the softmax over the whole joint key sequence going to each text token (see `sd3.py`),
computed on the side in chunks with the same attention mask; in explicit mode softmax(Q K^T + mask) V spelled out,
steered (reweight, prompt-to-prompt edit) and recorded. `FluxCaptureProcessor` is Diffusers' `FluxAttnProcessor`
with that one call. Text positions: T5's (`tokenizer_2`), `max_sequence_length` of them.
"""

from __future__ import annotations

import math
import weakref

import torch

from .base import Family, PatchGrid, Recorder, Steering, additive_mask, check_mode, joint_steer, weights_kwarg


class FluxRecorder(Recorder):
    """The attention step of the FLUX.1 and FLUX.2 processors, over the joint [text; image] sequence.

    Args:
        store (`MapStore`): the per-call store to record into.
        layer (`str`): this layer's name.
        family (`FluxFamily`): the per-call adapter, which knows the current call's text and image lengths.
        mode (`str`): "exact" (Diffusers' attention call, bit-identical images) or "explicit" (probs @ V).
        steering (`Steering`, *optional*): reweight / edit; None records only.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, store, layer: str, family: "FluxFamily", mode: str = "exact",
                 steering: Steering | None = None):
        check_mode(mode)
        self.store = store
        self.layer = layer
        self.family = family
        self.mode = mode
        self.steering = steering

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, encoder_hidden_states: torch.Tensor | None) -> torch.Tensor:
        """Attention over the joint sequence, recorded; query, key, value and the result are (B, N, heads, d)."""
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        # [text; image (; reference images)]; a single-stream block's text length comes from the call
        num_text = self.family.num_text if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        text, image = slice(0, num_text), slice(num_text, num_text + self.family.num_image)
        rec = self.store.conditional(query.shape[0])
        steering = self.steering
        if self.mode == "explicit" or (steering is not None and steering.needs_probs(self.store)):
            return self._explicit(query, key, value, attention_mask, rec, text, image)
        if steering is not None:  # reweight: sum_j p_j w_j v_j = SDPA(Q, K, w * V); (B, heads, N, d)
            value = steering.scale_values(value.transpose(1, 2), rec, (0, num_text)).transpose(1, 2)

        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        mask = additive_mask(attention_mask, rec, image, key.shape[1], query.dtype)
        self.store.record_attention(self.layer, query[rec, image].transpose(1, 2), key[rec].transpose(1, 2), mask,
                                    1 / math.sqrt(query.shape[-1]), columns=(0, num_text), **weights_kwarg(steering))
        return hidden_states

    def _explicit(self, query, key, value, attention_mask, rec: slice, text: slice, image: slice) -> torch.Tensor:
        """softmax(Q K^T / sqrt(d) + mask) V spelled out, with the image->text block steered and recorded."""
        query, key, value = (x.transpose(1, 2) for x in (query, key, value))  # (B, heads, N, d)
        batch_size, heads, n = query.shape[:3]
        scores = torch.matmul(query, key.transpose(-1, -2)).mul_(1 / math.sqrt(query.shape[-1]))
        if attention_mask is not None:
            scores = scores + additive_mask(attention_mask, slice(0, batch_size), slice(0, n), n, scores.dtype)
        probs = scores.softmax(dim=-1).reshape(batch_size * heads, n, n)
        if self.steering is not None:
            probs = joint_steer(probs, self.steering, rec, heads, image, text, self.store)
        self.store.record(self.layer, probs[rec.start * heads: rec.stop * heads, image, text], heads)
        return torch.matmul(probs.view(batch_size, heads, n, n), value).transpose(1, 2)


def joint_qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
              image_rotary_emb, get_qkv_projections) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value (B, N, heads, d) of a double-stream block over the joined [text; image] sequence,
    normalised and rotated: the lines Diffusers' `FluxAttnProcessor` and `Flux2AttnProcessor` share before their
    attention call, with the model's own `_get_qkv_projections` (`transformer_flux` or `transformer_flux2`)."""
    from diffusers.models.embeddings import apply_rotary_emb

    query, key, value, encoder_query, encoder_key, encoder_value = get_qkv_projections(
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

    return query, key, value


class FluxCaptureProcessor(FluxRecorder):
    """`FluxAttnProcessor` with its attention call replaced by `FluxRecorder.attend` (records the image queries'
    attention to the text tokens)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb,
                                      _get_qkv_projections)
        hidden_states = self.attend(query, key, value, attention_mask, encoder_hidden_states)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

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


class FluxFamily(PatchGrid, Family):
    """`FluxTransformer2DModel`: double-stream [text; image] and single-stream blocks; 2x2-packed latents."""

    name = "flux"
    description = "FluxTransformer2DModel (FLUX.1)"
    denoiser_attr = "transformer"
    model_classes = ("FluxTransformer2DModel",)
    layer_kind = "joint-attention"
    batched_guidance = False  # true CFG is a second transformer call (not recorded, see `recorded_call`)
    pack = 2  # FluxPipeline packs 2x2 latent patches into one token
    call_args = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids")
    processor_classes: tuple[type, type] = (FluxCaptureProcessor, FluxCaptureProcessor)  # (double, single)

    def __init__(self, model):
        super().__init__(model)
        self.num_text = 0  # this call's text length (set at each step, read by single-stream blocks)
        self.num_image = 0  # this call's generated-image token count (reference images follow it)
        self._latents = None  # a weak reference to the last call's `hidden_states`

    def is_text_layer(self, name: str, module) -> bool:
        return name.startswith(("transformer_blocks.", "single_transformer_blocks.")) and name.endswith(".attn")

    def native_latent_size(self) -> int:
        return 128  # FluxPipeline.default_sample_size (1024 px with the VAE's factor 8)

    @property
    def patch(self) -> int:
        return self.pack  # the grid of 2x2-packed latent patches

    def recorded_call(self, args, kwargs):
        """A second call on the very same latents tensor as the call before it is guidance's negative-prompt
        call (FluxPipeline's and Flux2KleinPipeline's true CFG: the conditional call comes first): not recorded."""
        latents = args[0] if args else kwargs.get("hidden_states")
        again = self._latents is not None and self._latents() is latents
        self._latents = weakref.ref(latents)  # (a weak reference: a result's store must not keep the latents)
        return not again

    def step_input(self, args, kwargs):
        given = dict(zip(self.call_args, args), **kwargs)
        text = given.get("encoder_hidden_states")
        self.num_text = 0 if text is None else int(text.shape[1])
        ids = given["img_ids"]
        if ids.is_meta:  # shapes only: the latent size the call was installed for
            latent_hw = self.latent_hint
        else:
            ids = ids.reshape(-1, ids.shape[-1])
            ids = ids[ids[:, 0] == 0]  # (t, row, column, ...): t = 0 is the generated image
            latent_hw = (int(ids[:, 1].max()) + 1) * self.pack, (int(ids[:, 2].max()) + 1) * self.pack
        self.num_image = (latent_hw[0] // self.pack) * (latent_hw[1] // self.pack)
        return tuple(latent_hw), given.get("timestep")

    def default_processors(self) -> tuple[type, ...]:
        """Diffusers' own processors of these layers: the ones ours replace."""
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        return (FluxAttnProcessor,)

    def processor(self, store, layer, mode="exact", original=None, steering=None):
        if self.keeps(layer, original, mode, steering):
            return original
        double, single = self.processor_classes
        return (single if layer.startswith("single_transformer_blocks.") else double)(store, layer, self, mode,
                                                                                       steering)

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
