"""Z-Image family (`ZImagePipeline`): a single-stream DiT over one unified [image; caption] sequence per sample.

- `noise_refiner.N.attention` attends over the image tokens only and `context_refiner.N.attention` over the caption
  only: neither sees both, so both keep their processors. The main layers `layers.N.attention` attend over the
  unified sequence [image tokens, image padding, caption tokens, caption padding]: the image and the caption are
  each padded to a multiple of 32 tokens (learned pad tokens, attended to), and the samples of a batch are padded
  to the longest with a boolean mask, which the maps use as the output does.
- The image tokens are the latent in patches (2 x 2 by default): the grid is (latent h // p, latent w // p), read
  from each call's latents. The recorded queries are the image's own tokens, over every key; the recorded keys are
  the caption's, from its first token to the end of the longest recorded caption.
- Guidance is batched as [conditional, unconditional] on copies of the same latents (`latents.repeat(2, ...)`):
  a call whose two halves hold equal latents is recorded from its first half.
- The model has no `attn_processors` / `set_attn_processor` (it lacks Diffusers' `AttentionMixin`): nothing
  changes, as every family reads and sets processors through each attention layer's public `get_processor` /
  `set_processor` (`Family.attn_processors`).

Text positions: Qwen3's over the pipeline's chat template (`enable_thinking=True`), the template's tokens included:
the pipeline keeps the unpadded tokens, and the transformer pads them to a multiple of 32. The prompt's own tokens
are the words.
"""

from __future__ import annotations

import math

import torch

from .base import Family, PatchGrid, Recorder, Steering, as_additive, check_mode

SEQ_MULTI_OF = 32  # the transformer pads the image and the caption to a multiple of this (`transformer_z_image`)


def _padded(n: int) -> int:
    return n + (-n) % SEQ_MULTI_OF


