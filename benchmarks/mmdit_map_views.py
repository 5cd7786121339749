"""What tiny-mmdit's word maps are made of: IoU of several map views of its joint attention, per block and step.

`eval-tiny --model tiny-mmdit` scores one view: each image token's share of attention going to a word's text
tokens (the image->text block of the joint softmax), averaged over heads, the 4 joint blocks and the 20 steps.
This script records everything a view could be made of in one pass per caption, then scores many views with
eval-tiny's own measure (`crossattn_sd.tiny.evaluate`: the map upsampled bilinearly to 64 x 64, min-max
normalised, thresholded at 0.4, IoU with the object's pixels of its colour in its named half):

- `share`: image->text, a pixel's share of its whole joint softmax row (the package's default);
- `renorm`: the same rows renormalised over the text columns (`token_maps(text_share=False)`), per step and block;
- `t2i`: text->image, the word's text query's attention over the image keys (where the word reads from);
- `out`: ConceptAttention's output-space map (Helbling et al. 2025): softmax over the text tokens of
  <o_image, o_text>, the dot products of the attention outputs (heads concatenated) of image and text tokens;

each averaged over every block or one block alone, over all steps, the first half or the second half, and over
heads or one head. The captions run as plain pipeline calls with the preset's settings (images as `generate()`'s).

Two caption sets, so that a view is chosen on one and reported on the other:
    # selection split: 48 two-object captions of TRAINING scene types (not held out), noise seeds 5000 +
    python benchmarks/mmdit_map_views.py record --split train --n 48 --out /work/shared/runs/mmdit-views/train
    # the reported split: eval-tiny's held-out captions (seed 0)
    python benchmarks/mmdit_map_views.py record --split heldout --n 144 --out /work/shared/runs/mmdit-views/heldout
    python benchmarks/mmdit_map_views.py score /work/shared/runs/mmdit-views/train [--views share-all-all ...]

Run with OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE and the MALLOC variables of the README.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class SideProcessor:
    """Diffusers' `JointAttnProcessor2_0` (same output) that also keeps, for the conditional half, the whole joint
    softmax per head and the attention outputs (before the output projection) of one denoiser call."""

    def __init__(self, sink: dict, layer: str):
        self.sink, self.layer = sink, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        eq, ek, ev = (p(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
                      for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        query, key, value = torch.cat([query, eq], 2), torch.cat([key, ek], 2), torch.cat([value, ev], 2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        cond = batch_size // 2  # [unconditional, conditional] under guidance
        probs = (query[cond] @ key[cond].transpose(-1, -2) / math.sqrt(head_dim)).softmax(-1)  # (heads, N, N)
        n_img = residual.shape[1]
        o = out[cond]  # (heads, N, d)
        self.sink.setdefault(self.layer, []).append(dict(
            i2t=probs[:, :n_img, n_img:].clone(),  # (heads, I, T)
            t2i=probs[:, n_img:, :n_img].transpose(-1, -2).clone(),  # (heads, I, T): text query j over image keys
            out=torch.einsum("hid,hjd->hij", o[:, :n_img], o[:, n_img:]),  # per-head output dot products (h, I, T)
        ))
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states, encoder_hidden_states = hidden_states[:, :n_img], hidden_states[:, n_img:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states


def split_items(split: str, n: int):
    """(caption, objects in caption order, noise seed): eval-tiny's held-out captions, or two-object captions of
    training scene types (never held out) with noise seeds 5000 + k."""
    from crossattn_sd.tiny.evaluate import captions
    from crossattn_sd.tiny.world import caption, sample_scene

    if split == "heldout":
        return captions(n, 0)
    rng = np.random.default_rng(20261202)
    out = []
    while len(out) < n:
        scene = sample_scene(rng, p_two=1.0)
        order = (0, 1) if len(out) % 2 == 0 else (1, 0)
        out.append((caption(scene, order), [scene.objects[i].kind for i in order], 5000 + len(out)))
    return out


def record(split: str, n: int, out_dir: Path, threads: int, model: str = "tiny-mmdit") -> None:
    from crossattn_sd.config import get_preset
    from crossattn_sd.families import family_of
    from crossattn_sd.pipeline import load_pipeline
    from crossattn_sd.tiny.judge import judge

    torch.set_num_threads(threads)
    preset = get_preset("tiny-mmdit")
    pipe = load_pipeline(model, device="cpu")  # the preset, or a training export (called with the preset's settings)
    family = family_of(pipe)
    layers = family.layers()
    out_dir.mkdir(parents=True, exist_ok=True)
    original = pipe.transformer.attn_processors
    for k, (text, kinds, seed) in enumerate(split_items(split, n)):
        path = out_dir / f"{k:04d}.npz"
        if path.exists():
            continue
        sink: dict = {}
        procs = {name: (SideProcessor(sink, name.removesuffix(".processor"))
                        if name.removesuffix(".processor") in layers else p) for name, p in original.items()}
        pipe.transformer.set_attn_processor(procs)
        try:
            with torch.no_grad():
                image = pipe(text, num_inference_steps=preset.steps, guidance_scale=preset.guidance,
                             height=preset.height, width=preset.width, max_sequence_length=preset.max_sequence_length,
                             generator=torch.Generator(device="cpu").manual_seed(seed)).images[0]
        finally:
            pipe.transformer.set_attn_processor(dict(original))  # it pops from the dict it is given
        image = np.asarray(image)
        alignment = family.text_positions(pipe, text, None, preset.max_sequence_length)
        # (steps, blocks, heads, I, T) per view
        arrays = {v: torch.stack([torch.stack([c[v] for c in sink[layer]]) for layer in layers], 1).numpy()
                  for v in ("i2t", "t2i", "out")}
        words = {}
        for i, (colour, shape, _) in enumerate(kinds):
            for kind, word in (("colour", colour), ("shape", shape)):
                occurrence = [c if kind == "colour" else s for c, s, _ in kinds][:i].count(word)
                words[f"{i}/{kind}"] = alignment.indices_of(word, occurrence)
        verdict = judge(image, kinds)
        np.savez_compressed(path, image=image, **{k_: v.astype(np.float16) for k_, v in arrays.items()},
                            meta=json.dumps(dict(text=text, kinds=kinds, seed=seed, words=words, ok=bool(verdict.ok),
                                                 objects_ok=[bool(o.ok) for o in verdict.objects])))
        print(f"{k + 1}/{n} {text!r} ok={verdict.ok}", flush=True)


# -- views ------------------------------------------------------------------------------------------------------

SOURCES = ("share", "renorm", "t2i", "out")


def view_maps(data: dict, views: list[tuple], tokens: list[int]) -> torch.Tensor:
    """A word's (views, h, w) maps from one caption's record: for each view (source, blocks, steps, head), `source`
    (see the module docstring) averaged over the chosen blocks, steps and heads (None: all)."""
    text = {key: torch.from_numpy(data[key].astype(np.float32)) for key in ("i2t", "t2i", "out")}  # (S, L, H, I, T)
    maps = []
    for source, blocks, steps, head in views:
        a = text[{"share": "i2t", "renorm": "i2t", "t2i": "t2i", "out": "out"}[source]]
        a = a[slice(None) if steps is None else steps]
        if blocks is not None:
            a = a[:, blocks]
        if head is not None:
            a = a[:, :, head:head + 1]
        if source == "out":  # heads concatenated: the dot product is the sum over heads
            a = (a.sum(2, keepdim=True) / math.sqrt(a.shape[2] * 32)).softmax(-1)  # softmax over the text tokens
        elif source == "renorm":
            a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
        maps.append(a.mean(dim=(0, 1, 2))[:, tokens].sum(-1))  # (I,)
    m = torch.stack(maps)
    side = int(round(math.sqrt(m.shape[1])))
    return m.reshape(len(views), side, side)


def score_folder(folder: Path, views: list[tuple]) -> dict:
    from crossattn_sd.tiny.evaluate import gaussian_map, iou, object_mask, region

    files = sorted(folder.glob("*.npz"))
    tallies = {name(v): {"colour": [], "shape": []} for v in views}
    base = {"uniform": [], "gaussian": []}
    ok = objects_ok = objects = 0
    for f in files:
        data = dict(np.load(f))
        meta = json.loads(str(data["meta"]))
        image = data["image"]
        h, w = image.shape[:2]
        ok += meta["ok"]
        objects += len(meta["objects_ok"])
        objects_ok += sum(meta["objects_ok"])
        kinds = meta["kinds"]
        masks = [object_mask(image, c, p) for c, _, p in kinds]
        for i in range(len(kinds)):
            if not masks[i].any():
                continue
            base["uniform"].append(iou(region(np.ones((h, w))), masks[i]))
            base["gaussian"].append(iou(region(gaussian_map(h, w)), masks[i]))
            mask = torch.from_numpy(masks[i])
            for kind in ("colour", "shape"):
                m = view_maps(data, views, meta["words"][f"{i}/{kind}"])
                up = F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
                lo, hi = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
                up = torch.where(hi > lo, (up - lo) / (hi - lo).clamp_min(1e-30), torch.zeros_like(up))
                # eval-tiny's region (>= 0.4 x max of the min-max normalised map) and IoU, for every view at once
                reg = (up >= 0.4 * up.amax((1, 2), keepdim=True)) & (up.amax((1, 2), keepdim=True) > 0)
                inter, union = (reg & mask).sum((1, 2)), (reg | mask).sum((1, 2))
                for v, a, b in zip(views, inter.tolist(), union.tolist()):
                    tallies[name(v)][kind].append(a / b if b else 0.0)
    best = max(np.mean(base["uniform"]), np.mean(base["gaussian"]))
    return dict(n=len(files), caption_accuracy=ok / max(1, len(files)), object_accuracy=objects_ok / max(1, objects),
                uniform=float(np.mean(base["uniform"])), gaussian=float(np.mean(base["gaussian"])), best=float(best),
                views={v: {k: float(np.mean(x)) for k, x in t.items()} for v, t in tallies.items()})


def name(v: tuple) -> str:
    source, blocks, steps, head = v
    b = "all" if blocks is None else "b" + "".join(map(str, blocks))
    s = "all" if steps is None else f"s{steps.start or 0}-{steps.stop}"
    return f"{source}-{b}-{s}" + ("" if head is None else f"-h{head}")


def all_views(num_blocks: int = 4, num_steps: int = 20, heads: int = 4) -> list[tuple]:
    half = num_steps // 2
    step_sets = [None, slice(0, half), slice(half, num_steps), slice(0, 5), slice(num_steps - 5, num_steps)]
    block_sets = [None] + [[b] for b in range(num_blocks)] + [list(range(num_blocks - 1))]
    views = [(src, b, s, None) for src in SOURCES for b in block_sets for s in step_sets]
    views += [(src, [b], s, h) for src in SOURCES for b in range(num_blocks) for h in range(heads) for s in step_sets]
    return views


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="generate captions and keep what every view needs")
    rec.add_argument("--split", choices=["train", "heldout"], required=True, help="caption set (see above)")
    rec.add_argument("--n", type=int, default=48, help="number of captions")
    rec.add_argument("--out", type=Path, required=True, help="folder for one .npz per caption (reruns skip done)")
    rec.add_argument("--threads", type=int, default=1, help="torch threads")
    rec.add_argument("--model", default="tiny-mmdit", help="the preset or a training export folder")
    sc = sub.add_parser("score", help="IoU of every view over a recorded folder")
    sc.add_argument("folder", type=Path, help="a folder written by `record`")
    sc.add_argument("--views", nargs="*", default=None, help="view names to score (default: all)")
    sc.add_argument("--json", type=Path, default=None, help="also write the scores here")
    args = p.parse_args(argv)
    if args.command == "record":
        record(args.split, args.n, args.out, args.threads, args.model)
        return 0
    views = all_views()
    if args.views:
        views = [v for v in views if name(v) in args.views]
    s = score_folder(args.folder, views)
    print(f"{s['n']} captions: {100 * s['caption_accuracy']:.1f}% / {100 * s['object_accuracy']:.1f}% right; "
          f"baselines uniform {s['uniform']:.3f} gaussian {s['gaussian']:.3f}")
    for v, r in sorted(s["views"].items(), key=lambda kv: -min(kv[1].values())):
        print(f"{v:24s} colour {r['colour']:.3f} ({r['colour'] / s['best']:.2f}x)  "
              f"shape {r['shape']:.3f} ({r['shape'] / s['best']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(s, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
