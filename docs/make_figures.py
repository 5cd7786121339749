"""The README's figures, drawn from the embedded model with the package's own API, plus the numbers behind them.

    python docs/make_figures.py                      # the embedded model -> docs/images/
    python docs/make_figures.py --model runs/tiny/pipeline

Writes
    docs/images/words.png     a caption's image and each content word's map (the default view: 16x16 layers, all steps)
    docs/images/reweight.png  a prompt and seed with capture and with a re-weighted word
    docs/images/edit.png      prompt-to-prompt colour swap: source, edit with injected maps, edit prompt alone
    docs/images/words-mmdit.png  (--joint) the same caption and seed on tiny-mmdit, its joint-attention maps
    docs/images/inspect.png   (--inspect) an uploaded image (a rendered scene, 3x the model's size), its words' maps
                              and its shapes' maps given only as concepts
and prints what the pixel judge (crossattn_sd/tiny/judge.py) says of each image, so the captions of the
figures in the README state measured facts.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

import crossattn_sd
from crossattn_sd import ProcessorSpec, parse_weights
from crossattn_sd.overlay import captioned, grid
from crossattn_sd.tiny.judge import judge

OUT = Path(__file__).resolve().parent / "images"
CAPTION = "a red circle on the left and a blue square on the right"
KINDS = [("red", "circle", "left"), ("blue", "square", "right")]
CONTENT = ["red", "circle", "left", "blue", "square", "right"]


def sheet(tiles: list[Image.Image], pad: int = 4) -> Image.Image:
    w, h = tiles[0].size
    out = Image.new("RGB", (len(tiles) * (w + pad) + pad, h + 2 * pad), "white")
    for k, tile in enumerate(tiles):
        out.paste(tile, (pad + k * (w + pad), pad))
    return out


def kinds_of(prompt: str) -> list[tuple[str, str, str]]:
    """(colour, shape, position) of each object of a shapes-world caption "a {colour} {shape} on the {position}"."""
    parts = [part.split() for part in prompt.split(" and ")]
    return [(w[1], w[2], w[-1]) for w in parts]


def verdict(image: Image.Image, kinds) -> str:
    v = judge(np.asarray(image), kinds)
    return "; ".join(f"{c} {s} {p}: colour {'in its half' if o.colour_ok else 'NOT in its half'}, "
                     f"shape found: {o.found_shape or 'none'}, {o.pixels} px"
                     for (c, s, p), o in zip(kinds, v.objects))


def inspect_figure(args) -> int:
    """inspect.png: a scene rendered by the shapes world at 192 x 192 (the model works at 64 x 64), inspected with its
    caption; prints each word's IoU with its object's exact mask."""
    from crossattn_sd.tiny.evaluate import iou, region
    from crossattn_sd.tiny.world import Scene, object_mask, place, render

    scene = Scene((place("green", "triangle", "top"), place("yellow", "circle", "bottom")))
    caption = "a green triangle on the top and a yellow circle on the bottom"
    image = Image.fromarray(render(scene, 192))
    pipe = crossattn_sd.load_pipeline(args.model, device="cpu")
    result = crossattn_sd.inspect_image(pipe, image, caption, t=0.5, passes=4, seed=args.seed)
    words = ["green", "triangle", "top", "yellow", "circle", "bottom"]
    maps = result.word_maps()
    # the shapes again, named only as concepts, on the caption without them
    bare = "a green on the top and a yellow on the bottom"
    named = crossattn_sd.inspect_image(pipe, image, bare, concepts=["triangle", "circle"], t=0.5, passes=4,
                                       seed=args.seed)
    concept_maps = named.concept_maps()
    tiles = {**{w: maps[w] for w in words}, **{f"concept {c}": m for c, m in concept_maps.items()}}
    grid(image, tiles, columns=9, min_tile=192).save(args.out / "inspect.png")
    masks = {o.shape: object_mask(o, 192) for o in scene.objects}
    scores = ", ".join(f"{w} {iou(region(maps[w]), masks['triangle' if k < 3 else 'circle']):.2f}"
                       for k, w in enumerate(words))
    print(f"inspect.png  {caption!r} on a 192x192 rendered scene, t 0.5, 4 passes; IoU with the object: {scores}")
    print(f"             concepts on {bare!r} ({named.concept_kinds[0]} kind): " + ", ".join(
        f"{c} {iou(region(m), masks[c]):.2f} (other object {iou(region(m), masks[next(k for k in masks if k != c)]):.2f})"
        for c, m in concept_maps.items()))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="pipeline folder (default: the embedded model)")
    p.add_argument("--seed", type=int, default=0, help="seed of every figure")
    p.add_argument("--weights", default="square:5", help="re-weighting shown in reweight.png")
    p.add_argument("--reweight-prompt", default=CAPTION, help="prompt of reweight.png")
    p.add_argument("--edit", default="a green circle on the left and a blue square on the right",
                   help="edited prompt shown in edit.png (a colour word swapped)")
    p.add_argument("--inject", type=float, default=0.8, help="injection fraction of the edit")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--joint", action="store_true", help="draw only words-mmdit.png, from the tiny-mmdit model")
    p.add_argument("--inspect", action="store_true", help="draw only inspect.png: inspect_image on a rendered scene")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.inspect:
        return inspect_figure(args)
    if args.joint:
        pipe = crossattn_sd.load_pipeline("tiny-mmdit", device="cpu")
        base = crossattn_sd.generate(pipe, CAPTION, seed=args.seed)
        maps = base.word_maps()
        grid(base.images[0], {w: maps[w] for w in CONTENT}, columns=7, min_tile=192).save(args.out / "words-mmdit.png")
        print(f"words-mmdit.png {CAPTION!r} seed {args.seed}: {verdict(base.images[0], KINDS)}")
        return 0
    pipe = crossattn_sd.load_pipeline(args.model, device="cpu")
    scale = 3

    base = crossattn_sd.generate(pipe, CAPTION, seed=args.seed, mode="explicit")
    maps = base.word_maps()
    grid(base.images[0], {w: maps[w] for w in CONTENT}, columns=7, min_tile=192).save(args.out / "words.png")
    print(f"words.png    {CAPTION!r} seed {args.seed}: {verdict(base.images[0], KINDS)}")

    spec = ProcessorSpec("reweight", weights=parse_weights(args.weights))
    plain = crossattn_sd.generate(pipe, args.reweight_prompt, seed=args.seed)
    rw = crossattn_sd.generate(pipe, args.reweight_prompt, seed=args.seed, processor=spec)
    diff = np.abs(np.asarray(rw.images[0], np.int16) - np.asarray(plain.images[0], np.int16)).max(-1) > 30
    sheet([captioned(plain.images[0], "capture", scale), captioned(rw.images[0], f"reweight {args.weights}", scale)]
          ).save(args.out / "reweight.png")
    kinds = kinds_of(args.reweight_prompt)
    print(f"reweight.png {args.reweight_prompt!r} {args.weights}: {diff.mean():.1%} of pixels changed")
    print(f"             capture:  {verdict(plain.images[0], kinds)}; reweight: {verdict(rw.images[0], kinds)}")

    spec = ProcessorSpec("edit", edit_prompt=args.edit, inject=args.inject)
    ed = crossattn_sd.generate(pipe, CAPTION, seed=args.seed, processor=spec)
    alone = crossattn_sd.generate(pipe, args.edit, seed=args.seed, mode="explicit")
    source, edited = ed.images
    edit_kinds = [tuple(w for w in k) for k in KINDS]
    swapped = [w for w, v in zip(CAPTION.split(), args.edit.split()) if w != v]
    if swapped:
        new = dict(zip(CAPTION.split(), args.edit.split()))
        edit_kinds = [(new.get(c, c), new.get(s, s), p) for c, s, p in KINDS]

    def layout(img):  # where the image is not background
        return np.abs(np.asarray(img, np.int16) - 240).max(-1) > 40

    kept = (layout(source) == layout(edited)).mean()
    kept_alone = (layout(source) == layout(alone.images[0])).mean()
    sheet([captioned(source, "source", scale), captioned(edited, f"edit, inject {args.inject:g}", scale),
           captioned(alone.images[0], "edit prompt alone", scale)]).save(args.out / "edit.png")
    print(f"edit.png     {args.edit!r}: layout kept on {kept:.1%} of pixels (edit prompt alone: {kept_alone:.1%})")
    print(f"             source: {verdict(source, KINDS)}")
    print(f"             edit:   {verdict(edited, edit_kinds)}")
    print(f"             alone:  {verdict(alone.images[0], edit_kinds)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
