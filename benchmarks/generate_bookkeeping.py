"""What `generate()` costs beyond `capture()`: everything around the pipeline call, timed without the diffusion.

The embedded pipeline's `__call__` is replaced by a stub that returns a fixed output (and calls a step callback
once per step when one is passed, as the real loop would), so the CPU time left is the bookkeeping only:

  capture   `with capture(pipe) as store: pipe(...)` and a `GenerationResult` with the prompt's alignment (what
            benchmarks/capture_overhead.py's ours-capture variant does around the call)
  generate  `generate(pipe, prompt, ...)`: validation, the prompt's alignment, installing the processors (the same
            `capture()`), the result and its settings

Interleaved rounds, medians of process CPU time; `--profile` adds cProfile's top entries for generate.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/generate_bookkeeping.py --rounds 200
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

PROMPT = "a red circle on the left and a blue square on the right"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200, help="timed rounds (one of each variant per round)")
    parser.add_argument("--profile", action="store_true", help="also profile 100 generate() calls (cProfile)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import crossattn_sd
    from crossattn_sd import GenerationResult, capture, generate
    from crossattn_sd.tokens import align_prompt

    pipe = crossattn_sd.load_pipeline(device="cpu")
    d = pipe.crossattn_defaults
    size = dict(height=d.height or 64, width=d.width or 64)
    fixed = pipe(PROMPT, num_inference_steps=2, guidance_scale=d.guidance, **size)

    def stub(self, *a, callback_on_step_end=None, **k):
        for i in range(d.steps if callback_on_step_end is not None else 0):
            callback_on_step_end(self, i, 0, {"latents": None})
        return fixed

    type(pipe).__call__ = stub

    def run_capture():
        with capture(pipe, mode="exact") as store:
            pipe(prompt=PROMPT, num_inference_steps=d.steps, guidance_scale=d.guidance,
                 generator=torch.Generator("cpu").manual_seed(0), **size)
        return GenerationResult(images=list(fixed.images), alignments=[align_prompt(pipe.tokenizer, PROMPT)],
                                store=store)

    def run_generate():
        return generate(pipe, PROMPT, seed=0, steps=d.steps, guidance_scale=d.guidance, **size)

    variants = {"capture": run_capture, "generate": run_generate}
    times = {name: [] for name in variants}
    for f in variants.values():
        f()
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 else list(variants)[::-1]):
            t0 = time.process_time()
            variants[name]()
            times[name].append(time.process_time() - t0)
    for name, ts in times.items():
        print(f"{name}: median {1000 * statistics.median(ts):.2f} ms, fastest {1000 * min(ts):.2f} ms CPU")
    extra = statistics.median(times["generate"]) - statistics.median(times["capture"])
    print(f"generate() - capture(): {1000 * extra:+.2f} ms a call (median)")
    if args.profile:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.enable()
        for _ in range(100):
            run_generate()
        profile.disable()
        pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
