"""The embedded joint-attention model's components: a toy-size Stable Diffusion 3.

- transformer: SD3Transformer2DModel (MMDiT: text and image tokens in one attention sequence per layer) on the
  shipped VAE's 16 x 16 x 4 latents, patch 2, so an 8 x 8 image-token grid at 64 x 64;
- text encoders: two small CLIPTextModelWithProjection (SD3's pipeline wants two CLIP encoders; their
  penultimate hidden states are concatenated per token, their pooled outputs feed the time embedding), both
  on the UNet model's closed-vocabulary CLIP tokenizer;
- no T5: the pipeline then appends `max_sequence_length` zero tokens after the CLIP ones; the model is trained
  and used with MAX_SEQUENCE_LENGTH = 0 of them (see below);
- VAE: the shipped one (crossattn_sd/tiny/weights/vae), with `shift_factor` 0.0, which SD3's pipeline needs;
- scheduler: FlowMatchEulerDiscreteScheduler with SHIFT.
"""
from __future__ import annotations

from pathlib import Path

from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from . import WEIGHTS_DIR
from .build import BOS, EOS, MAX_LENGTH, build_tokenizer, save_atomically, tokenizer_vocab

# Without a T5 encoder, StableDiffusion3Pipeline.encode_prompt appends max_sequence_length zero states (256 by
# default) after the CLIP tokens: keys that carry nothing but would take attention in every joint layer (and cost
# 256 extra tokens per layer). 0 is accepted by the pipeline (torch.zeros(B, 0, D) concatenates to nothing), so
# the text sequence is exactly the CLIP tokens. The model is trained with this value and must be called with it.
MAX_SEQUENCE_LENGTH = 0

# The flow-matching shift (sigma' = shift * s / (1 + (shift - 1) * s)) moves training and sampling towards high
# noise. The shapes world's objects are large flat blobs, whose low-frequency content survives a lot of noise: the
# layout (what the caption decides: which half, which colour) is settled at high noise and the flat-colour detail
# is easy, so SD3's own 3.0 is kept rather than lowered for the small latent.
SHIFT = 3.0

TEXT_WIDTH = 128  # each CLIP encoder's hidden size; the transformer's joint_attention_dim is twice it


def transformer_config(layers: int = 4, heads: int = 4, head_dim: int = 32, patch_size: int = 2) -> dict:
    """SD3Transformer2DModel arguments; joint dim = heads x head_dim. pos_embed_max_size covers 128 x 128 (a 32 x 32
    latent: 16 x 16 patches of 2, 32 x 32 of 1); at 64 x 64 the centre of the sin-cos table is used."""
    return dict(sample_size=16, patch_size=patch_size, in_channels=4, out_channels=4, num_layers=layers,
                attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=2 * TEXT_WIDTH,
                caption_projection_dim=heads * head_dim, pooled_projection_dim=2 * TEXT_WIDTH,
                pos_embed_max_size=32 // patch_size, qk_norm="rms_norm")


ARCHITECTURES = {  # --arch for `train-tiny --model mmdit`
    "4x128": transformer_config(4, 4, 32),
    "6x128": transformer_config(6, 4, 32),
    "8x96": transformer_config(8, 3, 32),
    "4x128p1": transformer_config(4, 4, 32, patch_size=1),  # a 16 x 16 image-token grid at 64 x 64
    "2x64": transformer_config(2, 2, 32),  # smoke tests
}


def build_transformer(arch: str = "4x128") -> SD3Transformer2DModel:
    return SD3Transformer2DModel(**ARCHITECTURES[arch])


def build_text_encoder(vocab_size: int, layers: int = 4) -> CLIPTextModelWithProjection:
    vocab, _ = tokenizer_vocab()
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                            num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
                            projection_dim=TEXT_WIDTH, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                            pad_token_id=vocab[EOS])
    return CLIPTextModelWithProjection(config)


def load_vae(folder: str | Path = WEIGHTS_DIR / "vae") -> AutoencoderKL:
    """The shipped VAE as float32, with shift_factor 0.0 (SD3's pipeline decodes latents / scaling + shift)."""
    vae = AutoencoderKL.from_pretrained(folder)
    vae.register_to_config(shift_factor=0.0)
    return vae


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)


def make_pipeline(vae, text_encoder, text_encoder_2, transformer, tokenizer=None) -> StableDiffusion3Pipeline:
    tokenizer = tokenizer or build_tokenizer()
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=flow_scheduler(), vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)


def save_pipeline(folder: str | Path, vae, text_encoder, text_encoder_2, transformer, fp16: bool = False) -> Path:
    """Write a folder that `StableDiffusion3Pipeline.from_pretrained` loads offline (atomically)."""
    return save_atomically(make_pipeline(vae, text_encoder, text_encoder_2, transformer), folder, fp16=fp16)
