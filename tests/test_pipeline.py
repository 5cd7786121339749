"""`generate`: progress, cancellation (processors and scheduler restored), scheduler swaps, argument errors."""
import threading

import numpy as np
import pytest

from conftest import RaiseInsideForward, tiny_sd_pipeline
from crossattn_sd import ProcessorSpec, generate
from crossattn_sd.pipeline import GenerationCancelled
from crossattn_sd.processors import CaptureProcessor

PROMPT = "a red circle on the left"
KW = dict(guidance_scale=3.0, height=16, width=24)
PROCESSORS = [ProcessorSpec("default"), ProcessorSpec("capture"), ProcessorSpec("reweight", weights=(("red", 2.0),)),
              ProcessorSpec("edit", edit_prompt="a blue circle on the left")]


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


@pytest.mark.parametrize("scheduler,calls", [(None, 3), ("euler", 3), ("pndm", 3 + 1)])
def test_progress_is_called_once_per_step_with_its_total(pipe, scheduler, calls):
    seen = []
    generate(pipe, PROMPT, steps=3, scheduler=scheduler, progress=lambda i, n: seen.append((i, n)), **KW)
    # PNDM (SD 1.5's default) takes one step more than `steps`; the total says how many there are
    assert seen == [(i, calls) for i in range(1, calls + 1)]


def test_pndm_runs_with_few_steps(pipe):
    """Diffusers' PNDM with Runge-Kutta warm-up fails below 4 steps; "pndm" is PLMS, as SD configures it."""
    assert pipe.scheduler.config.get("skip_prk_steps") is None  # a DDIM config: PNDM would default to PRK
    result = generate(pipe, PROMPT, steps=1, scheduler="pndm", **KW)
    assert result.settings["scheduler_class"] == "PNDMScheduler" and result.store.num_steps == 1


def test_a_zero_terminal_snr_model_refuses_a_scheduler_that_cannot_follow_it():
    """The embedded model is trained with `rescale_betas_zero_snr`; PNDM has no such option and would sample it
    from the wrong noise levels, so it is neither offered nor accepted, and the error names what works."""
    from crossattn_sd.pipeline import SCHEDULERS, schedulers_for

    zsnr = tiny_sd_pipeline()
    zsnr.scheduler = type(zsnr.scheduler).from_config(zsnr.scheduler.config, rescale_betas_zero_snr=True)
    usable = schedulers_for(zsnr)
    assert "pndm" not in usable and {"default", "dpm++", "euler", "ddim"} <= set(usable)
    assert schedulers_for(tiny_sd_pipeline()) == list(SCHEDULERS)
    with pytest.raises(ValueError, match="'pndm' cannot follow .* use one of default, dpm"):
        generate(zsnr, PROMPT, steps=1, scheduler="pndm", **KW)
    result = generate(zsnr, PROMPT, steps=2, scheduler="euler", **KW)
    assert result.settings["scheduler_class"] == "EulerDiscreteScheduler"


@pytest.mark.parametrize("spec", PROCESSORS, ids=lambda s: s.name)
def test_cancel_raises_and_restores_processors_and_scheduler(pipe, spec):
    before, scheduler = dict(pipe.unet.attn_processors), pipe.scheduler
    cancel, seen = threading.Event(), []

    def progress(i, n):
        seen.append(i)
        if i == 1:
            cancel.set()

    with pytest.raises(GenerationCancelled, match="cancelled"):
        generate(pipe, PROMPT, steps=4, scheduler="euler", processor=spec, progress=progress, cancel=cancel, **KW)
    assert seen == [1]  # no step after the one that cancelled
    after = dict(pipe.unet.attn_processors)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert pipe.scheduler is scheduler and not pipe.unet._forward_pre_hooks
    assert generate(pipe, PROMPT, steps=1, **KW).store.num_steps == 1  # the pipeline still works


