"""Z-Image (one unified [image; caption] sequence per sample, each part padded to a multiple of 32, refiners that
see only one side, guidance batched as [conditional, unconditional], no `attn_processors` on the model): exact
images, maps on the patch grid under the batch's mask, words among the caption's positions, reweight, and the
full Z-Image transformer on the meta device."""

import numpy as np
import pytest
import torch

from conftest import CHAT_TEMPLATE, check_meta_capture, meta_model
from crossattn_sd import capture, generate
from crossattn_sd.families import ZImageFamily, family_of
from crossattn_sd.families.zimage import ZImageCaptureProcessor
from crossattn_sd.maps import MapStore
from crossattn_sd.processors import cross_attention_layers, install
from crossattn_sd.steering import ProcessorSpec
from test_qwenimage import tiny_qwen2_tokenizer

PROMPT = "a red circle on the left"
WORDS = ["a", "red", "circle", "on", "the", "left"]
TEXT_LENGTH = 16
KW = dict(steps=2, guidance_scale=3.0, height=32, width=48, max_sequence_length=TEXT_LENGTH)


def tiny_zimage_pipeline(seed: int = 0):
    """A seeded random ZImagePipeline (the shapes of Diffusers' Z-Image fast tests): two main layers and one
    refiner of each kind, a tiny Qwen3 encoder over an offline Qwen2 tokenizer with a chat template, a VAE of
    factor 2 with 16 latent channels, flow matching. A 32 x 48 image is an 8 x 12 token grid (patch 2)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = tiny_qwen2_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # made with torch.empty (as Diffusers' tests note): fix them
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, shift_factor=0.0,
    )
    text_encoder = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                          vocab_size=len(tokenizer), max_position_embeddings=512)).eval()
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_zimage_pipeline()


def run(pipe, height=32, width=48, steps=2, guidance=3.0, negative=None, max_length=TEXT_LENGTH):
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance, height=height,
                width=width, generator=generator, output_type="np", max_sequence_length=max_length).images


@pytest.mark.parametrize("height,width", [(32, 32), (32, 48)])
def test_exact_images_equal_diffusers_processors_bit_for_bit(pipe, height, width):
    reference = run(pipe, height, width)
    family = family_of(pipe)
    before = dict(family.attn_processors())
    with capture(pipe) as store:
        ours = run(pipe, height, width)
    assert np.abs(ours - reference).max() == 0
    assert store.layers == ["layers.0.attention", "layers.1.attention"]  # the refiners see one side only
    grid = (height // pipe.vae_scale_factor // 2, width // pipe.vae_scale_factor // 2)  # patch 2
    assert {store.layer_shape(l) for l in store.layers} == {grid} and store.num_steps == 2
    assert store.sums[store.layers[0]].shape[-1] == 32  # the caption padded to a multiple of 32
    assert all(p is before[k] for k, p in family.attn_processors().items())


def test_processors_restored_after_an_exception(pipe):
    family = family_of(pipe)
    before = dict(family.attn_processors())
    with pytest.raises(RuntimeError, match="boom"):
        with capture(pipe):
            assert isinstance(pipe.transformer.layers[0].attention.get_processor(), ZImageCaptureProcessor)
            raise RuntimeError("boom")
    assert all(p is before[k] for k, p in family.attn_processors().items())


def test_maps_are_the_conditional_halfs_share_of_the_unified_sequence(pipe):
    """Under guidance the batch is [conditional, unconditional] with captions of different lengths, so the unified
    sequences are padded and masked: the recorded map of the first main layer equals the conditional sample's image
    queries' softmax over all keys under that mask, caption columns only, from the layer's own modules."""
    layer = "layers.0.attention"
    attn = pipe.transformer.get_submodule(layer)
    grabbed = []
    hook = attn.register_forward_pre_hook(lambda m, args, kwargs: grabbed.append((args, dict(kwargs))),
                                          with_kwargs=True)
    family = family_of(pipe)
    store = MapStore()
    try:
        with install(family, store, lambda s, name: family.processor(s, name)):
            run(pipe, negative="red " * 40, max_length=48)  # the negative caption: 48 tokens, padded to 64
    finally:
        hook.remove()
    total = 0
    for args, kw in grabbed:
        hidden = args[0] if args else kw["hidden_states"]
        mask, freqs = kw["attention_mask"], kw["freqs_cis"]
        assert mask is not None and not mask[0].all() and mask[1].all()  # the conditional caption is the shorter
        with torch.no_grad():
            q = attn.norm_q(attn.to_q(hidden).unflatten(-1, (attn.heads, -1)))
            k = attn.norm_k(attn.to_k(hidden).unflatten(-1, (attn.heads, -1)))

            def rope(x):
                z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
                return torch.view_as_real(z * freqs.unsqueeze(2)).flatten(3)
            q, k = rope(q).transpose(1, 2), rope(k).transpose(1, 2)
            scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
            full = scores.masked_fill(~mask[:, None, None, :], -torch.inf).softmax(-1)
        total = total + full[:1, :, :96, 96:96 + 32].mean(1)  # 8 x 12 image tokens; the caption from 96
    reference = (total / len(grabbed)).reshape(1, 8, 12, 32)
    torch.testing.assert_close(store.layer_mean(layer), reference, rtol=0, atol=1e-6)


def test_words_sit_inside_the_chat_template(pipe):
    tokens = family_of(pipe).text_positions(pipe, PROMPT, max_sequence_length=TEXT_LENGTH)
    assert tokens.word_texts == WORDS and len(tokens.tokens) == 32
    assert tokens.tokens[:3] == ("<|im_start|>", "user", "\u010a")  # the template's tokens are kept
    assert [tokens.tokens[i] for i in tokens.indices_of("circle")] == ["\u0120circle"]
    assert tokens.special_indices["pad"] == tuple(range(14, 32))  # 14 tokens, then the transformer's padding


def test_generate_words_maps_unknown_word_and_reweight(pipe):
    result = generate(pipe, PROMPT, **KW)
    assert result.words == WORDS and result.settings["family"] == "zimage" and result.settings["text_part"] == "llm"
    maps = result.word_maps()
    assert list(maps) == WORDS and all(m.shape == (32, 48) for m in maps.values())
    with pytest.raises(ValueError, match="word 'zebra' is not in the prompt"):
        result.heatmap("zebra")
    plain = run(pipe)
    assert np.array_equal(np.asarray(result.images[0]), (plain[0] * 255).round().astype(np.uint8))

    ones = generate(pipe, PROMPT, processor=ProcessorSpec("reweight", weights=(("circle", 1.0),)), **KW)
    assert np.array_equal(np.asarray(ones.images[0]), np.asarray(result.images[0]))
    zero = generate(pipe, PROMPT, processor=ProcessorSpec("reweight", weights=(("circle", 0.0),)), **KW)
    assert zero.heatmap("circle", normalize_by="none").max() == 0
    assert not np.array_equal(np.asarray(zero.images[0]), np.asarray(result.images[0]))
    with pytest.raises(ValueError, match="Z-Image layers record in exact mode only"):
        generate(pipe, PROMPT, mode="explicit", **KW)


def test_full_zimage_turbo_transformer_on_the_meta_device():
    """Z-Image-Turbo's transformer config (tests/configs/), weights on the meta device: its 30 main layers found (the
    refiners left alone), processors installed and restored, and a shapes-only forward at 1024 px yields maps on
    the 64 x 64 grid."""
    transformer = meta_model("ZImageTransformer2DModel", "z_image_turbo_transformer.json")
    layers = cross_attention_layers(transformer)
    assert layers == [f"layers.{i}.attention" for i in range(30)]
    meta = dict(device="meta")
    latent, text = 128, 40  # 1024 px / VAE factor 8; a 40-token caption (padded to 64)
    args = dict(x=[torch.empty(16, 1, latent, latent, **meta)], t=torch.empty(1, **meta),
                cap_feats=[torch.empty(text, 2560, **meta)])
    refiners = [f"{n}.processor" for n, m in transformer.named_modules() if "refiner" in n and n.endswith(".attention")]
    assert refiners
    check_meta_capture(transformer, layers, ZImageCaptureProcessor, args, 64, 64, untouched=refiners)
    assert ZImageFamily(transformer).layer_sizes((128, 96))[layers[-1]] == (64, 48)
