"""Flux joint attention: exact images, double- and single-stream maps on the packed grid, words, bundles, reweight,
and the full FLUX.1-dev transformer on the meta device."""

import numpy as np
import pytest
import torch

from conftest import check_meta_capture, meta_model, tiny_flux_pipeline
from crossattn_sd import capture, generate, load_result
from crossattn_sd.families import FluxFamily, family_of
from crossattn_sd.families.flux import FluxCaptureProcessor
from crossattn_sd.maps import MapStore
from crossattn_sd.processors import cross_attention_layers, install
from crossattn_sd.steering import ProcessorSpec

PROMPT = "a red circle on the left"
WORDS = ["a", "red", "circle", "on", "the", "left"]
T5_LENGTH = 12
KW = dict(steps=2, guidance_scale=3.5, height=32, width=48, max_sequence_length=T5_LENGTH)


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline(t5_length=T5_LENGTH)


def run(pipe, height=32, width=48, steps=2):
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=3.5, height=height, width=width,
                generator=generator, output_type="np", max_sequence_length=T5_LENGTH).images


@pytest.mark.parametrize("height,width", [(32, 32), (32, 48)])
def test_exact_images_equal_diffusers_flux_processor_bit_for_bit(pipe, height, width):
    reference = run(pipe, height, width)
    before = dict(pipe.transformer.attn_processors)
    with capture(pipe) as store:
        ours = run(pipe, height, width)
    assert np.abs(ours - reference).max() == 0
    assert store.layers == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    grid = (height // pipe.vae_scale_factor // 2, width // pipe.vae_scale_factor // 2)  # 2x2-packed latents
    assert {store.layer_shape(l) for l in store.layers} == {grid}
    assert all(p is before[k] for k, p in pipe.transformer.attn_processors.items())


def test_single_stream_map_is_the_text_share_of_the_joined_sequence(pipe):
    """The single-stream block sees [text; image] with no encoder states: its recorded map is the image queries'
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
            q = attn.norm_q(attn.to_q(hidden).unflatten(-1, (-1, attn.head_dim)))
            k = attn.norm_k(attn.to_k(hidden).unflatten(-1, (-1, attn.head_dim)))
            q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            full = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        total = total + full[:, :, T5_LENGTH:, :T5_LENGTH].mean(1)  # image queries x text keys (text first)
    reference = (total / len(grabbed)).reshape(1, 8, 12, T5_LENGTH)
    torch.testing.assert_close(store.layer_mean(layer), reference, rtol=0, atol=1e-6)
    assert (store.layer_mean(layer).sum(-1) < 1).all()


def test_generate_words_maps_bundle_and_reweight(pipe, tmp_path):
    result = generate(pipe, PROMPT, **KW)
    assert result.words == WORDS and result.settings["family"] == "flux" and result.settings["text_part"] == "t5"
    maps = result.word_maps()
    assert list(maps) == WORDS and all(m.shape == (32, 48) for m in maps.values())
    with pytest.raises(ValueError, match="word 'zebra' is not in the prompt"):
        result.heatmap("zebra")
    loaded = load_result(result.save(tmp_path / "run"))
    assert loaded.store.layers == result.store.layers  # double-stream before single-stream, as recorded
    np.testing.assert_array_equal(loaded.heatmap("circle"), result.heatmap("circle"))

    ones = generate(pipe, PROMPT, processor=ProcessorSpec("reweight", weights=(("circle", 1.0),)), **KW)
    assert np.array_equal(np.asarray(ones.images[0]), np.asarray(result.images[0]))
    zero = generate(pipe, PROMPT, processor=ProcessorSpec("reweight", weights=(("circle", 0.0),)), **KW)
    assert zero.heatmap("circle", normalize_by="none").max() == 0
    assert not np.array_equal(np.asarray(zero.images[0]), np.asarray(result.images[0]))


def test_true_cfg_records_only_the_conditional_prompts_calls(pipe):
    """`true_cfg_scale > 1` with a negative prompt calls the transformer twice a step: the negative call runs
    Diffusers' processors and is not recorded, so each step's maps are the conditional prompt's."""
    def true_cfg():
        return pipe(PROMPT, negative_prompt="a blue square", true_cfg_scale=4.0, num_inference_steps=2,
                    guidance_scale=3.5, height=32, width=48, generator=torch.Generator().manual_seed(0),
                    output_type="np", max_sequence_length=T5_LENGTH).images

    reference = true_cfg()
    with capture(pipe, per_step=True) as store:
        ours = true_cfg()
    assert np.abs(ours - reference).max() == 0
    assert store.num_steps == 2 and len(set(store.timesteps)) == 2
    with capture(pipe, per_step=True) as plain:  # no negative prompt: one call a step, same first step
        run(pipe)
    for layer in store.layers:  # step 0: the same latents and prompt in both runs
        assert torch.equal(store.steps[0][layer], plain.steps[0][layer])
    assert all(isinstance(p, type(q)) for p, q in zip(pipe.transformer.attn_processors.values(),
                                                      dict(pipe.transformer.attn_processors).values()))


def test_attention_mask_is_used_by_the_recorded_probabilities(pipe):
    """A mask passed to the attention (`joint_attention_kwargs`, as Diffusers' processor hands it to SDPA) masks
    the recorded probabilities too: masked text tokens get exactly 0, and the image stays Diffusers'."""
    num_keys = T5_LENGTH + 8 * 12  # [text; image] of a 32 x 48 image
    mask = torch.ones(1, num_keys, dtype=torch.bool)
    mask[:, 4:T5_LENGTH] = False  # text positions 4.. (the prompt's last words and the padding)

    def masked():
        return pipe(PROMPT, num_inference_steps=2, guidance_scale=3.5, height=32, width=48,
                    generator=torch.Generator().manual_seed(0), output_type="np", max_sequence_length=T5_LENGTH,
                    joint_attention_kwargs={"attention_mask": mask}).images

    reference = masked()
    assert np.abs(reference - run(pipe)).max() > 0  # the mask changes the image
    for mode in ("exact", "explicit"):
        with capture(pipe, mode=mode) as store:
            ours = masked()
        if mode == "exact":
            assert np.abs(ours - reference).max() == 0
        for layer in store.layers:
            recorded = store.layer_mean(layer)
            assert (recorded[..., 4:] == 0).all() and (recorded[..., :4] > 0).all()


def test_explicit_mode_matches_exact_mode(pipe):
    with capture(pipe, per_step=True) as exact:
        reference = run(pipe)
    with capture(pipe, mode="explicit", per_step=True) as explicit:
        ours = run(pipe)
    assert np.abs(ours - reference).max() < 1e-5
    for layer in exact.layers:  # step 0 (later steps start from latents that differ by float rounding)
        torch.testing.assert_close(explicit.steps[0][layer], exact.steps[0][layer], rtol=0, atol=1e-6)


def test_edit_with_identical_prompts_reproduces_the_plain_image(pipe):
    """Injecting a prompt's own attention changes nothing: the edit's pair equals the plain explicit-mode pair
    bit for bit (a batch of two, as the edit runs: a batch of one differs from it by float rounding)."""
    with capture(pipe, mode="explicit"):
        plain = pipe([PROMPT, PROMPT], num_inference_steps=2, guidance_scale=3.5, height=32, width=48,
                     generator=[torch.Generator().manual_seed(0) for _ in range(2)],
                     max_sequence_length=T5_LENGTH).images
    ours = generate(pipe, PROMPT, processor=ProcessorSpec("edit", edit_prompt=PROMPT), **KW)
    assert len(ours.images) == 2
    for i in range(2):
        assert np.array_equal(np.asarray(ours.images[i]), np.asarray(plain[i]))


def test_edit_injects_the_sources_text_share(pipe):
    swap = "a blue circle on the left"
    injected = generate(pipe, PROMPT, processor=ProcessorSpec("edit", edit_prompt=swap, inject=1.0), **KW)
    free = generate(pipe, PROMPT, processor=ProcessorSpec("edit", edit_prompt=swap, inject=0.0), **KW)
    first = injected.store.layers[0]
    torch.testing.assert_close(injected.store.sums[first][1], injected.store.sums[first][0], rtol=0, atol=1e-6)
    assert not torch.allclose(free.store.sums[first][1], free.store.sums[first][0], atol=1e-4)
    assert injected.words == WORDS and injected.alignments[1].word_texts[1] == "blue"


def test_full_flux1_dev_transformer_on_the_meta_device():
    """FLUX.1-dev's published config, weights on the meta device: all 57 attention layers found, processors
    installed and restored, and a shapes-only forward at 1024 px yields maps on the 64 x 64 token grid."""
    transformer = meta_model("FluxTransformer2DModel", "flux1_dev_transformer.json")
    layers = cross_attention_layers(transformer)
    assert len(layers) == 19 + 38 and layers[0] == "transformer_blocks.0.attn"
    assert layers[-1] == "single_transformer_blocks.37.attn"
    meta = dict(device="meta")
    grid = 64  # 1024 px / VAE factor 8 / 2x2 packing
    args = dict(hidden_states=torch.empty(1, grid * grid, 64, **meta),
                encoder_hidden_states=torch.empty(1, 512, 4096, **meta),
                pooled_projections=torch.empty(1, 768, **meta), timestep=torch.empty(1, **meta),
                img_ids=torch.empty(grid * grid, 3, **meta), txt_ids=torch.empty(512, 3, **meta),
                guidance=torch.empty(1, **meta))
    check_meta_capture(transformer, layers, FluxCaptureProcessor, args, grid, 512, latent_size=(128, 128))
    assert FluxFamily(transformer).layer_sizes((128, 96))[layers[-1]] == (64, 48)


def test_a_layer_with_its_own_processor_keeps_it_unrecorded_and_steering_refuses_it(pipe):
    """A processor other than Diffusers' default (an IP-Adapter's, here a counting stand-in) keeps computing its
    layer under capture, so the image is unchanged; that layer is not recorded, and reweight refuses it."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class Counting:
        calls = 0

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            Counting.calls += 1
            return FluxAttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    layer = "transformer_blocks.0.attn"
    before = dict(pipe.transformer.attn_processors)
    pipe.transformer.get_submodule(layer).set_processor(Counting())
    try:
        reference = run(pipe)
        with pytest.warns(RuntimeWarning, match="flux layers with a Counting keep it and are not recorded"):
            with capture(pipe) as store:
                ours = run(pipe)
        assert np.abs(ours - reference).max() == 0 and Counting.calls == 4  # 2 plain + 2 captured
        assert store.layers == ["single_transformer_blocks.0.attn"]
        with pytest.raises(ValueError, match=f"reweight processor would replace layer {layer}'s Counting"):
            generate(pipe, PROMPT, processor=ProcessorSpec("reweight", weights=(("circle", 2.0),)), **KW)
    finally:
        pipe.transformer.set_attn_processor(before)
