"""What spatial attention contributes, layer by layer: the `uniform` processor on some of a cross-attention model's
layers (every pixel there gets the mean of the values, the pooled prompt), judged on eval-tiny's held-out captions.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/uniform_layers.py --n 48

For each layer selection (none = capture, the finest resolution, each other resolution, all), prints the share of
captions and of objects the pixel judge finds right, and the share of pixels that change from the capture image.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="a cross-attention preset (tiny, tiny-untaught)")
    p.add_argument("--n", type=int, default=48, help="held-out captions (eval-tiny's, seed = index)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from crossattn_sd.pipeline import generate, load_pipeline
    from crossattn_sd.processors import layer_sizes
    from crossattn_sd.steering import ProcessorSpec
    from crossattn_sd.tiny.evaluate import captions
    from crossattn_sd.tiny.judge import judge

    pipe = load_pipeline(args.model, device="cpu")
    sizes = sorted({max(hw) for hw in layer_sizes(pipe).values()}, reverse=True)
    selections = {"none (capture)": None, **{f"{s}x{s} layers": str(s) for s in sizes}, "all layers": "*"}
    items = captions(args.n, 0)
    baseline = {}
    print(f"{args.model}, {args.n} held-out captions: uniform attention on ...")
    print(f"| layers | whole caption right | each object right | pixels changed |")
    print("| --- | ---: | ---: | ---: |")
    for label, layers in selections.items():
        ok = objects = objects_ok = 0
        changed = []
        for k, (text, kinds, seed) in enumerate(items):
            spec = ProcessorSpec("capture") if layers is None else ProcessorSpec("uniform", layers=layers)
            image = np.asarray(generate(pipe, text, seed=seed, processor=spec).images[0])
            if layers is None:
                baseline[k] = image
            changed.append(float((image != baseline[k]).any(axis=-1).mean()))
            verdict = judge(image, kinds)
            ok += verdict.ok
            objects += len(verdict.objects)
            objects_ok += sum(o.ok for o in verdict.objects)
        print(f"| {label} | {100 * ok / len(items):.1f}% | {100 * objects_ok / objects:.1f}% | "
              f"{100 * np.mean(changed):.1f}% |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
