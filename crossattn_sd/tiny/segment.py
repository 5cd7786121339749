"""Zero-shot segmentation on the shapes world: `crossattn-sd eval-seg`.

Rendered images of the held-out scenes (the world's own renderer, so every object's mask is exact) are inspected
with their captions (`inspect_image`), and each colour and shape word's map is scored against its object's mask:
the IoU of the map's region at DAAM's threshold (>= 0.4 x the map's maximum) and at ConceptAttention's (>= the
map's mean), next to the same thresholds on a uniform map and a centred Gaussian (the baselines), per map kind
(the model's default view; every layer averaged, where the model has several resolutions). The same is measured on
generated images: the held-out captions are generated (through the batch engine, as `eval-tiny` does), each image
is inspected with its caption, and the masks are its objects' pixels (their colour in their named half, as
`eval-tiny` scores them); the generation's own maps are scored too.

Concepts: each image is inspected a second time with its caption stripped of its shape words ("a red on the left
and a blue on the right") and the scene's shape names as concepts (`inspect_image(..., concepts=[...])`); each
concept map kind (UNet: "joint", "concepts-only"; SD3: ConceptAttention's "output" and the raw "attention") is
scored against the mask of the object(s) of that shape. ("background" is no concept of the embedded models: it is
not in their closed vocabulary.)

    crossattn-sd eval-seg --n 144
    crossattn-sd eval-seg --model tiny-mmdit --n 144 --json seg-mmdit.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from ..cli import HelpFormatter
from .evaluate import captions, gaussian_map, iou, object_mask as generated_mask, region
from .world import SHAPES, Scene, object_mask, place, render

THRESHOLDS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "0.4max": region,  # DAAM: the map's region is where it reaches 0.4 x its maximum
    "mean": lambda m: m >= m.mean() if m.max() > 0 else np.zeros(m.shape, bool),  # ConceptAttention
}
KINDS = ("colour", "shape", "concept")
SOURCES = ("rendered", "generated, inspected", "generated (its own maps)")


def map_kinds(result) -> dict[str, dict]:
    """The map kinds scored: heatmap keyword arguments by name."""
    kinds = {"default view": {}}
    if len(result.store.resolutions()) > 1:
        kinds["every layer"] = {"layers": "*"}
    return kinds


def scene_of(kinds: list[tuple[str, str, str]], seed: int) -> Scene:
    """The scene of a caption's objects (in caption order), jittered and sized by `seed`."""
    rng = np.random.default_rng(seed)
    return Scene(tuple(place(c, s, p, rng=rng) for c, s, p in kinds))


class Scores:
    """IoU lists keyed "<source>/<kind>/<map kind>/<threshold>", with the baselines under map kinds "uniform" and
    "gaussian"."""

    def __init__(self):
        self.iou: dict[str, list[float]] = {}

    def add(self, key: str, value: float) -> None:
        self.iou.setdefault(key, []).append(value)

    def score(self, source: str, result, kinds, masks: list[np.ndarray], maps: dict[str, dict] | None = None):
        """Every colour and shape word of one result against its object's mask (objects in caption order)."""
        h, w = result.size
        baselines = {"uniform": np.ones((h, w)), "gaussian": gaussian_map(h, w)}
        words = [x.lower() for x in result.words]
        maps = map_kinds(result) if maps is None else maps
        for i, (colour, shape, _) in enumerate(kinds):
            if not masks[i].any():
                continue  # a generated image without this object: nothing to find
            for kind, word in (("colour", colour), ("shape", shape)):
                occurrence = [c if kind == "colour" else s for c, s, _ in kinds][:i].count(word)
                if words.count(word) <= occurrence:
                    continue
                for name, view in maps.items():
                    m = result.heatmap(word, occurrence=occurrence, **view)
                    for thr, cut in THRESHOLDS.items():
                        self.add(f"{source}/{kind}/{name}/{thr}", iou(cut(m), masks[i]))
                for name, m in baselines.items():
                    for thr, cut in THRESHOLDS.items():
                        self.add(f"{source}/{kind}/{name}/{thr}", iou(cut(m), masks[i]))

    def score_concepts(self, source: str, result, kinds, masks: list[np.ndarray]) -> None:
        """Every shape concept of one result (inspected on the shape-less caption) against the mask of the objects
        of that shape, for each concept map kind, with the baselines."""
        h, w = result.size
        baselines = {"uniform": np.ones((h, w)), "gaussian": gaussian_map(h, w)}
        for concept in result.concepts:
            mask = np.zeros((h, w), bool)
            for (_, shape, _), m in zip(kinds, masks):
                if shape == concept:
                    mask |= m
            if not mask.any():
                continue
            for kind in result.concept_kinds:
                m = result.heatmap(concept, kind=kind)
                for thr, cut in THRESHOLDS.items():
                    self.add(f"{source}/concept/{kind}/{thr}", iou(cut(m), mask))
            for name, m in baselines.items():
                for thr, cut in THRESHOLDS.items():
                    self.add(f"{source}/concept/{name}/{thr}", iou(cut(m), mask))

    def summary(self) -> dict:
        return {key: {"miou": float(np.mean(v)), "n": len(v)} for key, v in sorted(self.iou.items())}


