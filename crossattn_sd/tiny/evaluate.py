"""Evaluate the embedded model on the held-out two-object captions (never seen in training).

Prints (a) generation accuracy: per object, is its colour present in its named half and its shape
recognisable; per caption, are all objects right (and no stray colours); and (b) localisation: for colour and
shape words, the IoU of the word's heat map thresholded at 0.4 x its maximum against the object's mask (its
colour's pixels in its named half of the generated image), next to two baselines (a uniform map, a centred
Gaussian) and a control (the same heat map against the *other* object's mask). The heat map is the model's
default view, as the app shows it first (the tiny preset's `map_layers: finest`: its 16x16 layers at 64 x 64;
tiny-mmdit's `map_layers: last` and `map_head: 2`: head 2 of its last joint block);
unless `--resolutions` picks other layers, the IoU is also given for the map averaged over every layer, for the
layers of each resolution alone, and by the object's place in the caption (first or second mentioned).

The captions run through the batch engine (`crossattn-sd batch`'s): `--out DIR` keeps each caption's bundle and
the index, a rerun into the same folder skips finished captions, and under `accelerate launch` the captions are
split between the processes (the main process prints the summary).

    crossattn-sd eval-tiny --n 144 --seed 0
    accelerate launch --multi_gpu --num_processes 2 -m crossattn_sd eval-tiny --n 144 --out runs/eval
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cli import HelpFormatter
from .judge import PALETTE_NAMES, half_mask, judge, palette_labels
from .world import HELDOUT, caption as scene_caption, heldout_scenes

THRESHOLD = 0.4  # a heat map's region is where it reaches 0.4 x its maximum
NO_MAPS = ("not defined: this model has no attention maps (FiLM, as in tiny-film, conditions every pixel on the "
           "pooled prompt through a per-channel scale and shift, so no pixel attends to a word)")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def region(heatmap: np.ndarray) -> np.ndarray:
    return heatmap >= THRESHOLD * heatmap.max() if heatmap.max() > 0 else np.zeros(heatmap.shape, bool)


def gaussian_map(h: int, w: int) -> np.ndarray:
    """The centred-Gaussian baseline (sigma a quarter of the side)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.exp(-(((y - (h - 1) / 2) / (h / 4)) ** 2 + ((x - (w - 1) / 2) / (w / 4)) ** 2) / 2)


def object_mask(image: np.ndarray, colour: str, position: str) -> np.ndarray:
    """The object's pixels in the generated image: its colour, within its named half."""
    labels = palette_labels(image)
    return (labels == PALETTE_NAMES.index(colour)) & half_mask(position, labels.shape[0])