class ZImageCaptureProcessor(Recorder):
    """`ZSingleStreamAttnProcessor` plus one call that records the image queries' attention to the caption tokens
    of the unified [image; caption] sequence.

    Args:
        store (`MapStore`): the per-call store to record into.
        layer (`str`): this layer's name.
        family (`ZImageFamily`): the per-call adapter (where the image and the caption sit in this call).
        steering (`Steering`, *optional*): reweight (through the values); None records only.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, store, layer: str, family: "ZImageFamily", steering: Steering | None = None):
        self.store = store
        self.layer = layer
        self.family = family
        self.steering = steering

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        query = query.unflatten(-1, (attn.heads, -1))
        key = key.unflatten(-1, (attn.heads, -1))
        value = value.unflatten(-1, (attn.heads, -1))

        # Apply Norms
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # Apply RoPE
        def apply_rotary_emb(x_in: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
            with torch.amp.autocast("cuda", enabled=False):
                x = torch.view_as_complex(x_in.float().reshape(*x_in.shape[:-1], -1, 2))
                freqs_cis = freqs_cis.unsqueeze(2)
                x_out = torch.view_as_real(x * freqs_cis).flatten(3)
                return x_out.type_as(x_in)  # todo

        if freqs_cis is not None:
            query = apply_rotary_emb(query, freqs_cis)
            key = apply_rotary_emb(key, freqs_cis)

        # Cast to correct dtype
        dtype = query.dtype
        query, key = query.to(dtype), key.to(dtype)

        # From [batch, seq_len] to [batch, 1, 1, seq_len] -> broadcast to [batch, heads, seq_len, seq_len]
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]

        family = self.family
        rec = family.recorded(self.store, query.shape[0])
        text = (family.text_start, family.text_start + family.num_text)  # the caption's keys
        if self.steering is not None:  # reweight: sum_j p_j w_j v_j = SDPA(Q, K, w * V); (B, N, heads, d)
            value = self.steering.scale_values(value.transpose(1, 2), rec, text).transpose(1, 2)

        # Compute joint attention
        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )

        # Reshape back
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(dtype)
        mask = None if attention_mask is None else as_additive(attention_mask[rec], dtype)
        kwargs = {} if self.steering is None or self.steering.token_weights is None else {
            "token_weights": self.steering.token_weights}
        self.store.record_attention(self.layer, query[rec, :family.num_image].transpose(1, 2),
                                    key[rec].transpose(1, 2), mask, 1 / math.sqrt(query.shape[-1]), columns=text,
                                    **kwargs)

        output = attn.to_out[0](hidden_states)
        if len(attn.to_out) > 1:  # dropout
            output = attn.to_out[1](output)

        return output


class ZImageFamily(PatchGrid, Family):
    """`ZImageTransformer2DModel`: the main layers over [image; caption]; maps on the patch grid."""

    name = "zimage"
    description = "ZImageTransformer2DModel (Z-Image)"
    denoiser_attr = "transformer"
    model_classes = ("ZImageTransformer2DModel",)
    layer_kind = "joint-attention"

    def __init__(self, model):
        super().__init__(model)
        self.num_image = 0  # this call's image tokens, then
        self.text_start = 0  # where its caption starts (the image padded to a multiple of 32)
        self.num_text = 0  # and the longest recorded caption, padded to a multiple of 32
        self.cfg_halves = False  # whether this call's batch is [conditional, unconditional]

    def is_text_layer(self, name: str, module) -> bool:
        return name.startswith("layers.") and name.endswith(".attention")  # not the refiners

    @property
    def patch(self) -> int:
        return int(self.model.config.all_patch_size[0])  # the pipeline calls with the default patch_size=2

    def native_latent_size(self) -> int:
        return 128  # ZImagePipeline's default 1024 px with the VAE's factor 8

    def step_input(self, args, kwargs):
        names = ("x", "t", "cap_feats")
        given = dict(zip(names, args), **kwargs)
        x, captions = list(given["x"]), list(given["cap_feats"])
        if isinstance(x[0], list):
            raise ValueError("Z-Image's omni mode (reference images) is not supported; use ZImagePipeline")
        n = len(x) // 2
        self.cfg_halves = (len(x) % 2 == 0 and not x[0].is_meta
                           and all(torch.equal(x[i], x[i + n]) for i in range(n)))  # latents.repeat(2, ...)
        patch = int(given.get("patch_size", 2))
        frames, (h, w) = x[0].shape[1], x[0].shape[-2:]
        self.num_image = frames * (h // patch) * (w // patch)
        self.text_start = _padded(self.num_image)
        recorded = captions[:n] if self.cfg_halves else captions
        self.num_text = max(_padded(len(c)) for c in recorded)
        return (int(h), int(w)), given.get("t")

    def recorded(self, store, batch: int) -> slice:
        return slice(0, batch // 2) if self.cfg_halves else slice(0, batch)

    def processor(self, store, layer, mode="exact", original=None, steering=None):
        check_mode(mode)
        if mode != "exact":
            raise ValueError("Z-Image layers record in exact mode only (explicit mode and edit are not available "
                             "for Z-Image yet); use mode='exact'")
        return ZImageCaptureProcessor(store, layer, self, steering)

    def text_parts(self, pipe) -> list[str]:
        return ["llm"]

    def text_positions(self, pipe, prompt, part=None, max_sequence_length=None):
        """The prompt's words among the caption's positions: the chat-template text tokenized as `_encode_prompt`
        does, its unpadded tokens (at most `max_sequence_length`), then the transformer's pad tokens up to a
        multiple of 32."""
        from ..tokens import PromptTokens, align_in_text

        if part not in (None, "llm"):
            raise ValueError(f"text part {part!r} is not in this pipeline; use llm")
        text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=True)
        enc = pipe.tokenizer(text, padding="max_length", max_length=self.max_sequence_length(pipe, max_sequence_length),
                             truncation=True, return_offsets_mapping=True)
        keep = [i for i, m in enumerate(enc["attention_mask"]) if m]
        a = align_in_text(pipe.tokenizer, prompt, text, text.rfind(prompt) if prompt else 0, enc, keep)
        pad = _padded(len(keep)) - len(keep)
        return PromptTokens(prompt=a.prompt, tokens=a.tokens + ("<cap_pad>",) * pad, words=a.words,
                            dropped_words=a.dropped_words,
                            special_indices={**a.special_indices, "pad": tuple(range(len(keep), len(keep) + pad))})

    @staticmethod
    def max_sequence_length(pipe, value: int | None = None) -> int:
        from .sd3 import SD3Family

        return SD3Family.max_sequence_length(pipe, value)  # the pipeline call's default (512)

    def pipeline_kwargs(self, pipe, max_sequence_length=None):
        return {"max_sequence_length": self.max_sequence_length(pipe, max_sequence_length)}
