"""Qwen-Image (double-stream [text; image] attention, Qwen2.5-VL text behind a chat template whose first 34 tokens
the pipeline drops, true CFG as a second transformer call): exact images, maps on the packed grid under the text
mask, words after the dropped prefix, reweight, and the full Qwen-Image transformer on the meta device."""

import numpy as np
import pytest
import torch

from conftest import check_meta_capture, meta_model
from crossattn_sd import capture, generate
from crossattn_sd.families import QwenImageFamily, family_of
from crossattn_sd.families.qwenimage import QwenImageCaptureProcessor
from crossattn_sd.maps import MapStore
from crossattn_sd.processors import cross_attention_layers, install
from crossattn_sd.steering import ProcessorSpec

PROMPT = "a red circle on the left"
WORDS = ["a", "red", "circle", "on", "the", "left"]
KW = dict(steps=2, guidance_scale=4.0, height=32, width=48)
# pieces that make the template's and the prompts' words one byte-level BPE token each, as Qwen2's vocabulary does
TEMPLATE_WORDS = ["system", "user", "assistant", "Describe", " the", " image", " by", " detailing", " color", " shape",
                  " size", " texture", " quantity", " text", " spatial", " relationships", " of", " objects", " and",
                  " background", " a", " red", " blue", " green", " square", " circle", " on", " left", " right",
                  " cat", " bad"]


def tiny_qwen2_tokenizer():
    """A byte-level BPE Qwen2 tokenizer, built offline: the byte alphabet plus merges that make the template's words
    whole tokens, so the pipeline's system prefix is 34 tokens as with the real Qwen2.5-VL tokenizer."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []
    for word in TEMPLATE_WORDS:
        pieces = list(word.replace(" ", "\u0120"))
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            if (a, b) not in merges:
                merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
            pieces = [a + b] + pieces[2:]
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]:
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def tiny_qwenimage_pipeline(seed: int = 0):
    """A seeded random QwenImagePipeline (the shapes of Diffusers' QwenImage fast tests): two double-stream blocks,
    a tiny Qwen2.5-VL, the Qwen-Image VAE (factor 4), 2x2-packed latents, flow matching. A 32 x 48 image is a
    4 x 6 token grid."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny_qwen2_tokenizer()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(base_dim=4 * 6, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "rope_theta": 1000000.0,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tokenizer),
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    pipe = QwenImagePipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                             text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_qwenimage_pipeline()


def run(pipe, height=32, width=48, steps=2, cfg=4.0, negative="bad"):
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, negative_prompt=negative, true_cfg_scale=cfg, num_inference_steps=steps, height=height,
                width=width, generator=generator, output_type="np").images


