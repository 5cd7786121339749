"""Per-step map memory at Stable Diffusion scale: bytes per step and per 50-step timeline.

Builds the full-size SD 1.5 and SDXL UNets from their published configs (tests/configs/) on the meta device
(shapes only: no weights, no arithmetic), runs one UNet call at SD 1.5's 512 px (64x64 latent) and SDXL's
1024 px (128x128 latent) inside `capture(..., per_step=True)`, and reads the store's own byte count
(`MapStore.step_bytes`) for one step, for each way of keeping per-step maps:

  every column    77 token columns, float32, one map per layer and step (what was kept before)
  prompt          the prompt's columns (`--tokens` of them plus start and end) and one for the rest's sum
  + float16       the same in float16
  per resolution  one map per resolution and step (its layers summed), float32 or float16

Only the conditional half of a guidance batch is kept, so one image's maps are what a 1-image generation keeps.
Each count is checked against the sum over layers of h * w * columns * bytes. Then the whole timeline: a fresh
store with the same settings is handed `--steps` steps of maps of exactly the layers and sizes the UNet call
recorded (as the explicit-mode processor hands them over, on the CPU), so its own count and its budget
(`maps.DEFAULT_MAX_STEP_BYTES`, 1 GiB: past it per-step maps are dropped) decide what a timeline keeps. (A
shapes-only UNet call takes 10-20 s here, as meta tensors run PyTorch's Python reference kernels, so the
timeline is not 50 UNet calls.)

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/step_memory.py            # --steps 50 --tokens 20
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

from crossattn_sd.maps import DEFAULT_MAX_STEP_BYTES, MapStore
from crossattn_sd.processors import capture, layer_hw, layer_sizes

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "configs"
MODELS = {"SD 1.5": ("sd15_unet.json", 64, 512), "SDXL": ("sdxl_base_unet.json", 128, 1024)}  # config, latent, px
MODES = {  # name -> (prompt columns only, dtype, per_step_by)
    "every column, float32, per layer": (False, "float32", "layer"),
    "prompt columns, float32, per layer": (True, "float32", "layer"),
    "prompt columns, float16, per layer": (True, "float16", "layer"),
    "prompt columns, float32, per resolution": (True, "float32", "resolution"),
    "prompt columns, float16, per resolution": (True, "float16", "resolution"),
}
MIB = 1 << 20


def meta_unet(config: str):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel.from_config(json.loads((CONFIGS / config).read_text()))


def unet_inputs(unet, latent: int, text_tokens: int = 77, device="meta") -> tuple[tuple, dict]:
    """One image's UNet inputs, shapes only on the meta device (SDXL: with its pooled text embedding and six size
    numbers)."""
    meta = dict(device=device)
    kwargs = {"encoder_hidden_states": torch.empty(1, text_tokens, unet.config.cross_attention_dim, **meta)}
    if unet.config.addition_embed_type == "text_time":
        time_ids = 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.empty(1, unet.config.projection_class_embeddings_input_dim - time_ids, **meta),
            "time_ids": torch.empty(1, 6, **meta)}
    sample = torch.empty(1, unet.config.in_channels, latent, latent, **meta)
    if device != "meta":
        for t in (sample, kwargs["encoder_hidden_states"], *kwargs.get("added_cond_kwargs", {}).values()):
            t.normal_(generator=torch.Generator(device).manual_seed(0))
    return (sample, torch.tensor(999, **meta)), kwargs


def one_step(unet, latent: int, columns, dtype: str, by: str):
    """One shapes-only UNet call under capture: the store, holding one step."""
    args, kwargs = unet_inputs(unet, latent)
    with capture(unet, per_step=True, step_columns=columns, per_step_dtype=dtype, per_step_by=by,
                 per_step_device=None) as store, torch.no_grad():  # (meta tensors cannot go to the CPU)
        unet(*args, **kwargs)
    return store


def timeline(recorded: MapStore, steps: int, columns, dtype: str, by: str) -> dict:
    """A fresh store handed `steps` steps of maps of the recorded layers' sizes: its bytes, and the step at which
    the default budget dropped per-step maps (None: never)."""
    store = MapStore(per_step=True, step_columns=columns, per_step_dtype=dtype, per_step_by=by)
    store.grid = layer_hw
    shapes = {layer: recorded.sums[layer].shape for layer in recorded.layers}  # (1, h, w, T)
    probs = {layer: torch.full((1, h * w, t), 1.0 / t) for layer, (_, h, w, t) in shapes.items()}
    dropped_at = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the budget's warning: reported in the table instead
        for step in range(steps):
            store.begin_call(recorded.latent_hw, 999 - step)
            for layer, p in probs.items():
                store.record(layer, p, heads=1)
            if store.steps_dropped:
                dropped_at = step + 1
                break
    store.flush()
    return {"bytes": store.step_bytes, "dropped_at": dropped_at, "steps_kept": len(store.steps)}


def expected_step_bytes(unet, latent: int, columns: int, itemsize: int, by: str) -> int:
    sizes = layer_sizes(unet, latent)
    groups = set(sizes.values()) if by == "resolution" else list(sizes.values())
    return sum(h * w * columns * itemsize for h, w in groups)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="denoising steps of a timeline")
    parser.add_argument("--tokens", type=int, default=20, help="the prompt's tokens between start and end")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    args = parser.parse_args(argv)
    columns = list(range(args.tokens + 2))  # start, the prompt's tokens, end (CLIP puts them first)
    print(f"{args.steps}-step timelines, a prompt of {args.tokens} tokens (+ start and end: {len(columns)} columns "
          f"kept, + 1 for the rest's sum), one image, default budget {DEFAULT_MAX_STEP_BYTES / MIB:.0f} MiB\n")
    print("| model | per-step maps | MiB per step | MiB per timeline | within the default budget |")
    print("| --- | --- | ---: | ---: | --- |")
    for model in args.models.split(","):
        config, latent, px = MODELS[model]
        unet = meta_unet(config)
        sizes = layer_sizes(unet, latent)
        label = f"{model}, {px} px ({len(sizes)} layers, {len(set(sizes.values()))} resolutions)"
        for name, (prompt_only, dtype, by) in MODES.items():
            cols = columns if prompt_only else None
            store = one_step(unet, latent, cols, dtype, by)
            width = len(columns) + 1 if prompt_only else 77
            expected = expected_step_bytes(unet, latent, width, torch.finfo(getattr(torch, dtype)).bits // 8, by)
            if store.step_bytes != expected:
                raise SystemExit(f"{model}, {name}: the store kept {store.step_bytes} bytes a step, "
                                 f"expected {expected}")
            run = timeline(store, args.steps, cols, dtype, by)
            if run["dropped_at"] is None and run["bytes"] != args.steps * expected:
                raise SystemExit(f"{model}, {name}: {run['bytes']} bytes after {args.steps} steps, expected "
                                 f"{args.steps * expected}")
            verdict = "yes" if run["dropped_at"] is None else f"no: all dropped at step {run['dropped_at']}"
            print(f"| {label} | {name} | {expected / MIB:.2f} | {args.steps * expected / MIB:.1f} | {verdict} |",
                  flush=True)
            label = ""
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
