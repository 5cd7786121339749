"""Chroma (FLUX.1's blocks, a mask over the T5 padding, guidance as a second transformer call): exact images,
maps under the layer's mask on the packed grid, one step per denoising step, words, reweight, and the full
Chroma1-HD transformer on the meta device."""

import numpy as np
import pytest
import torch

from conftest import check_meta_capture, meta_model, tiny_t5_tokenizer
from crossattn_sd import capture, generate
from crossattn_sd.families import ChromaFamily, family_of
from crossattn_sd.families.flux import FluxCaptureProcessor
from crossattn_sd.maps import MapStore
from crossattn_sd.processors import cross_attention_layers, install
from crossattn_sd.steering import ProcessorSpec

PROMPT = "a red circle on the left"
WORDS = ["a", "red", "circle", "on", "the", "left"]
T5_LENGTH = 12
KW = dict(steps=2, guidance_scale=4.0, height=32, width=48, max_sequence_length=T5_LENGTH)


def tiny_chroma_pipeline(seed: int = 0):
    """A seeded random ChromaPipeline (the shapes of Diffusers' ChromaPipelineFastTests): a tiny T5 over
    `tiny_t5_tokenizer`, a transformer with one double- and one single-stream block, 2x2-packed latents (in_channels
    16 from the VAE's 4), flow matching. VAE factor 2, so a 32 x 48 image is an 8 x 12 token grid."""
    from diffusers import AutoencoderKL, ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_t5_tokenizer(T5_LENGTH)
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_hidden_dim=32,
        approximator_layers=1, approximator_num_channels=16,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, shift_factor=0.0,
    )
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=32, num_layers=2,
                                           num_heads=4, pad_token_id=0, eos_token_id=1)).eval()
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_chroma_pipeline()


def run(pipe, height=32, width=48, steps=2, guidance=4.0):
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, negative_prompt="blue", num_inference_steps=steps, guidance_scale=guidance, height=height,
                width=width, generator=generator, output_type="np", max_sequence_length=T5_LENGTH).images


