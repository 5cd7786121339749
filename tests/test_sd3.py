"""SD3 joint attention: exact images, the image->text share of the whole softmax, grids, words, bundles, steering."""
import types

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0

from conftest import tiny_sd3_pipeline, tiny_t5_tokenizer
from crossattn_sd import capture, generate, load_result
from crossattn_sd.aggregate import token_maps
from crossattn_sd.families import SD3Family, family_of
from crossattn_sd.families.sd3 import JointCaptureProcessor
from crossattn_sd.maps import MapStore, text_attention
from crossattn_sd.processors import cross_attention_layers, install, layer_sizes
from crossattn_sd.steering import ProcessorSpec

PROMPT = "a red circle on the left"
WORDS = ["a", "red", "circle", "on", "the", "left"]
T5_LENGTH = 8  # the zeros standing for T5 (no T5 encoder here): 16 CLIP positions + 8
KW = dict(steps=2, guidance_scale=3.0, height=32, width=48, max_sequence_length=T5_LENGTH)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd3_pipeline()


def run(pipe, guidance=3.0, height=32, width=48, steps=2, prompt=PROMPT):
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                generator=generator, output_type="np", max_sequence_length=T5_LENGTH).images


def processor_types(pipe):
    return {k: type(p) for k, p in pipe.transformer.attn_processors.items()}


@pytest.mark.parametrize("height,width", [(32, 32), (32, 48)])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_exact_images_equal_diffusers_joint_processor_bit_for_bit(pipe, guidance, height, width):
    assert set(processor_types(pipe).values()) == {JointAttnProcessor2_0}
    reference = run(pipe, guidance, height, width)
    with capture(pipe) as store:
        ours = run(pipe, guidance, height, width)
    assert np.abs(ours - reference).max() == 0
    assert store.num_images == 1 and store.num_steps == 2
    p = pipe.transformer.config.patch_size
    grid = (height // pipe.vae_scale_factor // p, width // pipe.vae_scale_factor // p)
    assert {store.layer_shape(l) for l in store.layers} == {grid}


def test_joint_layers_found_image_only_attn2_left_alone_last_block_recorded(pipe):
    layers = cross_attention_layers(pipe)
    assert layers == ["transformer_blocks.0.attn", "transformer_blocks.1.attn", "transformer_blocks.2.attn"]
    assert pipe.transformer.transformer_blocks[-1].attn.context_pre_only  # no text output, still recorded
    before = dict(pipe.transformer.attn_processors)
    with capture(pipe) as store:
        inside = dict(pipe.transformer.attn_processors)
        run(pipe, steps=1)
    assert store.layers == layers
    assert inside["transformer_blocks.0.attn2.processor"] is before["transformer_blocks.0.attn2.processor"]
    assert all(isinstance(inside[f"{l}.processor"], JointCaptureProcessor) for l in layers)
    assert all(p is before[k] for k, p in pipe.transformer.attn_processors.items())
    assert layer_sizes(pipe, (16, 24)) == {l: (8, 12) for l in layers}


def test_processors_restored_after_an_error_inside_the_forward_pass(pipe):
    before = dict(pipe.transformer.attn_processors)

    def boom(*_):
        raise RuntimeError("boom in block 1")

    hook = pipe.transformer.transformer_blocks[1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom in block 1"):
            with capture(pipe):
                run(pipe, steps=1)
    finally:
        hook.remove()
    after = dict(pipe.transformer.attn_processors)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not pipe.transformer._forward_pre_hooks


def test_a_second_capture_on_the_same_model_is_refused(pipe):
    with capture(pipe):
        with pytest.raises(RuntimeError, match="already installed on this SD3Transformer2DModel"):
            with capture(pipe):
                pass
    assert set(processor_types(pipe).values()) == {JointAttnProcessor2_0}


def test_recorded_map_is_the_text_share_of_the_whole_joint_softmax(pipe):
    """Each image query's row of softmax over [image; text] keys, text columns only: rows sum to < 1, and the
    chunked side computation equals a brute-force full softmax (computed here from the layer's own modules)."""
    transformer = pipe.transformer
    layer = "transformer_blocks.1.attn"
    attn = transformer.get_submodule(layer)
    grabbed = []
    hook = attn.register_forward_pre_hook(
        lambda m, args, kwargs: grabbed.append((kwargs["hidden_states"].clone(),
                                                kwargs["encoder_hidden_states"].clone())), with_kwargs=True)
    family = family_of(pipe)
    store = MapStore(cfg=lambda: pipe.do_classifier_free_guidance, chunk_bytes=2048)  # many chunks of queries
    try:
        with install(transformer, store, lambda s, name: family.processor(s, name)):
            run(pipe, steps=2)
    finally:
        hook.remove()
    total = 0
    for hidden, text in grabbed:  # one per step; batch [unconditional, conditional]
        with torch.no_grad():
            def heads(x):
                return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
            q = torch.cat([attn.norm_q(heads(attn.to_q(hidden))), attn.norm_added_q(heads(attn.add_q_proj(text)))], 2)
            k = torch.cat([attn.norm_k(heads(attn.to_k(hidden))), attn.norm_added_k(heads(attn.add_k_proj(text)))], 2)
            full = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)[1:]  # conditional image
        n_img = hidden.shape[1]
        torch.testing.assert_close(full.sum(-1), torch.ones_like(full.sum(-1)))  # whole rows sum to 1
        total = total + full[:, :, :n_img, n_img:].mean(1)  # image queries x text keys, heads averaged
    reference = (total / len(grabbed)).reshape(1, 8, 12, -1)
    recorded = store.layer_mean(layer)
    torch.testing.assert_close(recorded, reference, rtol=0, atol=1e-6)
    share = recorded.sum(-1)
    assert (share < 1).all() and (share > 0).all()
    # the text-renormalised view: each pixel's text probabilities sum to 1
    per_token = token_maps(store, [[i] for i in range(recorded.shape[-1])], (8, 12), text_share=False)
    torch.testing.assert_close(per_token.sum(0), torch.ones(8, 12), rtol=0, atol=1e-5)


def test_text_attention_chunks_equal_one_softmax_and_keep_only_the_columns():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 14, 4)
    full = (q @ k.transpose(-1, -2) * 0.5).softmax(-1)
    mean, per_head = text_attention(q, k, 0.5, columns=(10, None), keep_heads=True, chunk_bytes=1)  # 1 row a chunk
    torch.testing.assert_close(per_head, full[..., 10:], rtol=0, atol=1e-6)
    torch.testing.assert_close(mean, full[..., 10:].mean(1), rtol=0, atol=1e-6)