@pytest.mark.parametrize("height,width", [(32, 32), (32, 48)])
def test_exact_images_equal_diffusers_processors_bit_for_bit(pipe, height, width):
    reference = run(pipe, height, width)
    before = dict(pipe.transformer.attn_processors)
    with capture(pipe, per_step=True) as store:
        ours = run(pipe, height, width)
    assert np.abs(ours - reference).max() == 0
    assert store.layers == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    grid = (height // pipe.vae_scale_factor // 2, width // pipe.vae_scale_factor // 2)  # 2x2-packed latents
    assert {store.layer_shape(l) for l in store.layers} == {grid}
    # true CFG's second call (the negative prompt, on the same latents) is no step and records nothing
    assert store.num_steps == 2 and len(store.steps) == 2
    assert store.sums[store.layers[0]].shape[-1] == len(WORDS) + 5  # the prompt, "<|im_end|>\n<|im_start|>assistant\n"
    assert all(p is before[k] for k, p in pipe.transformer.attn_processors.items())


def test_processors_restored_after_an_exception(pipe):
    before = dict(pipe.transformer.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(pipe):
            assert isinstance(pipe.transformer.attn_processors["transformer_blocks.0.attn.processor"],
                              QwenImageCaptureProcessor)
            raise RuntimeError("boom")
    assert all(p is before[k] for k, p in pipe.transformer.attn_processors.items())


def test_words_sit_after_the_dropped_template_prefix(pipe):
    tokens = family_of(pipe).text_positions(pipe, PROMPT)
    assert tokens.word_texts == WORDS and len(tokens.tokens) == len(WORDS) + 5
    assert [tokens.tokens[i] for w in WORDS[:3] for i in tokens.indices_of(w)] == ["a", "\u0120red", "\u0120circle"]
    assert tokens.tokens[len(WORDS):] == ("<|im_end|>", "\u010a", "<|im_start|>", "assistant", "\u010a")
    cut = family_of(pipe).text_positions(pipe, PROMPT, max_sequence_length=3)
    assert cut.word_texts == ["a", "red", "circle"] and cut.dropped_words == ("on", "the", "left")


def test_maps_respect_the_text_mask_of_a_padded_batch(pipe):
    """Two prompts of different lengths: the shorter one's text is padded and masked; its map of the first block
    equals the image queries' softmax over all keys under that mask (padding columns 0), from the layer's modules."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    layer = "transformer_blocks.0.attn"
    attn = pipe.transformer.get_submodule(layer)
    grabbed = []
    hook = attn.register_forward_pre_hook(lambda m, args, kwargs: grabbed.append(dict(kwargs)), with_kwargs=True)
    family = family_of(pipe)
    store = MapStore()
    try:
        with install(family, store, lambda s, name: family.processor(s, name)):
            generator = torch.Generator().manual_seed(0)
            pipe([PROMPT, "a red cat"], true_cfg_scale=1.0, num_inference_steps=2, height=32, width=48,
                 generator=generator, output_type="np")
    finally:
        hook.remove()
    total = 0
    for kw in grabbed:
        text_mask = kw["encoder_hidden_states_mask"]
        assert text_mask is not None and not text_mask[1].all()  # the second prompt is padded
        img_freqs, txt_freqs = kw["image_rotary_emb"]
        with torch.no_grad():
            def heads(x):
                return x.unflatten(-1, (attn.heads, -1))
            q = apply_rotary_emb_qwen(attn.norm_q(heads(attn.to_q(kw["hidden_states"]))), img_freqs, use_real=False)
            k_img = apply_rotary_emb_qwen(attn.norm_k(heads(attn.to_k(kw["hidden_states"]))), img_freqs, use_real=False)
            k_txt = apply_rotary_emb_qwen(attn.norm_added_k(heads(attn.add_k_proj(kw["encoder_hidden_states"]))),
                                          txt_freqs, use_real=False)
            k = torch.cat([k_txt, k_img], dim=1)
            keep = torch.cat([text_mask, torch.ones(2, q.shape[1], dtype=torch.bool)], dim=1)
            scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) / q.shape[-1] ** 0.5
            full = scores.masked_fill(~keep[:, None, None, :], -torch.inf).softmax(-1)
        total = total + full[..., :text_mask.shape[1]].mean(1)
    reference = (total / len(grabbed)).reshape(2, 4, 6, -1)
    torch.testing.assert_close(store.layer_mean(layer), reference, rtol=0, atol=1e-6)
    padded = ~grabbed[0]["encoder_hidden_states_mask"][1]
    assert (store.layer_mean(layer)[1][..., padded] == 0).all()


def test_generate_words_maps_unknown_word_true_cfg_and_reweight(pipe):
    result = generate(pipe, PROMPT, **KW)
    assert result.words == WORDS and result.settings["family"] == "qwenimage" and result.settings["text_part"] == "llm"
    maps = result.word_maps()
    assert list(maps) == WORDS and all(m.shape == (32, 48) for m in maps.values())
    with pytest.raises(ValueError, match="word 'zebra' is not in the prompt"):
        result.heatmap("zebra")
    plain = run(pipe, negative=" ")  # generate's guidance is true CFG, with the model card's negative prompt " "
    assert np.array_equal(np.asarray(result.images[0]), (plain[0] * 255).round().astype(np.uint8))

    ones = generate(pipe, PROMPT, processor=ProcessorSpec("reweight", weights=(("circle", 1.0),)), **KW)
    assert np.array_equal(np.asarray(ones.images[0]), np.asarray(result.images[0]))
    zero = generate(pipe, PROMPT, processor=ProcessorSpec("reweight", weights=(("circle", 0.0),)), **KW)
    assert zero.heatmap("circle", normalize_by="none").max() == 0
    assert not np.array_equal(np.asarray(zero.images[0]), np.asarray(result.images[0]))
    with pytest.raises(ValueError, match="Qwen-Image layers record in exact mode only"):
        generate(pipe, PROMPT, mode="explicit", **KW)


def test_full_qwenimage_transformer_on_the_meta_device():
    """Qwen-Image's transformer config (tests/configs/), weights on the meta device: all 60 joint layers found,
    processors installed and restored, and a shapes-only forward at 1024 px yields maps on the 64 x 64 grid."""
    transformer = meta_model("QwenImageTransformer2DModel", "qwen_image_transformer.json")
    layers = cross_attention_layers(transformer)
    assert layers == [f"transformer_blocks.{i}.attn" for i in range(60)]
    meta = dict(device="meta")
    grid, text = 64, 40  # 1024 px / VAE factor 8 / 2x2 packing; a 40-token prompt
    args = dict(hidden_states=torch.empty(1, grid * grid, 64, **meta),
                encoder_hidden_states=torch.empty(1, text, 3584, **meta), timestep=torch.empty(1, **meta),
                img_shapes=[[(1, grid, grid)]])
    check_meta_capture(transformer, layers, QwenImageCaptureProcessor, args, grid, text, latent_size=(128, 128))
    assert QwenImageFamily(transformer).layer_sizes((128, 96))[layers[-1]] == (64, 48)
