"""Which concept map kind localises better on the embedded models: "joint" or "concepts-only" (the UNet),
"output" (ConceptAttention) or "attention" (tiny-mmdit)?

Held-out two-object scenes of the shapes world, two ways:

- rendered: the world's renderer draws the scene (exact masks); the image is VAE-encoded, noised to t (default 0.5,
  seeded noise) and the UNet runs once on it inside `capture(pipe, concepts=...)`, conditioned on the scene's
  caption with its shape words left out ("a red on the left and a blue on the right"), so every shape name is
  only a concept; the caption with the shape words in is scored too (a concept that is also a prompt word);
- generated: `generate(caption, concepts=...)` on the held-out captions, masks from the generated image (its
  colour's pixels in the named half, as eval-tiny does).

Concepts: the three shape names (and, with --colours, the four colour names as well). For each object its shape's
concept map is scored: IoU against the object's mask of the map's region at DAAM's threshold (>= 0.4 x max) and at
ConceptAttention's (>= the map's mean), in the model's default view (16x16 layers), beside the uniform and centred
Gaussian baselines.

    python benchmarks/concept_kinds.py --n 72
    python benchmarks/concept_kinds.py --n 72 --model tiny-mmdit
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import crossattn_sd
from crossattn_sd.result import GenerationResult
from crossattn_sd.tiny.evaluate import captions, gaussian_map, iou, object_mask as generated_mask, region
from crossattn_sd.tiny.world import caption as scene_caption, heldout_scenes, object_mask, render

SHAPES = ["circle", "square", "triangle"]
COLOURS = ["red", "green", "blue", "yellow"]


def mean_region(m: np.ndarray) -> np.ndarray:
    return m >= m.mean() if m.max() > m.min() else np.zeros(m.shape, bool)


def inspect_pass(pipe, image: np.ndarray, caption: str, concepts: list[str], t: float, seed: int, template: str):
    """One denoiser pass on the VAE-encoded image noised to time t, inside capture: a GenerationResult."""
    from PIL import Image

    from crossattn_sd.families import family_of

    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    family = family_of(pipe)
    with torch.no_grad():
        latent = pipe.vae.encode(x).latent_dist.mean
        latent = (latent - (pipe.vae.config.shift_factor or 0.0)) * pipe.vae.config.scaling_factor
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
        if family.name == "unet":
            from diffusers import DDPMScheduler

            noiser = DDPMScheduler.from_config(pipe.scheduler.config)
            timestep = torch.tensor([round(t * noiser.config.num_train_timesteps) - 1])
            noisy = noiser.add_noise(latent, noise, timestep)
            states = pipe.encode_prompt(caption, "cpu", 1, False)[0]
            with crossattn_sd.capture(pipe, concepts=concepts, concept_template=template) as store:
                pipe.unet(noisy, timestep, encoder_hidden_states=states)
        else:  # rectified flow (SD3): x_t = (1 - t) x_0 + t noise, timestep = 1000 t
            noisy = (1 - t) * latent + t * noise
            states, _, pooled, _ = pipe.encode_prompt(caption, None, None, device="cpu",
                                                      do_classifier_free_guidance=False, max_sequence_length=0)
            with crossattn_sd.capture(pipe, concepts=concepts, concept_template=template) as store:
                pipe.transformer(hidden_states=noisy, timestep=torch.tensor([1000.0 * t]),
                                 encoder_hidden_states=states, pooled_projections=pooled)
    alignment = family.text_positions(pipe, caption, None, 0 if family.name != "unet" else None)
    return GenerationResult([Image.fromarray(image)], [alignment], store,
                            settings={"map_layers": getattr(pipe.crossattn_defaults, "map_layers", "all")})


def add(scores: dict, key: str, value: float) -> None:
    scores.setdefault(key, []).append(value)


def score_objects(scores: dict, prefix: str, result, objects, masks, concepts) -> None:
    h, w = masks[0].shape
    for obj, mask in zip(objects, masks):
        if not mask.any():
            continue
        colour, shape = obj[0], obj[1]
        for what, word in (("shape", shape), ("colour", colour)):
            if word not in concepts:
                continue
            for kind in result.concept_kinds:
                m = result.heatmap(word, kind=kind)
                add(scores, f"{prefix}/{what}/{kind}/0.4max", iou(region(m), mask))
                add(scores, f"{prefix}/{what}/{kind}/mean", iou(mean_region(m), mask))
            if word in [x.lower() for x in result.words]:
                m = result.heatmap(word)
                add(scores, f"{prefix}/{what}/prompt-word/0.4max", iou(region(m), mask))
                add(scores, f"{prefix}/{what}/prompt-word/mean", iou(mean_region(m), mask))
            add(scores, f"{prefix}/{what}/uniform/0.4max", iou(region(np.ones((h, w))), mask))
            add(scores, f"{prefix}/{what}/gaussian/0.4max", iou(region(gaussian_map(h, w)), mask))
            add(scores, f"{prefix}/{what}/gaussian/mean", iou(mean_region(gaussian_map(h, w)), mask))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="tiny (default) or tiny-mmdit")
    p.add_argument("--n", type=int, default=72, help="scenes (rendered) and captions (generated)")
    p.add_argument("--t", type=float, default=0.5, help="noise level of the rendered images' pass")
    p.add_argument("--colours", action="store_true", help="the colour names are concepts too")
    p.add_argument("--no-generated", action="store_true", help="skip the generated images")
    p.add_argument("--template", default="a {}", help="the text a concept is encoded in ({} = the concept)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = crossattn_sd.load_pipeline(args.model)
    concepts = SHAPES + (COLOURS if args.colours else [])
    scores: dict[str, list[float]] = {}
    start = time.time()
    scenes = heldout_scenes()
    for k in range(args.n):
        scene = scenes[k % len(scenes)]
        image = render(scene)
        objects = [o.kind for o in scene.objects]
        masks = [object_mask(o) for o in scene.objects]
        without = " and ".join(f"a {o.colour} on the {o.position}" for o in scene.objects)
        res = inspect_pass(pipe, image, without, concepts, args.t, seed=k, template=args.template)
        score_objects(scores, "rendered-no-shape-words", res, objects, masks, concepts)
        res = inspect_pass(pipe, image, scene_caption(scene), concepts, args.t, seed=k, template=args.template)
        score_objects(scores, "rendered-full-caption", res, objects, masks, concepts)
    if not args.no_generated:
        for text, objects, seed in captions(args.n, 0):
            res = crossattn_sd.generate(pipe, text, seed=seed, concepts=concepts, concept_template=args.template)
            image = np.asarray(res.images[0])
            masks = [generated_mask(image, c, p) for c, _, p in objects]
            score_objects(scores, "generated", res, objects, masks, concepts)
    summary = {k: round(float(np.mean(v)), 3) for k, v in sorted(scores.items())}
    summary["n"] = {k: len(v) for k, v in sorted(scores.items())}
    summary["seconds"] = round(time.time() - start, 1)
    summary["concepts"] = concepts
    summary["template"] = args.template
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
