"""Sana (linear self-attention, real cross-attention `attn2` with a padding mask, Gemma 2 text behind a long
instruction): exact images, maps on the patch grid under the mask, words among the kept text positions, reweight,
edit, and the full Sana 1.6B transformer on the meta device."""

import numpy as np
import pytest
import torch

from conftest import WHOLE_WORDS, check_meta_capture, meta_model
from crossattn_sd import capture, generate
from crossattn_sd.families import SanaFamily, family_of
from crossattn_sd.families.sana import SanaCaptureProcessor
from crossattn_sd.maps import MapStore
from crossattn_sd.processors import cross_attention_layers, install
from crossattn_sd.steering import ProcessorSpec

PROMPT = "a red circle on the left"
WORDS = ["a", "red", "circle", "on", "the", "left"]
TEXT_LENGTH = 16
KW = dict(steps=2, guidance_scale=4.5, height=32, width=64, max_sequence_length=TEXT_LENGTH)


def tiny_gemma_tokenizer():
    """A Gemma (BPE, "\u2581" for spaces, <bos> first) tokenizer over single characters plus merges that make the
    closed vocabulary's words and "circle" one token each, built offline."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for c in "\u2581abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.:;'-\n!?\"()":
        vocab.setdefault(c, len(vocab))
    merges = []
    for word in WHOLE_WORDS + ["circle"]:  # "\u2581 r" -> "\u2581r", "\u2581r e" -> "\u2581re", ...
        pieces = ["\u2581"] + list(word)
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            if (a, b) not in merges:
                merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
            pieces = [a + b] + pieces[2:]
    return GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, model_max_length=4096)


def tiny_sana_pipeline(seed: int = 0):
    """A seeded random SanaPipeline (the shapes of Diffusers' SanaPipelineFastTests): one block (linear
    self-attention, cross-attention), a tiny Gemma 2 encoder, a DC-AE of factor 2, flow matching. A 32 x 64
    image is a 16 x 32 token grid (patch 1; Sana wants sizes that are multiples of 32)."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = tiny_gemma_tokenizer()
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=32,
    )
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    text_encoder = Gemma2Model(Gemma2Config(
        head_dim=16, hidden_size=8, intermediate_size=64, max_position_embeddings=8192, num_attention_heads=2,
        num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(tokenizer), attn_implementation="eager",
    )).eval()
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_sana_pipeline()


def run(pipe, height=32, width=64, steps=2, guidance=4.5):
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                generator=generator, output_type="np", max_sequence_length=TEXT_LENGTH,
                use_resolution_binning=False).images


@pytest.mark.parametrize("height,width", [(32, 32), (32, 64)])
def test_exact_images_equal_diffusers_processors_bit_for_bit(pipe, height, width):
    reference = run(pipe, height, width)
    before = dict(pipe.transformer.attn_processors)
    with capture(pipe) as store:
        ours = run(pipe, height, width)
    assert np.abs(ours - reference).max() == 0
    assert store.layers == ["transformer_blocks.0.attn2"]  # attn1, the linear self-attention, is left alone
    grid = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)  # patch 1
    assert store.layer_shape("transformer_blocks.0.attn2") == grid and store.num_steps == 2
    assert all(p is before[k] for k, p in pipe.transformer.attn_processors.items())


def test_processors_restored_after_an_exception(pipe):
    before = dict(pipe.transformer.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(pipe):
            assert isinstance(pipe.transformer.attn_processors["transformer_blocks.0.attn2.processor"],
                              SanaCaptureProcessor)
            raise RuntimeError("boom")
    assert all(p is before[k] for k, p in pipe.transformer.attn_processors.items())


def test_maps_are_the_conditional_softmax_under_the_padding_mask(pipe):
    """The recorded map equals softmax(QK^T / sqrt(d) + mask) of the conditional half, from the layer's own modules;
    the padded caption tokens get (almost) nothing."""
    layer = "transformer_blocks.0.attn2"
    attn = pipe.transformer.get_submodule(layer)
    grabbed = []
    hook = attn.register_forward_pre_hook(
        lambda m, args, kwargs: grabbed.append((args[0].clone(), kwargs["encoder_hidden_states"],
                                                kwargs["attention_mask"])), with_kwargs=True)
    family = family_of(pipe)
    store = MapStore(cfg=lambda: pipe.do_classifier_free_guidance)
    try:
        with install(family, store, lambda s, name: family.processor(s, name)):
            run(pipe)
    finally:
        hook.remove()
    total = 0
    for hidden, text, mask in grabbed:
        with torch.no_grad():
            q = attn.to_q(hidden[1:]).unflatten(-1, (2, -1)).transpose(1, 2)  # the conditional half
            k = attn.to_k(text[1:]).unflatten(-1, (2, -1)).transpose(1, 2)
            full = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + mask[1:, None]).softmax(-1)
        total = total + full.mean(1)
    reference = (total / len(grabbed)).reshape(1, 16, 32, TEXT_LENGTH)
    torch.testing.assert_close(store.layer_mean(layer), reference, rtol=0, atol=1e-6)
    tokens = family.text_positions(pipe, PROMPT, max_sequence_length=TEXT_LENGTH)
    assert tokens.special_indices["pad"] and (reference[..., list(tokens.special_indices["pad"])] < 1e-3).all()


