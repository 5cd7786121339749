"""The recording processor: images equal Diffusers' own processor's, call counts, install/restore, layer choice."""
import re

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from conftest import RaiseInsideForward, meta_model
from crossattn_sd.maps import MapStore
from crossattn_sd.processors import CaptureProcessor, capture, cross_attention_layers, install

PROMPT = "a red circle on the left"
SIZES = [(32, 32), (32, 48)]  # square and non-square (H, W); VAE factor 2


def run(pipe, guidance=1.0, height=32, width=32, steps=2, prompt=PROMPT, **kwargs):
    """One seeded pipeline call; images as float32 numpy (N, H, W, 3)."""
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                generator=generator, output_type="np", **kwargs).images


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_exact_mode_images_are_bit_identical_to_diffusers(sd_pipe, guidance, height, width):
    assert all(isinstance(p, AttnProcessor2_0) for p in sd_pipe.unet.attn_processors.values())
    reference = run(sd_pipe, guidance, height, width)
    with capture(sd_pipe, "exact") as store:
        ours = run(sd_pipe, guidance, height, width)
    assert store.num_images == 1 and store.num_steps == 2
    assert (ours == reference).all()


@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_explicit_mode_images_match_within_2e_6(sd_pipe, guidance, height, width):
    """`probs @ V` computed by hand rounds differently from SDPA: measured at most 5.4e-7 on these images (the
    README's ~1e-6), so 2e-6 leaves a factor of about 4; a real change to the formula moves pixels far more."""
    reference = run(sd_pipe, guidance, height, width)
    with capture(sd_pipe, "explicit"):
        ours = run(sd_pipe, guidance, height, width)
    difference = np.abs(ours - reference).max()
    assert 0 < difference <= 2e-6  # not 0: explicit mode really took its own path


def test_recorded_maps_equal_a_reference_softmax(sd_pipe):
    """minGPT-style: the recorded map is softmax(Q K^T / sqrt(d)) of the conditional half, head-averaged."""
    unet = sd_pipe.unet
    layers = cross_attention_layers(unet)
    inputs = {name: [] for name in layers}
    hooks = []
    for name in layers:
        def grab(module, args, kwargs, name=name):
            hidden = args[0] if args else kwargs["hidden_states"]
            inputs[name].append((hidden.detach().clone(), kwargs["encoder_hidden_states"].detach().clone()))
        hooks.append(unet.get_submodule(name).register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with capture(sd_pipe, "exact") as store:
            run(sd_pipe, 3.0, 32, 48)
    finally:
        for h in hooks:
            h.remove()
    for name in layers:
        attn = unet.get_submodule(name)
        total = 0
        for hidden, text in inputs[name]:  # one per UNet call; batch is [unconditional, conditional]
            hidden, text = hidden[1:], text[1:]
            q = attn.to_q(hidden).unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (1, heads, Nq, d)
            k = attn.to_k(text).unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (1, heads, T, d)
            probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            total = total + probs.mean(dim=1)  # (1, Nq, T)
        expected = (total / len(inputs[name])).reshape(store.sums[name].shape)
        torch.testing.assert_close(store.layer_mean(name), expected, rtol=0, atol=1e-6)


def test_exact_and_explicit_record_the_same_maps(sd_pipe):
    maps = {}
    for mode in ("exact", "explicit"):
        with capture(sd_pipe, mode) as store:
            run(sd_pipe, 3.0)
        maps[mode] = store
    for name in maps["exact"].layers:
        torch.testing.assert_close(maps["exact"].sums[name], maps["explicit"].sums[name], rtol=0, atol=1e-5)


class CountingProcessor(CaptureProcessor):
    calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return super().__call__(*args, **kwargs)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_each_cross_attention_processor_runs_once_per_unet_call(sd_pipe, guidance):
    unet = sd_pipe.unet
    unet_calls = []
    hook = unet.register_forward_pre_hook(lambda *_: unet_calls.append(1))
    made = []

    def factory(store, layer, _original):
        made.append(CountingProcessor(store, layer))
        return made[-1]

    store = MapStore(cfg=lambda: sd_pipe.do_classifier_free_guidance)
    try:
        with install(unet, store, factory):
            run(sd_pipe, guidance, steps=3)
    finally:
        hook.remove()
    assert len(unet_calls) == 3  # DDIM: one UNet evaluation per step, CFG halves in one batch
    assert sorted(p.layer for p in made) == sorted(cross_attention_layers(unet))
    assert [p.calls for p in made] == [3] * len(made)
    assert store.counts == {layer: 3 for layer in cross_attention_layers(unet)}
    assert store.num_steps == 3 and len(store.timesteps) == 3


def test_self_attention_untouched_every_key_filled_and_restored(sd_pipe):
    unet = sd_pipe.unet
    before = dict(unet.attn_processors)
    cross = {f"{name}.processor" for name in cross_attention_layers(unet)}
    assert cross and all(k.endswith("attn2.processor") for k in cross)
    with capture(sd_pipe) as store:
        inside = dict(unet.attn_processors)
        run(sd_pipe, 1.0, steps=1)
        during = dict(unet.attn_processors)
    after = dict(unet.attn_processors)
    assert set(inside) == set(before) == set(after)
    for key in before:
        if key in cross:
            assert isinstance(inside[key], CaptureProcessor) and inside[key].store is store
            assert inside[key].layer == key.removesuffix(".processor")
        else:
            assert inside[key] is before[key]
        assert during[key] is inside[key]
        assert after[key] is before[key]
    assert store.counts  # the processors seen inside really recorded


@pytest.mark.parametrize("mode", ["exact", "explicit"])
def test_processors_restored_after_an_error_inside_the_forward_pass(sd_pipe, mode):
    unet = sd_pipe.unet
    before = dict(unet.attn_processors)
    with RaiseInsideForward(unet, on_call=2) as boom:  # the second UNet call: one step ran, one is cut short
        with pytest.raises(RuntimeError, match="boom inside the forward pass"):
            with capture(sd_pipe, mode):
                run(sd_pipe, 1.0, steps=3)
    assert isinstance(boom.processor_seen, CaptureProcessor)  # it raised while ours were installed
    after = dict(unet.attn_processors)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    assert not unet._forward_pre_hooks  # the step hook is gone too


def test_layer_pattern_records_only_those_layers(sd_pipe):
    unet = sd_pipe.unet
    before = dict(unet.attn_processors)
    with capture(sd_pipe, layers="up_blocks.*") as store:
        inside = dict(unet.attn_processors)
        run(sd_pipe, 3.0, steps=1)
    up = [n for n in cross_attention_layers(unet) if n.startswith("up_blocks.")]
    assert store.layers == up and len(up) == 4
    for key, proc in inside.items():
        assert isinstance(proc, CaptureProcessor) == (key.removesuffix(".processor") in up)
        if key.removesuffix(".processor") not in up:
            assert proc is before[key]


def test_bad_layers_and_mode_are_refused(sd_pipe):
    with pytest.raises(ValueError, match=r"layers='nope\.\*' matches no cross-attention layer"):
        with capture(sd_pipe, layers="nope.*"):
            pass
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        with capture(sd_pipe, mode="fast"):
            pass
    assert all(isinstance(p, AttnProcessor2_0) for p in sd_pipe.unet.attn_processors.values())


def test_capture_works_on_a_bare_unet(sd_pipe):
    unet = sd_pipe.unet
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 8, 12)
    text = torch.randn(2, 16, 16)
    with torch.no_grad():
        reference = unet(sample, 10, text).sample
        with capture(unet) as store:  # no pipeline: the whole batch is recorded
            ours = unet(sample, 10, text).sample
    assert torch.equal(ours, reference)
    assert store.num_images == 2 and store.timesteps == [10.0]
    assert store.resolutions() == [(8, 12), (4, 6)]


