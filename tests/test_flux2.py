"""FLUX.2 joint attention: exact images, double- and single-stream maps on the patchified grid, words from the
chat template, reweight, and the full FLUX.2 [klein] 4B transformer on the meta device."""

import numpy as np
import pytest
import torch

from conftest import check_meta_capture, meta_model, tiny_flux2_pipeline
from crossattn_sd import capture, generate
from crossattn_sd.families import Flux2Family, family_of
from crossattn_sd.families.flux2 import Flux2CaptureProcessor, Flux2SingleCaptureProcessor
from crossattn_sd.maps import MapStore
from crossattn_sd.processors import cross_attention_layers, install
from crossattn_sd.steering import ProcessorSpec

PROMPT = "a red circle on the left"
WORDS = ["a", "red", "circle", "on", "the", "left"]
TEXT_LENGTH = 16
KW = dict(steps=2, guidance_scale=1.0, height=32, width=48, max_sequence_length=TEXT_LENGTH)


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux2_pipeline(max_length=TEXT_LENGTH)


def run(pipe, height=32, width=48, steps=2):
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=1.0, height=height, width=width,
                generator=generator, output_type="np", max_sequence_length=TEXT_LENGTH).images


@pytest.mark.parametrize("height,width", [(32, 32), (32, 48)])
def test_exact_images_equal_diffusers_flux2_processors_bit_for_bit(pipe, height, width):
    reference = run(pipe, height, width)
    before = dict(pipe.transformer.attn_processors)
    with capture(pipe) as store:
        ours = run(pipe, height, width)
    assert np.abs(ours - reference).max() == 0
    assert store.layers == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    grid = (height // pipe.vae_scale_factor // 2, width // pipe.vae_scale_factor // 2)  # 2x2-patchified latents
    assert {store.layer_shape(l) for l in store.layers} == {grid}
    assert all(p is before[k] for k, p in pipe.transformer.attn_processors.items())


def test_single_stream_map_is_the_text_share_of_the_joined_sequence(pipe):
    """The single-stream attention sees [text; image] with no text length: its map is the image queries'
    softmax over all keys, text columns only, equal to a brute-force reference from the layer's own modules."""
    from diffusers.models.embeddings import apply_rotary_emb

    layer = "single_transformer_blocks.0.attn"
    attn = pipe.transformer.get_submodule(layer)
    grabbed = []
    hook = attn.register_forward_pre_hook(
        lambda m, args, kwargs: grabbed.append((kwargs["hidden_states"].clone(), kwargs["image_rotary_emb"])),
        with_kwargs=True)
    family = family_of(pipe)
    store = MapStore(chunk_bytes=4096)
    try:
        with install(family, store, lambda s, name: family.processor(s, name)):
            run(pipe)
    finally:
        hook.remove()
    total = 0
    for hidden, rope in grabbed:
        with torch.no_grad():
            q, k, _ = attn.to_qkv_mlp_proj(hidden)[..., :3 * attn.inner_dim].chunk(3, dim=-1)
            q = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim)))
            k = attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
            q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            full = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        total = total + full[:, :, TEXT_LENGTH:, :TEXT_LENGTH].mean(1)  # image queries x text keys (text first)
    reference = (total / len(grabbed)).reshape(1, 8, 12, TEXT_LENGTH)
    torch.testing.assert_close(store.layer_mean(layer), reference, rtol=0, atol=1e-6)
    assert (store.layer_mean(layer).sum(-1) < 1).all()


def test_generate_words_from_the_chat_template_maps_and_reweight(pipe):
    result = generate(pipe, PROMPT, **KW)
    assert result.words == WORDS and result.settings["family"] == "flux2" and result.settings["text_part"] == "llm"
    tokens = family_of(pipe).text_positions(pipe, PROMPT, max_sequence_length=TEXT_LENGTH)
    assert [tokens.tokens[i] for i in tokens.indices_of("circle")] == ["circle"]  # after "<|im_start|> user"
    maps = result.word_maps()
    assert list(maps) == WORDS and all(m.shape == (32, 48) for m in maps.values())

    ones = generate(pipe, PROMPT, processor=ProcessorSpec("reweight", weights=(("circle", 1.0),)), **KW)
    assert np.array_equal(np.asarray(ones.images[0]), np.asarray(result.images[0]))
    zero = generate(pipe, PROMPT, processor=ProcessorSpec("reweight", weights=(("circle", 0.0),)), **KW)
    assert zero.heatmap("circle", normalize_by="none").max() == 0
    assert not np.array_equal(np.asarray(zero.images[0]), np.asarray(result.images[0]))


