"""Where `generate()` + every word's map spends its time beyond plain Diffusers, part by part.

End-to-end ratios (`capture_overhead.py`) on a shared VM scatter by +-10 % from run to run, so a 1-3 % cost is
hard to see there. This script times each thing recording adds on its own, many times, against its own baseline,
on the embedded model with the call `capture_overhead.py` makes (20 steps, guidance 2, 64 x 64, its prompt):

  install + restore   `with capture(pipe): pass`: reading the processors, installing, restoring, the hooks
  per step            one denoiser call on the pipeline's own step inputs (recorded from a real generation) on
                      the recording processors minus the same call on Diffusers' own, both inside one `capture()`
                      block (swapped per call, untimed; paired, the order alternating), times the number of steps:
                      the recording processors and handing over queries and keys (the hooks run in both)
  flush               `store.flush()` after the 20 steps: the batched softmax that turns them into maps
  word maps           `result.word_maps(layers="*")` of a `generate()` result: every distinct word's (H, W) map
  bookkeeping         `generate()` against `capture()` with the pipeline call replaced by a stub (validation,
                      alignment, the result; `generate_bookkeeping.py`)

and a plain generation for scale. Medians of process CPU time (one torch thread). The sum of the parts over the
plain generation is the overhead ratio the parts account for.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/overhead_parts.py --rounds 200
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

PROMPT = "a red circle on the left and a blue square on the right"


def median_error(values) -> float:
    """Standard error of a median, from the interquartile range (normal approximation: 1.2533 sigma / sqrt(n))."""
    q = statistics.quantiles(values, n=4)
    return 1.2533 * (q[2] - q[0]) / 1.349 / len(values) ** 0.5


def cpu_ms(fn) -> float:
    t0 = time.process_time()
    fn()
    return 1000 * (time.process_time() - t0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200,
                        help="timed rounds of each part (per step: 3 x rounds pairs, in blocks of every step)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import crossattn_sd
    from crossattn_sd import GenerationResult, capture, generate
    from crossattn_sd.families import family_of
    from crossattn_sd.tokens import align_prompt

    pipe = crossattn_sd.load_pipeline(device="cpu")
    pipe.set_progress_bar_config(disable=True)
    d = pipe.crossattn_defaults
    steps, guidance = d.steps, d.guidance
    size = dict(height=d.height or 64, width=d.width or 64)
    denoiser = pipe.unet

    def plain_call():
        return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance,
                    generator=torch.Generator("cpu").manual_seed(0), **size)

    # The denoiser's inputs at every step of a real generation, replayed below.
    inputs = []
    hook = denoiser.register_forward_pre_hook(lambda m, a, k: inputs.append((a, dict(k))), with_kwargs=True)
    fixed = plain_call()
    hook.remove()
    assert len(inputs) == steps, f"{len(inputs)} denoiser calls for {steps} steps"
    pipe._guidance_scale = guidance  # what the pipeline's guidance probe reads at each call (set during a call)

    def step(i):
        a, k = inputs[i % steps]
        with torch.no_grad():
            denoiser(*a, **k)

    rounds = args.rounds
    parts: dict[str, float] = {}

    plain = [cpu_ms(plain_call) for _ in range(max(5, rounds // 20))]
    plain_ms = statistics.median(plain)

    def empty():
        with capture(pipe, mode="exact"):
            pass

    def nothing():
        pass

    install, base = [], []
    for _ in range(rounds):
        install.append(cpu_ms(empty))
        base.append(cpu_ms(nothing))
    parts["install + restore"] = statistics.median(install) - statistics.median(base)

    # Per step: inside one capture() block, each step runs twice, once on Diffusers' processors and once on the
    # recording ones (swapped in between, untimed; the order alternates), so the pair sees the same machine.
    family = family_of(pipe)
    originals = family.attn_processors()
    diffs, flushes = [], []
    for r in range(max(1, 3 * rounds // steps)):
        with capture(pipe, mode="exact") as store:
            inside = family_of(pipe)
            recording = inside.attn_processors()
            for i in range(steps):
                pair = {}
                for ours in ((False, True) if (i + r) % 2 else (True, False)):
                    inside.set_attn_processor(recording if ours else originals)
                    pair[ours] = cpu_ms(lambda: step(i))
                inside.set_attn_processor(recording)
                diffs.append(pair[True] - pair[False])
            flushes.append(cpu_ms(store.flush))
    parts[f"per step (x {steps})"] = statistics.median(diffs) * steps
    step_error = median_error(diffs) * steps
    parts["flush"] = statistics.median(flushes)

    result = generate(pipe, PROMPT, seed=0, steps=steps, guidance_scale=guidance, mode="exact", **size)
    parts["word maps"] = statistics.median(cpu_ms(lambda: result.word_maps(layers="*")) for _ in range(rounds))
    words = len(result.word_maps(layers="*"))

    def stub(self, *a, callback_on_step_end=None, **k):
        return fixed

    original_call = type(pipe).__call__
    type(pipe).__call__ = stub
    try:
        def run_capture():
            with capture(pipe, mode="exact") as store:
                pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=guidance,
                     generator=torch.Generator("cpu").manual_seed(0), **size)
            return GenerationResult(images=list(fixed.images), alignments=[align_prompt(pipe.tokenizer, PROMPT)],
                                    store=store)

        def run_generate():
            return generate(pipe, PROMPT, seed=0, steps=steps, guidance_scale=guidance, **size)

        cap, gen = [], []
        for _ in range(rounds):
            cap.append(cpu_ms(run_capture))
            gen.append(cpu_ms(run_generate))
        # capture()'s own install + restore is counted above; this is what generate() adds around it
        parts["bookkeeping"] = statistics.median(gen) - statistics.median(cap)
    finally:
        type(pipe).__call__ = original_call

    total = sum(parts.values())
    print(f"embedded model, {steps} steps, guidance {guidance}, {size['height']}x{size['width']} px, "
          f"{words} words, {rounds} rounds, one torch thread")
    print(f"plain Diffusers generation: {plain_ms:.1f} ms CPU (median of {len(plain)})\n")
    print("| part | ms CPU per generation | share of a plain generation |")
    print("| --- | ---: | ---: |")
    for name, ms in parts.items():
        error = f" +- {step_error:.1f}" if name.startswith("per step") else ""
        print(f"| {name} | {ms:.2f}{error} | {100 * ms / plain_ms:.2f} % |")
    print(f"| **sum** | **{total:.2f}** | **{100 * total / plain_ms:.2f} %** |")
    print(f"\ngenerate() + every word's map, accounted part by part: {1 + total / plain_ms:.3f}x plain Diffusers "
          f"(+- {step_error / plain_ms:.3f}: the per-step part's standard error; the others are far tighter)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
