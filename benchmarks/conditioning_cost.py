"""What each conditioning mechanism costs as the prompt grows: the denoiser's forward time against the number of
text tokens, for the three embedded mechanisms (the shipped weights; random text states, since only shapes matter).

- `tiny` (cross-attention): every image query of each cross-attention layer attends to every text token, so the
  attention costs (pixels x tokens) per layer: linear in the tokens at a fixed image size;
- `tiny-film` (FiLM): the tokens are pooled once into one vector (a single-query attention pooling: linear in the
  tokens, but one query instead of one per pixel), then every ResNet block only scales and shifts its channels:
  all but constant;
- `tiny-mmdit` (joint attention): image and text tokens form one sequence per block, so the attention costs
  (image + text tokens)^2 per block, and the text tokens also run through every block's MLPs.

One torch thread; batch 2 (a classifier-free-guidance step) at 64 x 64; the mechanisms timed interleaved, each
length's medians over `--repeats` rounds. Prints a table (ms per forward, and the ratio to the shortest prompt) and
with `--figure` draws it (docs/images/cost-vs-prompt.png). `--generate` times instead one whole 20-step image per
model (`generate()` with its preset's settings and every map recorded; tiny-untaught too), interleaved, medians.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 MALLOC_TOP_PAD_=1073741824 OMP_NUM_THREADS=1 \\
    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python benchmarks/conditioning_cost.py --figure docs/images/cost-vs-prompt.png
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

MODELS = ("tiny", "tiny-film", "tiny-mmdit")
GENERATE_MODELS = ("tiny", "tiny-untaught", "tiny-mmdit", "tiny-film")
PROMPT = "a red circle on the left and a blue square on the right"
LENGTHS = (8, 32, 128, 512, 2048)


def denoiser_call(pipe, tokens: int, batch: int = 2):
    """A function that runs the pipeline's denoiser once on random inputs with `tokens` text tokens."""
    gen = torch.Generator().manual_seed(tokens)
    latent = torch.randn(batch, 4, 16, 16, generator=gen)
    if hasattr(pipe, "unet"):
        states = torch.randn(batch, tokens, pipe.unet.config.cross_attention_dim, generator=gen)
        t = torch.full((batch,), 500)
        return lambda: pipe.unet(latent, t, states).sample
    cfg = pipe.transformer.config
    states = torch.randn(batch, tokens, cfg.joint_attention_dim, generator=gen)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=gen)
    t = torch.full((batch,), 500.0)
    return lambda: pipe.transformer(latent, encoder_hidden_states=states, pooled_projections=pooled,
                                    timestep=t).sample


def measure(lengths, repeats: int) -> dict:
    from crossattn_sd.pipeline import load_pipeline

    pipes = {m: load_pipeline(m, device="cpu") for m in MODELS}
    calls = {(m, n): denoiser_call(pipes[m], n) for m in MODELS for n in lengths}
    times = {key: [] for key in calls}
    with torch.no_grad():
        for call in calls.values():  # warm-up
            call()
        for r in range(repeats):
            keys = list(calls)
            keys = keys[r % len(keys):] + keys[:r % len(keys)]  # rotate the order each round
            for key in keys:
                start = time.perf_counter()
                calls[key]()
                times[key].append(time.perf_counter() - start)
    params = {m: sum(p.numel() for p in (pipes[m].unet if hasattr(pipes[m], "unet") else pipes[m].transformer)
                     .parameters()) for m in MODELS}
    return dict(lengths=list(lengths), repeats=repeats, params=params,
                ms={m: [1000 * statistics.median(times[(m, n)]) for n in lengths] for m in MODELS})


def measure_generate(repeats: int) -> dict:
    """Median seconds of one generate() per model (preset settings, capture), interleaved rounds."""
    from crossattn_sd.pipeline import generate, load_pipeline

    pipes = {m: load_pipeline(m, device="cpu") for m in GENERATE_MODELS}
    times = {m: [] for m in GENERATE_MODELS}
    for m in GENERATE_MODELS:  # warm-up
        generate(pipes[m], PROMPT, seed=0)
    for r in range(repeats):
        order = GENERATE_MODELS[r % 4:] + GENERATE_MODELS[:r % 4]
        for m in order:
            start = time.perf_counter()
            generate(pipes[m], PROMPT, seed=r)
            times[m].append(time.perf_counter() - start)
    return {m: dict(median_s=statistics.median(v), best_s=min(v)) for m, v in times.items()}


def table(res: dict) -> str:
    lengths = res["lengths"]
    head = "| denoiser forward, ms (x shortest) | " + " | ".join(f"{n} tokens" for n in lengths) + " |"
    lines = [head, "| --- |" + " ---: |" * len(lengths)]
    for m, ms in res["ms"].items():
        cells = [f"{v:.1f} ({v / ms[0]:.2f}x)" for v in ms]
        lines.append(f"| `{m}` ({res['params'][m] / 1e6:.2f}M) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"tiny": "tiny: cross-attention (linear in tokens)", "tiny-film": "tiny-film: FiLM (one pooled vector: ~constant)",
              "tiny-mmdit": "tiny-mmdit: joint attention (quadratic in image + text tokens)"}
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    for m, ms in res["ms"].items():
        ax.plot(res["lengths"], ms, marker="o", label=labels[m])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("text tokens")
    ax.set_ylabel("denoiser forward, ms (batch 2, 64 x 64)")
    ax.set_title("Conditioning cost as the prompt grows (1 CPU thread)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="comma-separated text lengths")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds (medians)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--figure", default=None, help="also draw the table into this PNG")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--generate", action="store_true", help="time whole 20-step images per model instead")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.generate:
        res = measure_generate(args.repeats)
        for m, v in res.items():
            print(f"{m:14s} median {v['median_s']:.3f} s  best {v['best_s']:.3f} s per 20-step image")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return 0
    res = measure([int(n) for n in args.lengths.split(",")], args.repeats)
    print(table(res))
    if args.figure:
        figure(res, args.figure)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
