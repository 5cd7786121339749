"""The map store: shapes, image bookkeeping, the conditional half under guidance, per-step maps and their budget."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from crossattn_sd import generate
from crossattn_sd.aggregate import normalize, token_map, token_maps
from crossattn_sd.maps import MapStore, layer_hw
from crossattn_sd.processors import capture, guidance_probe, install, CaptureProcessor

PROMPTS = ["a red circle on the left", "cat"]  # different token counts: misplaced maps would show


def latents_for(pipe, n, height=32, width=48):
    generator = torch.Generator().manual_seed(0)
    shape = (n, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return torch.randn(shape, generator=generator)


def call(pipe, prompt, latents, guidance=3.0, steps=2, **kwargs):
    return pipe(prompt, latents=latents, num_inference_steps=steps, guidance_scale=guidance,
                height=latents.shape[-2] * pipe.vae_scale_factor, width=latents.shape[-1] * pipe.vae_scale_factor,
                output_type="latent", **kwargs)


# -- unit tests on a hand-filled store -----------------------------------------------------------------------


def test_layer_hw_follows_stride_2_downsampling():
    assert layer_hw((16, 24), 16 * 24) == (16, 24)
    assert layer_hw((16, 24), 8 * 12) == (8, 12)
    assert layer_hw((9, 5), 5 * 3) == (5, 3)  # odd sizes round up, as a padded stride-2 conv does
    assert layer_hw((9, 5), 2 * 1) == (2, 1)
    with pytest.raises(ValueError, match="cannot place 7 queries on a latent of 16x24"):
        layer_hw((16, 24), 7)


def test_record_averages_heads_and_token_map_upsamples_exactly():
    store = MapStore()
    store.begin_call((2, 2), timestep=5)
    probs = torch.zeros(1 * 2, 4, 3)  # (images * heads, queries, tokens)
    probs[0, :, 1] = 1.0  # head 0: everything on token 1
    probs[1, :, 2] = 1.0  # head 1: everything on token 2
    store.record("l", probs, heads=2)
    store.begin_call((2, 2), timestep=4)
    store.record("l", probs, heads=2)
    assert store.sums["l"].shape == (1, 2, 2, 3) and store.counts["l"] == 2
    assert torch.equal(store.layer_mean("l")[0, :, :, 1], torch.full((2, 2), 0.5))
    assert torch.equal(token_map(store, [1, 2], (4, 4)), torch.ones(4, 4))  # constant maps stay constant
    assert torch.equal(token_map(store, [], (4, 4)), torch.zeros(4, 4))
    assert store.timesteps == [5.0, 4.0]


def test_record_before_begin_call_is_an_error():
    with pytest.raises(RuntimeError, match="before begin_call"):
        MapStore().record("l", torch.ones(2, 4, 3) / 3, heads=2)


def test_conditional_half_and_odd_batches():
    store = MapStore(cfg=True)
    store.begin_call((2, 2))
    assert store.conditional(4) == slice(2, 4)
    with pytest.raises(ValueError, match="odd size 3"):
        store.conditional(3)
    assert MapStore(cfg=False).conditional(3) == slice(0, 3)


def test_normalize():
    m = torch.tensor([[1.0, 3.0], [2.0, 5.0]])
    assert torch.equal(normalize(m), torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.equal(normalize(m, "max"), m / 5)
    assert torch.equal(normalize(m / 10, "none"), m / 10)
    assert torch.equal(normalize(torch.full((2, 2), 0.3)), torch.zeros(2, 2))  # flat map: no division by 0
    with pytest.raises(ValueError, match="unknown normalize='log'"):
        normalize(m, "log")


# -- stores filled by the tiny pipeline ----------------------------------------------------------------------


def test_token_maps_match_per_layer_upsampling_and_one_group_at_a_time(sd_pipe):
    """Several groups at once (layers of a resolution summed, then upsampled once) equal upsampling every layer
    for every group, and each group's map is the same bits as that group computed alone."""
    with capture(sd_pipe) as store:
        call(sd_pipe, PROMPTS[0], latents_for(sd_pipe, 1))
    groups = [[1], [2, 3], [], [1, 4, 5], [0], [6]]
    together = token_maps(store, groups, (32, 48))
    assert together.shape == (len(groups), 32, 48)
    for group, m in zip(groups, together):
        assert torch.equal(m, token_map(store, group, (32, 48)))
        idx = torch.tensor(group, dtype=torch.long)
        expected = sum(F.interpolate(store.layer_mean(n)[0].index_select(-1, idx).sum(-1)[None, None],
                                     size=(32, 48), mode="bilinear", align_corners=False)[0, 0]
                       for n in store.layers) / len(store.layers)
        torch.testing.assert_close(m, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("height,width,sizes", [(32, 32, [(16, 16), (8, 8)]), (32, 48, [(16, 24), (8, 12)])])
def test_map_shapes_square_and_non_square(sd_pipe, height, width, sizes):
    result = generate(sd_pipe, PROMPTS[0], steps=1, guidance_scale=1.0, height=height, width=width)
    store = result.store
    assert store.resolutions() == sizes
    tokens = sd_pipe.tokenizer.model_max_length
    for layer in store.layers:
        n, h, w, t = store.sums[layer].shape
        assert (n, t) == (1, tokens) and (h, w) in sizes
        assert store.sums[layer].dtype == torch.float32
    heat = result.heatmap("circle")
    assert heat.shape == (height, width)


def test_several_images_each_map_belongs_to_its_prompt(sd_pipe):
    """2 prompts x 2 images: image i's maps equal those of a run of its own prompt on its own noise."""
    latents = latents_for(sd_pipe, 4)
    with capture(sd_pipe) as batch:
        call(sd_pipe, PROMPTS, latents, num_images_per_prompt=2)
    assert batch.num_images == 4
    for i in range(4):
        with capture(sd_pipe) as alone:
            call(sd_pipe, PROMPTS[i // 2], latents[i:i + 1])  # Diffusers orders images prompt-major
        for layer in batch.layers:
            torch.testing.assert_close(batch.sums[layer][i], alone.sums[layer][0], rtol=0, atol=1e-5)

    result = generate(sd_pipe, PROMPTS, steps=1, guidance_scale=3.0, height=32, width=48, num_images_per_prompt=2)
    assert len(result.images) == result.store.num_images == 4
    assert [a.prompt for a in result.alignments] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert result.alignments[1].word_texts == ["a", "red", "circle", "on", "the", "left"]
    assert result.alignments[2].word_texts == ["cat"]
    with pytest.raises(ValueError, match="'circle' is not in the prompt"):
        result.heatmap("circle", image_index=2)
    assert result.heatmap("cat", image_index=3).shape == (32, 48)


def test_guidance_keeps_only_the_conditional_half(sd_pipe):
    latents = latents_for(sd_pipe, 2)
    with capture(sd_pipe) as cond:
        call(sd_pipe, PROMPTS, latents)
    assert cond.num_images == 2  # the number of images, not the UNet batch (4)

    everything = MapStore(cfg=False)  # record the whole [unconditional, conditional] batch
    with install(sd_pipe.unet, everything, lambda s, layer, _original: CaptureProcessor(s, layer)):
        call(sd_pipe, PROMPTS, latents)
    assert everything.num_images == 4
    for layer in cond.layers:
        torch.testing.assert_close(cond.sums[layer], everything.sums[layer][2:], rtol=0, atol=1e-6)
        assert not torch.allclose(cond.sums[layer], everything.sums[layer][:2], atol=1e-3)

    with capture(sd_pipe) as plain:
        call(sd_pipe, PROMPTS, latents, guidance=1.0)  # no guidance: the batch is all conditional
    assert plain.num_images == 2


def test_probabilities_over_all_tokens_sum_to_one(sd_pipe):
    with capture(sd_pipe) as store:
        call(sd_pipe, PROMPTS, latents_for(sd_pipe, 2))
    assert len(store.layers) == 7
    for layer in store.layers:
        total = store.layer_mean(layer).sum(dim=-1)
        torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-5)


def test_per_step_maps_average_to_the_running_mean(sd_pipe):
    result = generate(sd_pipe, PROMPTS[0], steps=3, guidance_scale=3.0, height=32, width=48, per_step=True,
                      per_step_tokens="all")
    store = result.store
    assert store.has_steps and len(store.steps) == store.num_steps == 3
    for layer in store.layers:
        per_step = torch.stack([step[layer] for step in store.steps]).mean(dim=0)
        torch.testing.assert_close(per_step, store.layer_mean(layer), rtol=0, atol=1e-6)
        torch.testing.assert_close(store.layer_mean(layer, steps=[0, 1, 2]), store.layer_mean(layer),
                                   rtol=0, atol=1e-6)
    all_steps = result.heatmap("circle", steps=range(3), normalize_by="none")
    assert abs(all_steps - result.heatmap("circle", normalize_by="none")).max() < 1e-6
    first = result.heatmap("circle", steps=[0], normalize_by="none")
    assert abs(first - all_steps).max() > 1e-6  # a step range really selects
    with pytest.raises(ValueError, match=r"steps \[7\] are out of range; this run has steps 0..2"):
        result.heatmap("circle", steps=[1, 7])
    with pytest.raises(ValueError, match=r"steps \[-1\] are out of range"):
        result.heatmap("circle", steps=[-1])
    with pytest.raises(ValueError, match=r"steps \[\] select nothing; this run has steps 0..2"):
        result.heatmap("circle", steps=[])


def test_per_step_budget_drops_detail_keeps_sums(sd_pipe):
    kwargs = dict(steps=2, guidance_scale=3.0, height=32, width=48)
    full = generate(sd_pipe, PROMPTS[0], **kwargs)
    with pytest.warns(RuntimeWarning, match="max_step_bytes=1000"):
        small = generate(sd_pipe, PROMPTS[0], per_step=True, max_step_bytes=1000, **kwargs)
    store = small.store
    assert store.steps_dropped and not store.has_steps and store.steps == [] and store.step_bytes == 0
    assert store.counts == full.store.counts
    for layer in full.store.layers:
        assert torch.equal(store.sums[layer], full.store.sums[layer])
    assert (small.heatmap("circle") == full.heatmap("circle")).all()
    with pytest.raises(ValueError, match="per-step maps were dropped at max_step_bytes"):
        small.heatmap("circle", steps=range(2))
    with pytest.raises(ValueError, match="per-step maps were not kept; generate with per_step=True"):
        full.heatmap("circle", steps=[0])


@pytest.mark.parametrize("mode", ["exact", "explicit"])  # exact defers the softmax; explicit records each call
def test_per_step_budget_reached_after_some_steps_were_stored(sd_pipe, mode):
    kwargs = dict(steps=3, guidance_scale=3.0, height=32, width=48, mode=mode)
    full = generate(sd_pipe, PROMPTS[0], per_step=True, **kwargs)
    one_step = sum(m.numel() * 4 for m in full.store.steps[0].values())
    assert full.store.step_bytes == 3 * one_step and not full.store.steps_dropped
    budget = 2 * one_step + one_step // 2  # two steps fit, the third does not
    with pytest.warns(RuntimeWarning, match=f"max_step_bytes={budget}") as caught:
        cut = generate(sd_pipe, PROMPTS[0], per_step=True, max_step_bytes=budget, **kwargs)
    assert len(caught) == 1  # warned once, not once per layer or step after
    store = cut.store
    assert store.steps_dropped and store.steps == [] and store.step_bytes == 0 and not store.has_steps
    assert store.counts == full.store.counts and store.num_steps == 3
    for layer in full.store.layers:  # the sums are whole: the steps stored before the budget was reached count
        assert torch.equal(store.sums[layer], full.store.sums[layer])
    assert (cut.heatmap("circle") == full.heatmap("circle")).all()
    with pytest.raises(ValueError, match="per-step maps were dropped at max_step_bytes"):
        cut.heatmap("circle", steps=[0])  # no half-kept timeline: step 0 was stored, then dropped with the rest
    exact_fit = generate(sd_pipe, PROMPTS[0], per_step=True, max_step_bytes=3 * one_step, **kwargs)
    assert exact_fit.store.has_steps and (exact_fit.heatmap("circle", steps=[0]) == full.heatmap("circle", steps=[0])).all()


def test_per_step_budget_that_fits_warns_nothing(sd_pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = generate(sd_pipe, PROMPTS[0], steps=2, guidance_scale=1.0, height=32, width=32, per_step=True)
    one_step = sum(m.numel() * 4 for m in result.store.steps[0].values())
    assert result.store.step_bytes == 2 * one_step


@pytest.mark.parametrize("defer_bytes", [0, 100_000])
def test_deferred_softmax_records_the_same_maps(sd_pipe, defer_bytes):
    """Exact mode hands the store Q and K; their softmax batched over all steps (one flush when the block ends)
    records the same sums, per-step and per-head maps as computing it at every step (defer_bytes=0) or in
    the batches a small budget forces."""
    latents = latents_for(sd_pipe, 2)
    with capture(sd_pipe, per_step=True, keep_heads=True) as batched:
        call(sd_pipe, PROMPTS, latents, steps=3)
        assert batched._pending_bytes > 0  # nothing computed yet...
        assert batched.resolutions() == [(16, 24), (8, 12)]  # ...until something reads the maps
        assert not batched._pending and len(batched.layers) == 7
    other = MapStore(per_step=True, keep_heads=True, cfg=guidance_probe(sd_pipe), defer_bytes=defer_bytes)
    with install(sd_pipe.unet, other, lambda s, layer, _original: CaptureProcessor(s, layer)):
        call(sd_pipe, PROMPTS, latents, steps=3)
    assert other.layers == batched.layers and other.counts == batched.counts == {l: 3 for l in other.layers}
    for layer in batched.layers:
        torch.testing.assert_close(other.sums[layer], batched.sums[layer], rtol=0, atol=1e-6)
        torch.testing.assert_close(other.head_sums[layer], batched.head_sums[layer], rtol=0, atol=1e-6)
        for a, b in zip(other.steps, batched.steps, strict=True):
            torch.testing.assert_close(a[layer], b[layer], rtol=0, atol=1e-6)


def test_state_dict_round_trip(sd_pipe):
    result = generate(sd_pipe, PROMPTS[0], steps=2, guidance_scale=3.0, height=32, width=48, per_step=True,
                      keep_heads=True)
    store = result.store
    back = MapStore.from_state_dict(store.state_dict(), per_step=True, keep_heads=True)
    assert back.layers == store.layers and back.counts == store.counts and back.timesteps == store.timesteps
    for layer in store.layers:
        assert torch.equal(back.sums[layer], store.sums[layer])
        assert torch.equal(back.head_sums[layer], store.head_sums[layer])
        assert all(torch.equal(b[layer], s[layer]) for b, s in zip(back.steps, store.steps, strict=True))