def test_klein_base_guidance_records_only_the_conditional_calls(pipe):
    """A Klein base model (not distilled) with guidance > 1 calls the transformer twice a step, the negative prompt
    second, on the same latents: that call runs Diffusers' processors unrecorded (it used to fail as a guidance
    batch of odd size 1)."""
    from diffusers import Flux2KleinPipeline

    base = Flux2KleinPipeline(**pipe.components, is_distilled=False)
    base.set_progress_bar_config(disable=True)

    def guided():
        return base(prompt=PROMPT, num_inference_steps=2, guidance_scale=4.0, height=32, width=48,
                    generator=torch.Generator().manual_seed(0), output_type="np",
                    max_sequence_length=TEXT_LENGTH).images

    reference = guided()
    with capture(base, per_step=True) as store:
        ours = guided()
    assert np.abs(ours - reference).max() == 0
    assert store.num_steps == 2 and store.num_images == 1
    with capture(pipe, per_step=True) as plain:  # the distilled pipeline: one call a step, same first step
        run(pipe)
    for layer in store.layers:
        assert torch.equal(store.steps[0][layer], plain.steps[0][layer])


def test_explicit_mode_matches_exact_mode(pipe):
    with capture(pipe, per_step=True) as exact:
        reference = run(pipe)
    with capture(pipe, mode="explicit", per_step=True) as explicit:
        ours = run(pipe)
    assert np.abs(ours - reference).max() < 1e-5
    for layer in exact.layers:
        torch.testing.assert_close(explicit.steps[0][layer], exact.steps[0][layer], rtol=0, atol=1e-6)


def test_edit_with_identical_prompts_reproduces_the_plain_image_and_injects(pipe):
    with capture(pipe, mode="explicit"):
        plain = pipe(prompt=[PROMPT, PROMPT], num_inference_steps=2, guidance_scale=1.0, height=32, width=48,
                     generator=[torch.Generator().manual_seed(0) for _ in range(2)],
                     max_sequence_length=TEXT_LENGTH).images
    same = generate(pipe, PROMPT, processor=ProcessorSpec("edit", edit_prompt=PROMPT), **KW)
    assert all(np.array_equal(np.asarray(same.images[i]), np.asarray(plain[i])) for i in range(2))
    swap = "a blue circle on the left"
    injected = generate(pipe, PROMPT, processor=ProcessorSpec("edit", edit_prompt=swap, inject=1.0), **KW)
    free = generate(pipe, PROMPT, processor=ProcessorSpec("edit", edit_prompt=swap, inject=0.0), **KW)
    first = injected.store.layers[0]
    torch.testing.assert_close(injected.store.sums[first][1], injected.store.sums[first][0], rtol=0, atol=1e-6)
    assert not torch.allclose(free.store.sums[first][1], free.store.sums[first][0], atol=1e-4)


def test_full_flux2_klein_4b_transformer_on_the_meta_device():
    """FLUX.2 [klein] 4B's published config, weights on the meta device: all 25 attention layers found (5
    double-, 20 single-stream), processors installed and restored, and a shapes-only forward at 1024 px yields
    maps on the 64 x 64 token grid."""
    transformer = meta_model("Flux2Transformer2DModel", "flux2_klein_4b_transformer.json")
    layers = cross_attention_layers(transformer)
    assert len(layers) == 5 + 20 and layers[0] == "transformer_blocks.0.attn"
    assert layers[-1] == "single_transformer_blocks.19.attn"
    meta = dict(device="meta")
    grid, text = 64, 512  # 1024 px / VAE factor 8 / 2x2 patches; the pipeline's max_sequence_length
    args = dict(hidden_states=torch.empty(1, grid * grid, 128, **meta),
                encoder_hidden_states=torch.empty(1, text, 7680, **meta), timestep=torch.empty(1, **meta),
                img_ids=torch.empty(1, grid * grid, 4, **meta), txt_ids=torch.empty(1, text, 4, **meta))
    check_meta_capture(transformer, layers, [Flux2CaptureProcessor] * 5 + [Flux2SingleCaptureProcessor] * 20,
                       args, grid, text, latent_size=(128, 128))
    assert Flux2Family(transformer).layer_sizes((128, 96))[layers[-1]] == (64, 48)


def test_a_negative_prompt_is_refused_by_name(pipe):
    with pytest.raises(ValueError, match="Flux2KleinPipeline takes no negative prompt"):
        generate(pipe, PROMPT, negative_prompt="blurry", **KW)