@pytest.mark.parametrize("height,width", [(32, 32), (32, 48)])
def test_exact_images_equal_diffusers_processors_bit_for_bit(pipe, height, width):
    reference = run(pipe, height, width)
    before = dict(pipe.transformer.attn_processors)
    with capture(pipe, per_step=True) as store:
        ours = run(pipe, height, width)
    assert np.abs(ours - reference).max() == 0
    assert store.layers == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    grid = (height // pipe.vae_scale_factor // 2, width // pipe.vae_scale_factor // 2)  # 2x2-packed latents
    assert {store.layer_shape(l) for l in store.layers} == {grid}
    # guidance's second call (the negative prompt, on the same latents) is no step and records nothing
    assert store.num_steps == 2 and len(store.steps) == 2 and store.counts[store.layers[0]] == 2
    assert all(p is before[k] for k, p in pipe.transformer.attn_processors.items())


def test_processors_restored_after_an_exception(pipe):
    before = dict(pipe.transformer.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(pipe):
            assert isinstance(pipe.transformer.attn_processors["transformer_blocks.0.attn.processor"],
                              FluxCaptureProcessor)
            raise RuntimeError("boom")
    assert all(p is before[k] for k, p in pipe.transformer.attn_processors.items())


def brute_force_single_stream(pipe, store_kwargs=None):
    """The single-stream layer's recorded map and a reference from its own modules and its own attention mask:
    the image queries' softmax over all keys (scores plus the mask, as SDPA applies it), text columns only."""
    from diffusers.models.embeddings import apply_rotary_emb

    layer = "single_transformer_blocks.0.attn"
    attn = pipe.transformer.get_submodule(layer)
    grabbed = []
    hook = attn.register_forward_pre_hook(
        lambda m, args, kwargs: grabbed.append((kwargs["hidden_states"].clone(), kwargs["image_rotary_emb"],
                                                kwargs["attention_mask"])), with_kwargs=True)
    family = family_of(pipe)
    store = MapStore(chunk_bytes=4096)
    try:
        with install(family, store, lambda s, name: family.processor(s, name)):
            run(pipe, guidance=1.0)  # one call per step: every call recorded
    finally:
        hook.remove()
    total = 0
    for hidden, rope, mask in grabbed:
        with torch.no_grad():
            q = attn.norm_q(attn.to_q(hidden).unflatten(-1, (-1, attn.head_dim)))
            k = attn.norm_k(attn.to_k(hidden).unflatten(-1, (-1, attn.head_dim)))
            q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            bias = mask if mask.dtype != torch.bool else torch.zeros(mask.shape).masked_fill(~mask, -torch.inf)
            full = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias).softmax(-1)
        total = total + full[:, :, T5_LENGTH:, :T5_LENGTH].mean(1)  # image queries x text keys (text first)
    return store.layer_mean(layer), (total / len(grabbed)).reshape(1, 8, 12, T5_LENGTH), grabbed


def test_maps_are_computed_under_the_layers_attention_mask(pipe):
    ours, reference, grabbed = brute_force_single_stream(pipe)
    assert grabbed[0][2] is not None and grabbed[0][2].shape[-1] == T5_LENGTH + 8 * 12  # the joint mask
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    assert (ours.sum(-1) < 1).all()


def test_a_boolean_mask_drops_the_padding_from_the_maps(pipe):
    """Called with a boolean mask (True = attend), the padded text keys get no attention in the maps, as in SDPA."""
    transformer = pipe.transformer
    text = torch.randn(1, T5_LENGTH, 32)
    keep = torch.ones(1, T5_LENGTH + 16, dtype=torch.bool)
    keep[0, 5:T5_LENGTH] = False  # T5 padding after five tokens
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    with capture(transformer, latent_size=(8, 8)) as store:
        with torch.no_grad():
            transformer(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=text, timestep=torch.tensor([0.5]),
                        img_ids=ids, txt_ids=torch.zeros(T5_LENGTH, 3), attention_mask=keep)
    for layer in store.layers:
        maps = store.layer_mean(layer)  # (1, 4, 4, T)
        assert maps.shape == (1, 4, 4, T5_LENGTH)
        assert (maps[..., 5:] == 0).all() and (maps[..., :5] > 0).all()


def test_generate_words_maps_unknown_word_and_reweight(pipe):
    result = generate(pipe, PROMPT, negative_prompt="blue", **KW)
    assert result.words == WORDS and result.settings["family"] == "chroma" and result.settings["text_part"] == "t5"
    maps = result.word_maps()
    assert list(maps) == WORDS and all(m.shape == (32, 48) for m in maps.values())
    with pytest.raises(ValueError, match="word 'zebra' is not in the prompt"):
        result.heatmap("zebra")
    plain = run(pipe)
    assert np.array_equal(np.asarray(result.images[0]), (plain[0] * 255).round().astype(np.uint8))

    ones = generate(pipe, PROMPT, negative_prompt="blue",
                    processor=ProcessorSpec("reweight", weights=(("circle", 1.0),)), **KW)
    assert np.array_equal(np.asarray(ones.images[0]), np.asarray(result.images[0]))
    zero = generate(pipe, PROMPT, negative_prompt="blue",
                    processor=ProcessorSpec("reweight", weights=(("circle", 0.0),)), **KW)
    assert zero.heatmap("circle", normalize_by="none").max() == 0
    assert not np.array_equal(np.asarray(zero.images[0]), np.asarray(result.images[0]))
    explicit = generate(pipe, PROMPT, negative_prompt="blue", mode="explicit", **KW)  # FLUX.1's processors
    assert np.allclose(explicit.heatmap("circle"), result.heatmap("circle"), atol=1e-4)


def test_full_chroma1_hd_transformer_on_the_meta_device():
    """Chroma1-HD's config (tests/configs/), weights on the meta device: all 57 attention layers found, processors
    installed and restored, and a shapes-only forward at 1024 px yields maps on the 64 x 64 token grid."""
    transformer = meta_model("ChromaTransformer2DModel", "chroma1_hd_transformer.json")
    layers = cross_attention_layers(transformer)
    assert len(layers) == 19 + 38 and layers[0] == "transformer_blocks.0.attn"
    assert layers[-1] == "single_transformer_blocks.37.attn"
    meta = dict(device="meta")
    grid, text = 64, 512  # 1024 px / VAE factor 8 / 2x2 packing; the pipeline's max_sequence_length
    args = dict(hidden_states=torch.empty(1, grid * grid, 64, **meta),
                encoder_hidden_states=torch.empty(1, text, 4096, **meta), timestep=torch.empty(1, **meta),
                img_ids=torch.empty(grid * grid, 3, **meta), txt_ids=torch.empty(text, 3, **meta),
                attention_mask=torch.empty(1, text + grid * grid, **meta))
    check_meta_capture(transformer, layers, FluxCaptureProcessor, args, grid, text, latent_size=(128, 128))
    assert ChromaFamily(transformer).layer_sizes((128, 96))[layers[-1]] == (64, 48)