def test_generate_gives_per_word_maps_of_the_image_shape(pipe):
    result = generate(pipe, PROMPT, **KW)
    assert result.words == WORDS and result.size == (32, 48)
    maps = result.word_maps()
    assert list(maps) == WORDS and all(m.shape == (32, 48) for m in maps.values())
    assert result.settings["family"] == "sd3" and result.settings["text_part"] == "clip"
    assert result.settings["max_sequence_length"] == T5_LENGTH
    assert len(result.alignments[0].tokens) == 16 + T5_LENGTH  # CLIP's positions, then the T5 part's zeros
    assert result.store.sums[result.store.layers[0]].shape[-1] == 16 + T5_LENGTH
    listed = ", ".join(repr(w) for w in WORDS)
    with pytest.raises(ValueError, match=f"word 'zebra' is not in the prompt; the prompt's words are: {listed}"):
        result.heatmap("zebra")
    with pytest.raises(ValueError, match="text_part='t5' is not a text part of this model; use one of clip"):
        generate(pipe, PROMPT, text_part="t5", **KW)


def test_bundle_round_trip(pipe, tmp_path):
    result = generate(pipe, PROMPT, per_step=True, **KW)
    loaded = load_result(result.save(tmp_path / "run"))
    assert loaded.store.layers == result.store.layers and loaded.words == WORDS
    assert loaded.settings["family"] == "sd3"
    for word in WORDS:
        np.testing.assert_array_equal(loaded.heatmap(word), result.heatmap(word))
    np.testing.assert_array_equal(np.asarray(loaded.images[0]), np.asarray(result.images[0]))


def test_capture_on_a_bare_sd3_transformer(pipe):
    transformer = pipe.transformer
    torch.manual_seed(0)
    latents, text, pooled = torch.randn(2, 4, 16, 24), torch.randn(2, 24, 32), torch.randn(2, 32)
    args = dict(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                timestep=torch.tensor([500.0, 500.0]))
    with torch.no_grad():
        reference = transformer(**args).sample
        with capture(transformer) as store:  # no pipeline: the whole batch is recorded
            ours = transformer(**args).sample
    assert torch.equal(ours, reference)
    assert store.num_images == 2 and store.timesteps == [500.0] and store.resolutions() == [(8, 12)]


def test_t5_part_aligns_sentencepiece_words_after_clips_positions(pipe):
    """With a T5 encoder the words default to T5's positions, after CLIP's; sub-words ("\u2581cir" + "cle") merge."""
    t5 = tiny_t5_tokenizer()
    fake = types.SimpleNamespace(tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, tokenizer_3=t5,
                                 text_encoder_3=object(), tokenizer_max_length=16)
    family = SD3Family(pipe.transformer)
    assert family.text_parts(fake) == ["t5", "clip"]
    a = family.text_positions(fake, "a red circle, on the left", max_sequence_length=12)
    assert len(a.tokens) == 16 + 12 and a.word_texts == WORDS
    assert a.indices_of("circle") == [16 + 2, 16 + 3] and a.tokens[18:20] == ("\u2581cir", "cle")
    assert a.special_indices["end"] == (16 + 8,)
    clip = family.text_positions(fake, "a red circle, on the left", part="clip", max_sequence_length=12)
    assert clip.indices_of("red") == [2] and len(clip.tokens) == 28


def test_unsupported_family_names_it_and_the_supported_ones():
    FluxPipeline = type("FluxPipeline", (), {})
    fake = FluxPipeline()
    fake.transformer = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"does not support FluxPipeline \(denoiser Linear\); supported: "
                                         r"UNet2DConditionModel .*; SD3Transformer2DModel"):
        capture(fake).__enter__()