def test_words_sit_after_the_instructions_tail(pipe):
    tokens = family_of(pipe).text_positions(pipe, "A Red circle, on the left", max_sequence_length=TEXT_LENGTH)
    assert len(tokens.tokens) == TEXT_LENGTH and tokens.tokens[0] == "<bos>"
    assert tokens.word_texts == ["A", "Red", "circle", "on", "the", "left"]
    assert [tokens.tokens[i] for i in tokens.indices_of("circle")] == ["\u2581circle"]
    # <bos>, then the lower-cased prompt: its first token takes the instruction's trailing space ("▁a"), so the
    # pipeline's `num_chi_prompt_tokens + max_sequence_length - 2` keeps the prompt from position 1
    assert tokens.indices_of("A") == [1] and tokens.tokens[1] == "▁a"


def test_generate_words_maps_unknown_word_reweight_and_edit(pipe):
    result = generate(pipe, PROMPT, **KW)
    assert result.words == WORDS and result.settings["family"] == "sana" and result.settings["text_part"] == "gemma"
    maps = result.word_maps()
    assert list(maps) == WORDS and all(m.shape == (32, 64) for m in maps.values())
    with pytest.raises(ValueError, match="word 'zebra' is not in the prompt"):
        result.heatmap("zebra")
    plain = run(pipe)
    assert np.array_equal(np.asarray(result.images[0]), (plain[0] * 255).round().astype(np.uint8))

    ones = generate(pipe, PROMPT, processor=ProcessorSpec("reweight", weights=(("circle", 1.0),)), **KW)
    assert np.array_equal(np.asarray(ones.images[0]), np.asarray(result.images[0]))
    assert all(torch.equal(ones.store.sums[l], result.store.sums[l]) for l in result.store.layers)
    zero = generate(pipe, PROMPT, processor=ProcessorSpec("reweight", weights=(("circle", 0.0),)), **KW)
    assert zero.heatmap("circle", normalize_by="none").max() == 0
    assert not np.array_equal(np.asarray(zero.images[0]), np.asarray(result.images[0]))

    explicit = generate(pipe, PROMPT, mode="explicit", **KW)
    torch.testing.assert_close(explicit.store.sums["transformer_blocks.0.attn2"],
                               result.store.sums["transformer_blocks.0.attn2"], rtol=0, atol=1e-5)
    edit = generate(pipe, PROMPT, processor=ProcessorSpec("edit", edit_prompt="a blue circle on the left"), **KW)
    assert len(edit.images) == 2 and edit.store.num_images == 2


def test_full_sana_1600m_transformer_on_the_meta_device():
    """Sana 1.6B 1024 px's transformer config (tests/configs/), weights on the meta device: its 20 cross-attention
    layers found (the 20 linear self-attention layers left alone), processors installed and restored, and a
    shapes-only forward at 1024 px (DC-AE factor 32) yields maps on the 32 x 32 token grid."""
    transformer = meta_model("SanaTransformer2DModel", "sana_1600m_1024px_transformer.json")
    layers = cross_attention_layers(transformer)
    assert layers == [f"transformer_blocks.{i}.attn2" for i in range(20)]
    meta = dict(device="meta")
    grid, text = 32, 300  # 1024 px / DC-AE factor 32, patch 1; the pipeline's max_sequence_length
    args = dict(hidden_states=torch.empty(1, 32, grid, grid, **meta),
                encoder_hidden_states=torch.empty(1, text, 2304, **meta), timestep=torch.empty(1, **meta),
                encoder_attention_mask=torch.empty(1, text, **meta))
    check_meta_capture(transformer, layers, SanaCaptureProcessor, args, grid, text,
                       untouched=[f"transformer_blocks.{i}.attn1.processor" for i in range(20)])
    assert SanaFamily(transformer).layer_sizes((32, 24))[layers[-1]] == (32, 24)