# Every family's full-size denoiser (published configs, weights on the meta device), by Diffusers class.
FULL_SIZE = {"sd15_unet.json": "UNet2DConditionModel", "sd35_medium_transformer.json": "SD3Transformer2DModel",
             "flux1_dev_transformer.json": "FluxTransformer2DModel",
             "flux2_klein_4b_transformer.json": "Flux2Transformer2DModel",
             "chroma1_hd_transformer.json": "ChromaTransformer2DModel",
             "qwen_image_transformer.json": "QwenImageTransformer2DModel",
             "sana_1600m_1024px_transformer.json": "SanaTransformer2DModel",
             "z_image_turbo_transformer.json": "ZImageTransformer2DModel"}


@pytest.mark.parametrize("config", sorted(FULL_SIZE))
def test_the_family_reads_and_sets_processors_as_diffusers_does(config):
    """`Family.attn_processors` / `set_attn_processor` go through each layer's `get_processor` / `set_processor`
    after one walk: the same keys, order and objects as Diffusers' `AttentionMixin.attn_processors` (also on
    Z-Image, which lacks the mixin), what Diffusers then reads back is what was set, and a dict that misses a
    layer or names one the model lacks is refused without setting anything."""
    from diffusers.models.attention import AttentionMixin

    from crossattn_sd.families import family_of

    model = meta_model(FULL_SIZE[config], config)
    diffusers_read = AttentionMixin.attn_processors.fget  # the mixin's own walk
    family = family_of(model)
    ours, theirs = family.attn_processors(), diffusers_read(model)
    assert len(ours) > 10 and list(ours) == list(theirs) and all(ours[k] is theirs[k] for k in theirs)

    markers = {key: AttnProcessor2_0() for key in ours}
    given = dict(markers)
    family.set_attn_processor(given)
    assert given == markers  # not emptied, unlike Diffusers' set_attn_processor
    assert all(p is markers[k] for k, p in diffusers_read(model).items())
    first = next(iter(ours))
    with pytest.raises(ValueError, match=rf"needs one processor for each of the {len(ours)} attention layers of "
                                         rf"the {type(model).__name__}; '{re.escape(first)}' is missing"):
        family.set_attn_processor({k: p for k, p in ours.items() if k != first})
    with pytest.raises(ValueError, match=r"'nope\.processor' is not one of them"):
        family.set_attn_processor({**ours, "nope.processor": AttnProcessor2_0()})
    assert all(p is markers[k] for k, p in diffusers_read(model).items())  # nothing was set by the refusals
    family_of(model).set_attn_processor(ours)  # a fresh adapter walks for itself
    assert all(p is ours[k] for k, p in diffusers_read(model).items())


def test_an_unsupported_model_is_refused_naming_every_supported_family():
    """A pipeline whose denoiser no family handles: one line naming it, its denoiser and every family, in order."""
    from crossattn_sd.families import FAMILIES

    PixArtSigmaPipeline = type("PixArtSigmaPipeline", (), {})
    fake = PixArtSigmaPipeline()
    fake.transformer = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError) as refused:
        capture(fake).__enter__()
    message = str(refused.value)
    assert "\n" not in message
    assert message == ("crossattn-sd does not support PixArtSigmaPipeline (denoiser Linear); supported: "
                       + "; ".join(f.description for f in FAMILIES))
    assert message.count("; ") == len(FAMILIES) >= 8 and "ZImageTransformer2DModel (Z-Image)" in message