# -- steering --------------------------------------------------------------------------------------------------


def test_reweight_unit_weights_is_capture_exact_bit_for_bit_and_zero_removes_a_word(pipe):
    plain = generate(pipe, PROMPT, **KW)
    ones = generate(pipe, PROMPT, processor=ProcessorSpec("reweight", weights=(("red", 1.0), ("circle", 1.0))), **KW)
    assert np.array_equal(np.asarray(ones.images[0]), np.asarray(plain.images[0]))
    assert all(torch.equal(ones.store.sums[l], plain.store.sums[l]) for l in plain.store.layers)
    zero = generate(pipe, PROMPT, processor=ProcessorSpec("reweight", weights=(("circle", 0.0),)), per_step=True,
                    **KW)
    assert zero.heatmap("circle", normalize_by="none").max() == 0
    assert not np.array_equal(np.asarray(zero.images[0]), np.asarray(plain.images[0]))
    explicit = generate(pipe, PROMPT, processor=ProcessorSpec("reweight", mode="explicit",
                                                              weights=(("circle", 0.0),)), per_step=True, **KW)
    assert np.abs(np.asarray(explicit.images[0], dtype=int) - np.asarray(zero.images[0])).max() <= 1
    for layer in zero.store.layers:  # step 0 (later steps start from latents that differ by float rounding)
        torch.testing.assert_close(explicit.store.steps[0][layer], zero.store.steps[0][layer], rtol=0, atol=1e-6)


def test_skip_layer_guidance_records_only_the_guided_call(pipe):
    """`skip_guidance_layers` adds a transformer call in steps 1.. (the conditional prompt, block 1 skipped): it
    runs Diffusers' processors unrecorded (it used to fail as a guidance batch of odd size 1)."""
    def slg():
        return pipe(PROMPT, num_inference_steps=3, guidance_scale=3.0, height=32, width=48,
                    generator=torch.Generator().manual_seed(0), output_type="np", max_sequence_length=T5_LENGTH,
                    skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0).images

    reference = slg()
    assert np.abs(reference - run(pipe, steps=3)).max() > 0  # the skip-layer call changes the image
    with capture(pipe, per_step=True) as store:
        ours = slg()
    assert np.abs(ours - reference).max() == 0
    assert store.num_steps == 3 and store.num_images == 1
    with capture(pipe, per_step=True) as plain:
        run(pipe, steps=3)
    for step in (0, 1):  # the same latents in both runs up to step 1's call
        for layer in store.layers:
            assert torch.equal(store.steps[step][layer], plain.steps[step][layer])


def test_edit_with_identical_prompts_reproduces_the_plain_image(pipe):
    plain = generate(pipe, PROMPT, mode="explicit", **KW)
    ours = generate(pipe, PROMPT, processor=ProcessorSpec("edit", edit_prompt=PROMPT), **KW)
    assert len(ours.images) == 2
    for i in range(2):
        assert np.array_equal(np.asarray(ours.images[i]), np.asarray(plain.images[0]))


def test_edit_injects_the_sources_text_share(pipe):
    """A swapped word: during injection the edit's image->text block is the source's, so their maps agree; with
    inject=0 they do not."""
    swap = "a blue circle on the left"
    injected = generate(pipe, PROMPT, processor=ProcessorSpec("edit", edit_prompt=swap, inject=1.0), **KW)
    free = generate(pipe, PROMPT, processor=ProcessorSpec("edit", edit_prompt=swap, inject=0.0), **KW)
    first = injected.store.layers[0]  # the first layer sees the same inputs apart from the text
    torch.testing.assert_close(injected.store.sums[first][1], injected.store.sums[first][0], rtol=0, atol=1e-6)
    assert not torch.allclose(free.store.sums[first][1], free.store.sums[first][0], atol=1e-4)
    assert injected.words == WORDS and injected.alignments[1].word_texts[1] == "blue"


def test_a_layer_with_its_own_processor_keeps_it_unrecorded(pipe):
    """A processor other than Diffusers' joint ones (an IP-Adapter's; here a subclass) keeps computing its layer
    under capture, so the image is unchanged and that layer is not recorded; explicit mode refuses it."""
    class Own(JointAttnProcessor2_0):
        pass

    layer = "transformer_blocks.1.attn"
    before = dict(pipe.transformer.attn_processors)
    pipe.transformer.get_submodule(layer).set_processor(Own())
    try:
        reference = run(pipe)
        with pytest.warns(RuntimeWarning, match="sd3 layers with a Own keep it and are not recorded"):
            with capture(pipe) as store:
                ours = run(pipe)
        assert np.abs(ours - reference).max() == 0
        assert store.layers == ["transformer_blocks.0.attn", "transformer_blocks.2.attn"]
        with pytest.raises(ValueError, match=f"capture \\(explicit mode\\) processor would replace layer {layer}'s"):
            with capture(pipe, mode="explicit"):
                pass
    finally:
        pipe.transformer.set_attn_processor(before)
