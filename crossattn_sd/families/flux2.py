"""FLUX.2 family (`Flux2Pipeline`, `Flux2KleinPipeline`): Flux's [text; image] joint attention, FLUX.2's blocks.

- Double-stream blocks `transformer_blocks.N.attn` (`Flux2Attention`) attend over [text; image] like FLUX.1's.
- Single-stream blocks `single_transformer_blocks.N.attn` (`Flux2ParallelSelfAttention`) receive the joined
  [text; image] sequence with no encoder states and no text length (their block knows `text_seq_len`, the
  attention does not): the text length is read from the transformer call's `encoder_hidden_states` at each step.
- The pipeline patchifies the VAE latent in 2x2 patches before the transformer, so the token grid is
  (latent h // 2, latent w // 2) as for FLUX.1, read from the call's `img_ids` (t, h, w, l) rows with t = 0 (the
  generated image; reference images have t > 0 and are appended after it: only the generated image's queries
  are recorded, over the whole key sequence).

- Klein base models (`is_distilled=False`) with guidance > 1 run classifier-free guidance as a second transformer
  call per step on the same latents with the negative prompt: as FLUX.1's true CFG, that call runs Diffusers'
  own processors and is not recorded (the batch is never [unconditional, conditional]).

The processors are Diffusers' `Flux2AttnProcessor` and `Flux2ParallelSelfAttnProcessor` with their attention
call replaced by `FluxRecorder.attend` (records; exact or explicit mode; reweight and edit, see `flux.py`).
Text positions: the text encoder's (Qwen3 for Klein, Mistral 3 for FLUX.2 [dev]) over the pipeline's chat
template, `max_sequence_length` of them; only the prompt's own tokens are words.
Not covered: the KV-cache processors of `Flux2KleinKVPipeline`.
"""

from __future__ import annotations

import torch

from .flux import FluxFamily, FluxRecorder, joint_qkv


class Flux2CaptureProcessor(FluxRecorder):
    """`Flux2AttnProcessor` (double-stream blocks) with its attention call replaced by `FluxRecorder.attend`."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections

        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb,
                                      _get_qkv_projections)
        hidden_states = self.attend(query, key, value, attention_mask, encoder_hidden_states)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        else:
            return hidden_states


class Flux2SingleCaptureProcessor(FluxRecorder):
    """`Flux2ParallelSelfAttnProcessor` (single-stream blocks: QKV fused with the MLP's input) with its attention
    call replaced by `FluxRecorder.attend`; the text length comes from the step's call."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb

        # Parallel in (QKV + MLP in) projection
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)

        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)

        # Handle the attention logic
        query, key, value = qkv.chunk(3, dim=-1)

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self.attend(query, key, value, attention_mask, None)  # the joined [text; image]
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        # Handle the feedforward (FF) logic
        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)

        # Concatenate and parallel output projection
        hidden_states = torch.cat([hidden_states, mlp_hidden_states], dim=-1)
        hidden_states = attn.to_out(hidden_states)

        return hidden_states


class Flux2Family(FluxFamily):
    """`Flux2Transformer2DModel`: double-stream [text; image] and parallel single-stream blocks; 2x2 patches."""

    name = "flux2"
    description = "Flux2Transformer2DModel (FLUX.2 [dev], FLUX.2 [klein])"
    model_classes = ("Flux2Transformer2DModel",)

    call_args = ("hidden_states", "encoder_hidden_states", "timestep", "img_ids")
    processor_classes = (Flux2CaptureProcessor, Flux2SingleCaptureProcessor)

    def default_processors(self):
        from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor

        return (Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor)

    def text_parts(self, pipe) -> list[str]:
        return ["llm"]

    def text_positions(self, pipe, prompt, part=None, max_sequence_length=None):
        if part not in (None, "llm"):
            raise ValueError(f"text part {part!r} is not in this pipeline; use llm")
        tokenizer = getattr(pipe.tokenizer, "tokenizer", pipe.tokenizer)  # FLUX.2 [dev] has a processor
        if hasattr(pipe, "system_message"):  # Flux2Pipeline: a system message, then the prompt
            from diffusers.pipelines.flux2.pipeline_flux2 import format_input

            messages = format_input(prompts=[prompt], system_message=pipe.system_message)[0]
            text = pipe.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        else:  # Flux2KleinPipeline
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True, enable_thinking=False)
        return align_in_template(tokenizer, prompt, text, self.max_sequence_length(pipe, max_sequence_length))


def align_in_template(tokenizer, prompt: str, text: str, max_length: int):
    """Align `prompt`'s words to the tokens of `text`, the chat-template text that holds it, tokenized as the
    pipeline does (`padding="max_length"`, truncated to `max_length`). Template tokens belong to no word."""
    from ..tokens import _WORD_RE, PromptTokens, Word

    base = text.rfind(prompt) if prompt else -1
    enc = tokenizer(text, padding="max_length", max_length=max_length, truncation=True,
                    return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    pad = [i for i, (tid, mask) in enumerate(zip(ids, enc["attention_mask"])) if not mask]
    words, dropped = [], []
    for m in _WORD_RE.finditer(prompt) if base >= 0 else ():
        s, e = base + m.start(), base + m.end()
        idx = tuple(i for i, (t0, t1) in enumerate(offsets) if i not in pad and t0 < e and s < t1)
        if idx and max(offsets[i][1] for i in idx) >= e:
            words.append(Word(m.group(0), idx, m.start(), m.end()))
        else:
            dropped.append(m.group(0))
    return PromptTokens(prompt=prompt, tokens=tuple(tokenizer.convert_ids_to_tokens(ids)), words=tuple(words),
                        dropped_words=tuple(dropped), special_indices={"start": (), "end": (), "pad": tuple(pad)})