def captions(n: int, seed: int) -> list[tuple[str, list[tuple[str, str, str]], int]]:
    """n (caption, objects in caption order, noise seed) triples over the held-out scenes, both word orders."""
    scenes = heldout_scenes()
    out = []
    k = 0
    while len(out) < n:
        scene = scenes[k % len(scenes)]
        order = (0, 1) if (k // len(scenes)) % 2 == 0 else (1, 0)
        kinds = [scene.objects[i].kind for i in order]
        out.append((scene_caption(scene, order), kinds, seed + k))
        k += 1
    return out


@dataclass
class Tally:
    objects: int = 0
    objects_ok: int = 0
    captions: int = 0
    captions_ok: int = 0
    iou: dict[str, list[float]] = field(default_factory=lambda: {
        f"{kind}/{what}": [] for kind in ("colour", "shape") for what in ("map", "uniform", "gaussian", "other")})
    seconds: list[float] = field(default_factory=list)
    has_maps: bool = True  # False once a result without attention maps (a FiLM model's) is scored

    def summary(self) -> dict:
        out = {"captions": self.captions, "caption_accuracy": self.captions_ok / max(1, self.captions),
               "has_maps": self.has_maps,
               "object_accuracy": self.objects_ok / max(1, self.objects),
               "median_seconds_per_image": float(np.median(self.seconds)) if self.seconds else None}
        for key, values in self.iou.items():
            out[f"iou/{key}"] = float(np.mean(values)) if values else None
            out[f"n/{key}"] = len(values)
        return out


def view_name(result, resolutions) -> str:
    """What the scored heat map averages, for the summary."""
    if resolutions == "all":
        return "every layer"
    if resolutions is not None:
        return f"resolutions {resolutions}"
    head = result.default_head()
    head = "" if head is None else f", head {head}"
    if result.settings.get("map_layers") == "last":
        return ", ".join(result.default_layers()) + f"{head} (the model's default view)"
    default = result.default_resolutions()
    if default is None:
        return f"every layer{head}"
    return ", ".join(f"{h}x{w}" for h, w in default) + f" layers{head} (the model's default view)"


def score(tally: Tally, result, kinds: list[tuple[str, str, str]], resolutions=None) -> None:
    """Add one generated caption (its result and its objects in caption order) to the tally."""
    view = dict(layers="*") if resolutions == "all" else dict(resolutions=resolutions)
    image = np.asarray(result.images[0])
    verdict = judge(image, kinds)
    tally.captions += 1
    tally.captions_ok += verdict.ok
    tally.objects += len(verdict.objects)
    tally.objects_ok += sum(o.ok for o in verdict.objects)

    if not result.store.layers:  # a model without attention (FiLM): its map IoU is not defined, not 0
        tally.has_maps = False
        return
    h, w = image.shape[:2]
    uniform, gauss = region(np.ones((h, w))), region(gaussian_map(h, w))
    masks = [object_mask(image, c, p) for c, _, p in kinds]
    words = [w_.lower() for w_ in result.words]
    for i, (colour, shape, _) in enumerate(kinds):
        if not masks[i].any():
            continue  # the object is missing: nothing to localise against
        other = masks[1 - i] if len(kinds) == 2 else None
        for kind, word in (("colour", colour), ("shape", shape)):
            # occurrence: the k-th time this word appears among the caption's objects
            occurrence = [c if kind == "colour" else s for c, s, _ in kinds][:i].count(word)
            if words.count(word) <= occurrence:
                continue
            m = region(result.heatmap(word, occurrence=occurrence, **view))
            tally.iou[f"{kind}/map"].append(iou(m, masks[i]))
            if len(kinds) == 2:  # by the object's place in the caption (the text encoder is causal)
                tally.iou.setdefault(f"{kind}/map#{i + 1}", []).append(iou(m, masks[i]))
            if resolutions is None:  # every layer averaged, and each resolution's layers alone
                every = region(result.heatmap(word, occurrence=occurrence, layers="*"))
                tally.iou.setdefault(f"{kind}/every-layer", []).append(iou(every, masks[i]))
                for hw in result.store.resolutions():
                    one = region(result.heatmap(word, occurrence=occurrence, resolutions=[hw]))
                    tally.iou.setdefault(f"{kind}/map@{hw[0]}x{hw[1]}", []).append(iou(one, masks[i]))
            tally.iou[f"{kind}/uniform"].append(iou(uniform, masks[i]))
            tally.iou[f"{kind}/gaussian"].append(iou(gauss, masks[i]))
            if other is not None and other.any():
                tally.iou[f"{kind}/other"].append(iou(m, other))


def evaluate(pipe, n: int = 144, seed: int = 0, steps: int | None = None, guidance: float | None = None,
             resolutions=None, progress: bool = True, out: str | Path | None = None) -> dict | None:
    """Run the evaluation; returns the summary dict (see module docstring). `resolutions`: None for the
    model's default view, "all" for every layer, or map sizes as `GenerationResult.heatmap` takes them.

    The captions run through the batch engine (`crossattn_sd.batch`): a bundle folder per caption and
    index.jsonl in `out` (default: a temporary folder), so a rerun into the same `out` skips finished captions,
    and under `accelerate launch` (or torchrun) the captions are split between the processes; the summary is
    computed from the bundles and the index's timings on the main process (the others return None)."""
    from ..batch import make_rows, process_state, run_batch

    items = captions(n, seed)
    state = process_state(cpu=pipe.device.type == "cpu")
    if out is None and state.num_processes > 1:
        raise ValueError("give an output folder (--out DIR, on a filesystem every process sees) to evaluate with "
                         f"{state.num_processes} processes")
    rows = make_rows([{"prompt": text, "seed": noise_seed, "steps": steps, "guidance": guidance}
                      for text, _, noise_seed in items])
    with tempfile.TemporaryDirectory(prefix="eval-tiny-") if out is None else nullcontext(out) as folder:
        index = run_batch(rows, folder, lambda device: pipe, model=getattr(pipe, "crossattn_source", None),
                          progress=progress, desc="eval-tiny")
        if not state.is_main_process:
            return None
        return summarize(index, items, Path(folder), resolutions)


def summarize(index: list[dict], items, folder: Path, resolutions=None) -> dict:
    """The summary of an evaluation run by the batch engine: its index lines and bundles in `folder`."""
    from ..bundle_load import load_result

    tally = Tally()
    map_view = None
    for line, (_, kinds, _) in zip(index, items, strict=True):
        if line["status"] != "ok":
            raise RuntimeError(f"caption {line['row']} ({line['prompt']!r}) failed: {line['error']}")
        result = load_result(folder / line["name"])
        tally.seconds.append(line["seconds"]["generate"])
        score(tally, result, kinds, resolutions)
        map_view = map_view or (view_name(result, resolutions) if tally.has_maps else NO_MAPS)
    return {**tally.summary(), "map_view": map_view}


def format_summary(s: dict) -> str:
    lines = [f"held-out captions: {s['captions']}   (held-out scene types: {len(HELDOUT)})",
             f"whole caption right: {100 * s['caption_accuracy']:.1f}%",
             f"each object right:   {100 * s['object_accuracy']:.1f}%",
             f"median time per image: {s['median_seconds_per_image']:.3f} s"]
    if s.get("parameters"):
        lines.append("parameters: " + ", ".join(f"{k} {v:,}" for k, v in s["parameters"].items()))
    if not s.get("has_maps", True):
        return "\n".join(lines + ["", f"map IoU: {NO_MAPS}"])
    lines += ["",
             f"mean IoU (map >= 0.4 x max vs the object's mask); map: {s.get('map_view')}",
             f"{'word':8s} {'map':>7s} {'uniform':>8s} {'gaussian':>9s} {'other obj':>10s} {'map/best':>9s}   n"]
    for kind in ("colour", "shape"):
        vals = {k: s[f"iou/{kind}/{k}"] for k in ("map", "uniform", "gaussian", "other")}
        best = max(v for k, v in vals.items() if k in ("uniform", "gaussian") and v is not None) \
            if vals["uniform"] is not None else None
        fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        ratio = f"{vals['map'] / best:.2f}x" if best and vals["map"] is not None else "-"
        lines.append(f"{kind:8s} {fmt(vals['map']):>7s} {fmt(vals['uniform']):>8s} {fmt(vals['gaussian']):>9s} "
                     f"{fmt(vals['other']):>10s} {ratio:>9s}   {s[f'n/{kind}/map']}")
    by_size = sorted({k.split("@")[1] for k in s if k.startswith("iou/") and "@" in k},
                     key=lambda hw: -int(hw.split("x")[0]))
    if by_size:
        lines += ["", "mean IoU of the map averaged over every layer, and from one resolution's layers alone",
                  f"{'word':8s} {'every':>7s} " + " ".join(f"{hw:>7s}" for hw in by_size)]
        for kind in ("colour", "shape"):
            lines.append(f"{kind:8s} {s[f'iou/{kind}/every-layer']:7.3f} "
                         + " ".join(f"{s[f'iou/{kind}/map@{hw}']:7.3f}" for hw in by_size))
    if s.get("iou/colour/map#1") is not None:
        lines += ["", "mean IoU by the object's place in a two-object caption",
                  f"{'word':8s} {'first':>7s} {'second':>7s}"]
        for kind in ("colour", "shape"):
            lines.append(f"{kind:8s} " + " ".join(f"{s[f'iou/{kind}/map#{k}']:7.3f}" for k in (1, 2)))
    return "\n".join(lines)


def parameters(pipe) -> dict[str, int]:
    """The pipeline's parameter counts: its denoiser, its text encoders (together) and its VAE."""
    from ..families import family_of

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    encoders = [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
                if getattr(pipe, n, None) is not None]
    return {family_of(pipe).denoiser_attr: count(family_of(pipe).model),
            "text encoder" + ("s" if len(encoders) > 1 else ""): sum(count(e) for e in encoders),
            "vae": count(pipe.vae)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crossattn-sd eval-tiny", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--n", type=int, default=144, help="number of held-out captions to generate")
    p.add_argument("--seed", type=int, default=0, help="first noise seed (caption k uses seed + k)")
    p.add_argument("--model", default=None, help="a preset (tiny, tiny-untaught, tiny-mmdit, tiny-film) or a training export folder (evaluated with the defaults of the preset of its kind); default: the embedded model")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's preset)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's preset)")
    p.add_argument("--resolutions", default=None,
                   help="comma-separated map sizes to use for heat maps, e.g. '16,8', or 'all' for every layer "
                        "(default: the model's default view: tiny's 16x16 layers, tiny-mmdit's last block's head 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the summary to this JSON file")
    p.add_argument("--out", default=None, type=Path,
                   help="keep each caption's bundle and index.jsonl here (a rerun skips finished captions; needed "
                        "under accelerate launch); default: a temporary folder")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from ..config import GenerationDefaults, get_preset, load_presets
    from ..families import family_of
    from ..pipeline import load_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device="cpu")
    if args.model not in load_presets():
        # A training export in some folder is still an embedded model: evaluate it with the defaults of the preset
        # of its kind (guidance, and for tiny-mmdit its max_sequence_length 0), not SD's.
        family = family_of(pipe)
        kind = "tiny-mmdit" if family.name == "sd3" else "tiny" if family.layers() else "tiny-film"
        pipe.crossattn_defaults = GenerationDefaults.from_preset(get_preset(kind))
    resolutions = args.resolutions and args.resolutions.strip()
    if resolutions and resolutions != "all":
        try:
            resolutions = [int(r) for r in resolutions.split(",")]
        except ValueError:
            print(f"--resolutions {args.resolutions!r}: give map sizes such as 16 or 16,8, or 'all'", file=sys.stderr)
            return 2
    try:
        summary = evaluate(pipe, args.n, args.seed, args.steps, args.guidance, resolutions, out=args.out)
    except ValueError as err:
        print(f"crossattn-sd eval-tiny: error: {err}", file=sys.stderr)
        return 2
    if summary is None:  # not the main process: the main one prints the summary
        return 0
    summary["settings"] = {k: v for k, v in vars(args).items() if k not in ("json", "out")}
    summary["parameters"] = parameters(pipe)
    print(format_summary(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
