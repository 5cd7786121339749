"""Qwen-Image family (`QwenImagePipeline`): double-stream joint attention over [text; image], Qwen2.5-VL text.

- Every block `transformer_blocks.N.attn` projects the text and the image tokens with their own weights and
  attends over [text; image] (`QwenDoubleStreamAttnProcessor2_0`); there are no single-stream blocks.
- The image tokens are the latent packed in 2x2 patches (as FLUX.1's): the grid is the call's `img_shapes`
  (frames, h, w) of the generated image.
- The text may carry a padding mask (prompts of different lengths in one batch), which the processor turns into a
  boolean mask over the joint keys; the maps use it as the output does.
- Classifier-free guidance ("true CFG", `true_cfg_scale` with a negative prompt) runs the transformer a second
  time on the same latents: that call is not recorded (`FluxFamily.recorded_call`: it runs on Diffusers' own
  processors). `generate`'s guidance is `true_cfg_scale`, with the model card's negative prompt " " when none is
  given.

Text positions: the pipeline formats the prompt into its chat template (a system message, then the user turn),
runs Qwen2.5-VL over it and drops the template's first `prompt_template_encode_start_idx` (34) tokens, keeping the
rest (the prompt, then "<|im_end|>", "<|im_start|>assistant"): the prompt's own tokens are the words.
"""

from __future__ import annotations

import math

import torch

from .base import Recorder, Steering, as_additive, check_mode
from .flux import FluxFamily