def test_a_cancel_set_before_the_call_stops_at_the_first_step(pipe):
    cancel, seen, unet_calls = threading.Event(), [], []
    cancel.set()
    hook = pipe.unet.register_forward_hook(lambda *args: unet_calls.append(1))
    try:
        with pytest.raises(GenerationCancelled):
            generate(pipe, PROMPT, steps=3, cancel=cancel, progress=lambda i, n: seen.append(i), **KW)
    finally:
        hook.remove()
    assert seen == [1] and len(unet_calls) == 1  # one step ran (Diffusers checks the flag after each), not three


@pytest.mark.parametrize("spec", PROCESSORS, ids=lambda s: s.name)
def test_an_error_inside_generate_restores_processors_and_scheduler(pipe, spec):
    before, scheduler = dict(pipe.unet.attn_processors), pipe.scheduler
    with RaiseInsideForward(pipe.unet, on_call=2) as boom:  # inside the UNet's second call, mid-generation
        with pytest.raises(RuntimeError, match="boom inside the forward pass"):
            generate(pipe, PROMPT, steps=3, scheduler="euler", processor=spec, **KW)
    assert boom.calls == 2
    if spec.name != "default":
        assert isinstance(boom.processor_seen, CaptureProcessor)
    after = dict(pipe.unet.attn_processors)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert pipe.scheduler is scheduler and not pipe.unet._forward_pre_hooks


def test_the_negative_prompt_steers_the_image_as_in_diffusers(pipe):
    import torch

    plain = generate(pipe, PROMPT, steps=2, **KW)
    negative = generate(pipe, PROMPT, negative_prompt="a blue square", steps=2, **KW)
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(negative.images[0]))
    assert negative.words == plain.words and negative.settings["negative_prompt"] == "a blue square"
    reference = pipe(PROMPT, negative_prompt="a blue square", num_inference_steps=2, guidance_scale=KW["guidance_scale"],
                     height=KW["height"], width=KW["width"], generator=torch.Generator().manual_seed(0)).images[0]
    assert np.asarray(negative.images[0]).tobytes() == np.asarray(reference).tobytes()  # Diffusers' own use of it
    off = dict(KW, guidance_scale=1.0)  # without guidance there is no unconditional pass to replace
    assert np.array_equal(np.asarray(generate(pipe, PROMPT, negative_prompt="a blue square", steps=2, **off).images[0]),
                          np.asarray(generate(pipe, PROMPT, steps=2, **off).images[0]))


def test_scheduler_swap_is_used_for_the_call_and_restored(pipe):
    scheduler = pipe.scheduler
    used = []
    result = generate(pipe, PROMPT, steps=2, scheduler="euler",
                      progress=lambda i, n: used.append(type(pipe.scheduler).__name__), **KW)
    assert used == ["EulerDiscreteScheduler"] * 2
    assert pipe.scheduler is scheduler
    assert result.settings["scheduler"] == "euler" and result.settings["scheduler_class"] == "EulerDiscreteScheduler"
    plain = generate(pipe, PROMPT, steps=2, **KW)
    assert plain.settings["scheduler_class"] == "DDIMScheduler"
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(result.images[0]))


@pytest.mark.parametrize("kwargs,message", [
    (dict(height=20), "height=20 is not a multiple of 8 .*; use 16 or 24"),
    (dict(width=4), r"width=4 is out of range; use a value between 8 and 8192 that is a multiple of 8"),
    (dict(steps=2.5), "steps must be an integer, got 2.5"),
    (dict(mode="fast"), "unknown mode 'fast'; use one of exact, explicit"),
    (dict(scheduler="heun"), "unknown scheduler 'heun'; use one of default, dpm"),
    (dict(guidance_scale=float("nan")), "guidance_scale=nan is out of range"),
    (dict(prompt=[]), "prompt must be a string or a non-empty list"),
    (dict(negative_prompt=["x", "y"]), "got 2 negative prompts for 1 prompts"),
])
def test_bad_arguments_are_value_errors_naming_the_value(pipe, kwargs, message):
    before = dict(pipe.unet.attn_processors)
    call = dict(prompt=PROMPT, steps=1, **KW) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(pipe, call.pop("prompt"), **call)
    assert all(p is before[k] for k, p in pipe.unet.attn_processors.items())