def shapeless(caption: str) -> str:
    """The caption without its shape words: where the shapes are given only as concepts."""
    return " ".join(w for w in caption.split() if w not in SHAPES)


def inspect_concepts(pipe, image, caption: str, kinds, t: float, passes: int, seed: int):
    """`image` inspected on the shape-less caption with the scene's shape names as concepts."""
    from ..inspect import inspect_image

    shapes = list(dict.fromkeys(s for _, s, _ in kinds))
    return inspect_image(pipe, image, shapeless(caption), concepts=shapes, t=t, passes=passes, seed=seed)


def evaluate(pipe, n: int = 144, seed: int = 0, t: float = 0.5, passes: int = 1, generated: bool = True,
             out: str | Path | None = None, progress: bool = True, concepts: bool = True) -> dict:
    """Score rendered held-out scenes (and, if `generated`, generated images of the same captions); returns the
    summary (see `format_summary`). `out` keeps the generated bundles (a rerun skips them)."""
    from ..inspect import inspect_image

    items = captions(n, seed)
    scores = Scores()
    start = time.perf_counter()
    for k, (text, kinds, noise_seed) in enumerate(items):
        scene = scene_of(kinds, noise_seed)
        result = inspect_image(pipe, render(scene), text, t=t, passes=passes, seed=noise_seed)
        masks = [object_mask(o) for o in scene.objects]
        scores.score("rendered", result, kinds, masks)
        if concepts:
            scores.score_concepts("rendered", inspect_concepts(pipe, render(scene), text, kinds, t, passes,
                                                               noise_seed), kinds, masks)
        if progress and (k + 1) % 24 == 0:
            print(f"eval-seg: {k + 1}/{len(items)} rendered scenes", file=sys.stderr)
    seconds = {"rendered": time.perf_counter() - start}
    if generated:
        start = time.perf_counter()
        _generated(pipe, items, scores, t, passes, out, progress, concepts)
        seconds["generated"] = time.perf_counter() - start
    return {"n": len(items), "t": t, "passes": passes, "scores": scores.summary(), "seconds": seconds,
            "model": getattr(pipe, "crossattn_source", None)}


def _generated(pipe, items, scores: Scores, t: float, passes: int, out, progress: bool, concepts: bool) -> None:
    """Generate the captions through the batch engine, then inspect each image and score both its inspection's
    maps and the generation's own maps."""
    from ..batch import make_rows, run_batch
    from ..bundle_load import load_result
    from ..inspect import inspect_image

    rows = make_rows([{"prompt": text, "seed": noise_seed} for text, _, noise_seed in items])
    with tempfile.TemporaryDirectory(prefix="eval-seg-") if out is None else nullcontext(out) as folder:
        index = run_batch(rows, folder, lambda device: pipe, model=getattr(pipe, "crossattn_source", None),
                          progress=progress, desc="eval-seg: generating")
        for line, (text, kinds, noise_seed) in zip(index, items, strict=True):
            if line["status"] != "ok":
                raise RuntimeError(f"caption {line['row']} ({text!r}) failed: {line['error']}")
            made = load_result(Path(folder) / line["name"])
            image = np.asarray(made.images[0])
            masks = [generated_mask(image, c, p) for c, _, p in kinds]
            scores.score("generated (its own maps)", made, kinds, masks)
            inspected = inspect_image(pipe, made.images[0], text, t=t, passes=passes, seed=noise_seed)
            scores.score("generated, inspected", inspected, kinds, masks)
            if concepts:
                scores.score_concepts("generated, inspected", inspect_concepts(
                    pipe, made.images[0], text, kinds, t, passes, noise_seed), kinds, masks)