class QwenImageCaptureProcessor(Recorder):
    """`QwenDoubleStreamAttnProcessor2_0` plus one call that records the image queries' attention to the text
    tokens (the first `seq_txt` keys of the joint sequence).

    Args:
        store (`MapStore`): the per-call store to record into.
        layer (`str`): this layer's name.
        family (`QwenImageFamily`): the per-call adapter (which rows of this call are recorded).
        steering (`Steering`, *optional*): reweight (through the values); None records only.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, store, layer: str, family: "QwenImageFamily", steering: Steering | None = None):
        self.store = store
        self.layer = layer
        self.family = family
        self.steering = steering

    def __call__(
        self,
        attn,
        hidden_states: torch.FloatTensor,  # Image stream
        encoder_hidden_states: torch.FloatTensor = None,  # Text stream
        encoder_hidden_states_mask: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.FloatTensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if encoder_hidden_states is None:
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 requires encoder_hidden_states (text stream)")

        if attention_mask is not None:
            raise ValueError(
                "QwenDoubleStreamAttnProcessor2_0 does not accept an external attention_mask. "
                "Pass encoder_hidden_states_mask to let the processor build the joint mask."
            )

        if encoder_hidden_states_mask is not None:
            seq_img = hidden_states.shape[1]
            image_mask = torch.ones((hidden_states.shape[0], seq_img), dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)
            attention_mask = attention_mask[:, None, None, :]

        seq_txt = encoder_hidden_states.shape[1]

        # Compute QKV for image stream (sample projections)
        img_query = attn.to_q(hidden_states)
        img_key = attn.to_k(hidden_states)
        img_value = attn.to_v(hidden_states)

        # Compute QKV for text stream (context projections)
        txt_query = attn.add_q_proj(encoder_hidden_states)
        txt_key = attn.add_k_proj(encoder_hidden_states)
        txt_value = attn.add_v_proj(encoder_hidden_states)

        head_dim = attn.inner_dim // attn.heads
        img_query = img_query.unflatten(-1, (-1, head_dim))
        img_key = img_key.unflatten(-1, (-1, head_dim))
        img_value = img_value.unflatten(-1, (-1, head_dim))

        txt_query = txt_query.unflatten(-1, (-1, head_dim))
        txt_key = txt_key.unflatten(-1, (-1, head_dim))
        txt_value = txt_value.unflatten(-1, (-1, head_dim))

        # Apply QK normalization
        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)

        # Apply RoPE
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)

        # Concatenate for joint attention
        # Order: [text, image]
        joint_query = torch.cat([txt_query, img_query], dim=1)
        joint_key = torch.cat([txt_key, img_key], dim=1)
        joint_value = torch.cat([txt_value, img_value], dim=1)

        rec = self.family.recorded(self.store, joint_query.shape[0])
        recording = rec.stop > rec.start
        if self.steering is not None and recording:  # reweight: sum_j p_j w_j v_j = SDPA(Q, K, w * V)
            joint_value = self.steering.scale_values(joint_value.transpose(1, 2), rec, (0, seq_txt)).transpose(1, 2)

        joint_hidden_states = dispatch_attention_fn(
            joint_query,
            joint_key,
            joint_value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )

        # Reshape back
        joint_hidden_states = joint_hidden_states.flatten(2, 3)
        joint_hidden_states = joint_hidden_states.to(joint_query.dtype)
        if recording:
            mask = None if attention_mask is None else as_additive(attention_mask[rec], joint_query.dtype)
            kwargs = {} if self.steering is None or self.steering.token_weights is None else {
                "token_weights": self.steering.token_weights}
            self.store.record_attention(self.layer, img_query[rec].transpose(1, 2), joint_key[rec].transpose(1, 2),
                                        mask, 1 / math.sqrt(head_dim), columns=(0, seq_txt), **kwargs)

        # Split attention outputs back
        txt_attn_output = joint_hidden_states[:, :seq_txt, :]  # Text part
        img_attn_output = joint_hidden_states[:, seq_txt:, :]  # Image part

        # Apply output projections
        img_attn_output = attn.to_out[0](img_attn_output.contiguous())
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)  # dropout

        txt_attn_output = attn.to_add_out(txt_attn_output.contiguous())

        return img_attn_output, txt_attn_output


class QwenImageFamily(FluxFamily):
    """`QwenImageTransformer2DModel`: double-stream [text; image] blocks on FLUX.1's 2x2-packed grid."""

    name = "qwenimage"
    description = "QwenImageTransformer2DModel (Qwen-Image)"
    model_classes = ("QwenImageTransformer2DModel",)

    def step_input(self, args, kwargs):
        names = ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "img_shapes")
        given = dict(zip(names, args), **kwargs)
        shapes = given.get("img_shapes")
        if shapes:  # per image: [(frames, h, w), ...], the generated image first
            first = shapes[0][0] if isinstance(shapes[0], list) else shapes[0]
            latent_hw = (int(first[1]) * self.pack, int(first[2]) * self.pack)
        else:
            latent_hw = self.latent_hint
        return tuple(latent_hw), given.get("timestep")

    def processor(self, store, layer, mode="exact", original=None, steering=None):
        check_mode(mode)
        if mode != "exact":
            raise ValueError("Qwen-Image layers record in exact mode only (explicit mode and edit are not "
                             "available for Qwen-Image yet); use mode='exact'")
        return QwenImageCaptureProcessor(store, layer, self, steering)

    def text_parts(self, pipe) -> list[str]:
        return ["llm"]

    def text_positions(self, pipe, prompt, part=None, max_sequence_length=None):
        """The prompt's words at their positions in the text sequence: the template-formatted prompt tokenized as
        `_get_qwen_prompt_embeds` does, less its first `prompt_template_encode_start_idx` tokens, cut at
        `max_sequence_length`."""
        from ..tokens import align_in_text

        if part not in (None, "llm"):
            raise ValueError(f"text part {part!r} is not in this pipeline; use llm")
        template, drop = pipe.prompt_template_encode, int(pipe.prompt_template_encode_start_idx)
        text = template.format(prompt)
        enc = pipe.tokenizer(text, max_length=pipe.tokenizer_max_length + drop, truncation=True,
                             return_offsets_mapping=True)
        keep = list(range(drop, len(enc["input_ids"])))[:self.max_sequence_length(pipe, max_sequence_length)]
        return align_in_text(pipe.tokenizer, prompt, text, template.index("{}"), enc, keep)

    def guidance_kwargs(self, pipe, guidance_scale, negative_prompt):
        """Qwen-Image's guidance is "true CFG" (`true_cfg_scale`, only with a negative prompt: the model card's
        " " when none is given); `guidance_scale` is for guidance-distilled models only."""
        kwargs = {"true_cfg_scale": guidance_scale}
        if getattr(self.model.config, "guidance_embeds", False):
            kwargs["guidance_scale"] = guidance_scale
        if negative_prompt is None and guidance_scale > 1:
            kwargs["negative_prompt"] = " "
        return kwargs
