"""The uniform processor: every image query attends equally to every text token on the chosen layers."""
import numpy as np
import pytest
import torch

from conftest import tiny_sd3_pipeline, tiny_sd_pipeline
from crossattn_sd import generate
from crossattn_sd.families import family_of
from crossattn_sd.maps import MapStore
from crossattn_sd.processors import capture, cross_attention_layers, install
from crossattn_sd.steering import ProcessorSpec, uniform_factory, use_processor

PROMPT = "a red circle on the left"
KW = dict(steps=2, guidance_scale=3.0, height=32, width=48)


class MeanOfValues:
    """The reference: out = to_out(mean over the text tokens of to_v(text)), the same vector at every pixel."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch, channel, height, width = hidden_states.shape if hidden_states.ndim == 4 else (None,) * 4
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        mean = attn.to_v(encoder_hidden_states).mean(dim=1, keepdim=True)  # (B, 1, inner)
        out = attn.to_out[1](attn.to_out[0](mean.expand(-1, hidden_states.shape[1], -1)))
        if batch is not None:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


def unet_inputs(unet, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, unet.config.in_channels, 4, 6, generator=gen)  # non-square latent
    text = torch.randn(2, 16, unet.config.cross_attention_dim, generator=gen)
    return sample, torch.tensor([10, 10]), text


def test_uniform_on_all_layers_is_the_mean_of_the_values(pipe):
    unet = pipe.unet
    sample, t, text = unet_inputs(unet)
    with use_processor(unet, ProcessorSpec("uniform"), prompts=[PROMPT], steps=1) as store:
        with torch.no_grad():
            ours = unet(sample, t, text).sample
    originals = dict(unet.attn_processors)
    layers = set(cross_attention_layers(unet))
    unet.set_attn_processor({k: MeanOfValues() if k.removesuffix(".processor") in layers else p
                             for k, p in originals.items()})
    try:
        with torch.no_grad():
            reference = unet(sample, t, text).sample
    finally:
        unet.set_attn_processor(originals)
    with torch.no_grad():
        plain = unet(sample, t, text).sample
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-3  # the reference is not the plain model: the test can tell them apart
    assert sorted(store.layers) == sorted(cross_attention_layers(unet))


def test_uniform_on_no_layers_is_capture_bit_for_bit(pipe):
    unet = pipe.unet
    sample, t, text = unet_inputs(unet, seed=1)
    family = family_of(unet)
    with install(family, MapStore(), uniform_factory(family, set()), "*") as store, torch.no_grad():
        ours = unet(sample, t, text).sample
    with capture(unet) as maps, torch.no_grad():
        captured = unet(sample, t, text).sample
    assert torch.equal(ours, captured)
    assert store.layers == maps.layers
    assert all(torch.equal(store.sums[layer], maps.sums[layer]) for layer in maps.layers)


def test_uniform_maps_are_flat_and_other_layers_record_as_capture(pipe):
    layers = cross_attention_layers(pipe)
    chosen = layers[0]
    result = generate(pipe, PROMPT, processor=ProcessorSpec("uniform", layers=chosen), **KW)
    mean_map = result.store.sums[chosen] / result.store.counts[chosen]  # (images, h, w, T)
    torch.testing.assert_close(mean_map, torch.full_like(mean_map, 1.0 / mean_map.shape[-1]))
    assert sorted(result.store.layers) == sorted(layers)  # every layer records; only the chosen one attends uniformly
    other = layers[-1]
    assert result.store.sums[other].std(dim=(1, 2)).max() > 1e-4  # a real layer's maps vary over the pixels
    heat = result.heatmap("circle", layers=[chosen], normalize_by="none")
    assert np.ptp(heat) < 1e-6
    plain = generate(pipe, PROMPT, **KW)
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(plain.images[0]))
    assert result.settings["processor"]["name"] == "uniform"


def test_uniform_is_refused_on_joint_attention_with_a_clear_message():
    pipe = tiny_sd3_pipeline()
    with pytest.raises(ValueError, match="uniform processor needs cross-attention layers"):
        generate(pipe, PROMPT, processor=ProcessorSpec("uniform"), steps=1, height=32, width=32)


def test_uniform_layer_selector_that_matches_nothing_names_the_layers(pipe):
    with pytest.raises(ValueError, match="matches no cross-attention layer"):
        generate(pipe, PROMPT, processor=ProcessorSpec("uniform", layers="nothing.*"), **KW)