def format_summary(s: dict) -> str:
    """One table per source: mIoU per word kind, map kind and threshold, with the baselines and the ratio to the
    best baseline at the same threshold."""
    scores = s["scores"]
    lines = [f"model: {s.get('model')}; {s['n']} held-out captions; inspected at t={s['t']}, {s['passes']} pass(es)"]
    found = list(dict.fromkeys(k.split("/")[0] for k in scores))
    sources = [x for x in SOURCES if x in found] + [x for x in found if x not in SOURCES]
    for source in sources:
        lines += ["", f"{source} images: mean IoU of the map's region with the object's mask",
                  f"{'word':7s} {'map kind':15s} {'threshold':9s} {'map':>6s} {'uniform':>8s} {'gaussian':>8s} "
                  f"{'map/best':>8s} {'n':>4s}"]
        for kind in KINDS:
            names = list(dict.fromkeys(k.split("/")[2] for k in scores if k.startswith(f"{source}/{kind}/")))
            for name in (x for x in names if x not in ("uniform", "gaussian")):
                for thr in THRESHOLDS:
                    got = scores.get(f"{source}/{kind}/{name}/{thr}")
                    if got is None:
                        continue
                    base = {b: scores[f"{source}/{kind}/{b}/{thr}"]["miou"] for b in ("uniform", "gaussian")}
                    best = max(base.values())
                    lines.append(f"{kind:7s} {name:15s} {thr:9s} {got['miou']:6.3f} {base['uniform']:8.3f} "
                                 f"{base['gaussian']:8.3f} {got['miou'] / best:7.2f}x {got['n']:4d}")
    return "\n".join(lines)


def format_markdown(s: dict) -> str:
    """The summary as the README's Markdown table: a row per source, word kind and map kind; each threshold's mIoU
    and its ratio to the best baseline (uniform or centred Gaussian) at that threshold."""
    scores = s["scores"]
    found = list(dict.fromkeys(k.split("/")[0] for k in scores))
    lines = ["| images | words | map kind | mIoU, 0.4 x max | / best baseline | mIoU, mean | / best baseline | n |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for source in [x for x in SOURCES if x in found]:
        for kind in KINDS:
            names = list(dict.fromkeys(k.split("/")[2] for k in scores if k.startswith(f"{source}/{kind}/")))
            for name in (x for x in names if x not in ("uniform", "gaussian")):
                cells = []
                for thr in THRESHOLDS:
                    got = scores[f"{source}/{kind}/{name}/{thr}"]
                    best = max(scores[f"{source}/{kind}/{b}/{thr}"]["miou"] for b in ("uniform", "gaussian"))
                    cells += [f"{got['miou']:.3f}", f"{got['miou'] / best:.2f}x"]
                words = {"colour": "colour", "shape": "shape", "concept": "shape, as a concept"}[kind]
                lines.append(f"| {source} | {words} | {name} | {' | '.join(cells)} | {got['n']} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crossattn-sd eval-seg", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default=None, help="a preset (tiny, tiny-mmdit) or a training export folder (with "
                   "the defaults of the preset of its kind); default: the embedded model")
    p.add_argument("--n", type=int, default=144, help="number of held-out captions (scenes)")
    p.add_argument("--seed", type=int, default=0, help="first seed (caption k: scene jitter and noise seed + k)")
    p.add_argument("--t", type=float, default=0.5, help="noise level of the inspection, in (0, 1]")
    p.add_argument("--passes", type=int, default=1, help="inspection passes per image, averaged")
    p.add_argument("--no-generated", action="store_true", help="score rendered scenes only")
    p.add_argument("--no-concepts", action="store_true", help="score prompt words only (no concept inspections)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the summary to this JSON file")
    p.add_argument("--markdown", action="store_true", help="print the summary as the README's Markdown table")
    p.add_argument("--out", default=None, type=Path,
                   help="keep the generated bundles and index.jsonl here (a rerun skips them); default: a temporary "
                        "folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from ..config import GenerationDefaults, get_preset, load_presets
    from ..families import family_of
    from ..inspect import check_inspect_args
    from ..pipeline import load_pipeline

    try:
        check_inspect_args("caption", args.t, args.passes, "resize")
        if args.n < 1:
            raise ValueError(f"--n {args.n} is out of range; use a number of captions >= 1")
    except ValueError as err:
        print(f"crossattn-sd eval-seg: error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device="cpu")
    if args.model not in load_presets():  # a training export: the defaults of the preset of its kind
        kind = "tiny-mmdit" if family_of(pipe).name == "sd3" else "tiny"
        pipe.crossattn_defaults = GenerationDefaults.from_preset(get_preset(kind))
    summary = evaluate(pipe, args.n, args.seed, args.t, args.passes, not args.no_generated, args.out,
                       concepts=not args.no_concepts)
    summary["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
    print(format_markdown(summary) if args.markdown else format_summary(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
