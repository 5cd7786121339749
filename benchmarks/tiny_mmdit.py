"""The embedded joint-attention model (`tiny-mmdit`) with plain Diffusers calls, no capture.

    # caption-following on held-out captions (eval-tiny's captions and judge; maps need SD3 capture)
    python benchmarks/tiny_mmdit.py accuracy [--model FOLDER] --n 144 --guidance 2.0
    # 20-step time per image, interleaved with the embedded UNet model (`tiny`), medians
    python benchmarks/tiny_mmdit.py timing --threads 2 --repeats 20

Run with OMP_WAIT_POLICY=PASSIVE and the MALLOC variables of the README.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch


def load(model: str | None):
    from diffusers import StableDiffusion3Pipeline

    from crossattn_sd.pipeline import load_pipeline

    if model is None:
        return load_pipeline("tiny-mmdit", device="cpu")
    pipe = StableDiffusion3Pipeline.from_pretrained(model, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, size: int = 64):
    """Images (uint8 arrays) for prompts, image i from torch.Generator().manual_seed(seeds[i])."""
    from crossattn_sd.config import get_preset

    images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                  max_sequence_length=get_preset("tiny-mmdit").max_sequence_length,
                  generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    return [np.asarray(im) for im in images]


def accuracy(pipe, n: int, seed: int, steps: int, guidance: float, batch: int = 16) -> dict:
    from crossattn_sd.tiny.evaluate import captions
    from crossattn_sd.tiny.judge import judge

    items = captions(n, seed)
    ok = objects = objects_ok = 0
    for start in range(0, n, batch):
        chunk = items[start:start + batch]
        images = sample(pipe, [c for c, _, _ in chunk], [s for _, _, s in chunk], steps, guidance)
        for image, (_, kinds, _) in zip(images, chunk):
            verdict = judge(image, kinds)
            ok += verdict.ok
            objects += len(verdict.objects)
            objects_ok += sum(o.ok for o in verdict.objects)
    return dict(n=n, seed=seed, steps=steps, guidance=guidance, caption_accuracy=ok / n,
                object_accuracy=objects_ok / objects)


def timing(threads: int, repeats: int, steps: int) -> dict:
    from crossattn_sd.config import get_preset
    from crossattn_sd.pipeline import load_pipeline

    torch.set_num_threads(threads)
    prompt = "a red circle on the left and a blue square on the right"
    pipes = {"tiny": load_pipeline("tiny", device="cpu"), "tiny-mmdit": load_pipeline("tiny-mmdit", device="cpu")}
    extra = {"tiny": {}, "tiny-mmdit": dict(max_sequence_length=get_preset("tiny-mmdit").max_sequence_length)}
    times = {k: [] for k in pipes}
    for r in range(repeats + 1):  # the first round warms up
        for name, pipe in pipes.items():
            preset = get_preset(name)
            t0 = time.perf_counter()
            pipe(prompt, num_inference_steps=steps, guidance_scale=preset.guidance, height=64, width=64,
                 generator=torch.Generator().manual_seed(r), **extra[name])
            if r:
                times[name].append(time.perf_counter() - t0)
    return dict(threads=threads, repeats=repeats, steps=steps,
                **{f"median_s/{k}": statistics.median(v) for k, v in times.items()},
                **{f"min_s/{k}": min(v) for k, v in times.items()})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy", help="judge held-out captions")
    acc.add_argument("--model", default=None, help="a pipeline folder (default: the tiny-mmdit preset)")
    acc.add_argument("--n", type=int, default=144, help="number of held-out captions")
    acc.add_argument("--seed", type=int, default=0, help="first noise seed (as eval-tiny)")
    acc.add_argument("--steps", type=int, default=20, help="sampling steps")
    acc.add_argument("--guidance", type=float, nargs="+", default=[2.0], help="guidance scale(s)")
    acc.add_argument("--threads", type=int, default=1, help="torch threads")
    tim = sub.add_parser("timing", help="20-step time, interleaved with the tiny UNet model")
    tim.add_argument("--threads", type=int, default=2, help="torch threads")
    tim.add_argument("--repeats", type=int, default=20, help="timed rounds")
    tim.add_argument("--steps", type=int, default=20, help="sampling steps")
    args = p.parse_args(argv)
    if args.command == "accuracy":
        torch.set_num_threads(args.threads)
        pipe = load(args.model)
        for g in args.guidance:
            print(json.dumps(accuracy(pipe, args.n, args.seed, args.steps, g)), flush=True)
    else:
        print(json.dumps(timing(args.threads, args.repeats, args.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
