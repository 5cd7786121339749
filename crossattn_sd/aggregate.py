"""Aggregation: a `MapStore`'s recorded maps -> one map per word (or token group) at the image's size.

Reads a store, never records into one. Layers of one resolution are summed first and upsampled once, so only
the map asked for is upsampled, when it is asked for; `normalize` scales a map to [0, 1] for display.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .maps import MapStore


def token_map(store: MapStore, token_indices: Sequence[int], size: tuple[int, int], *, image_index: int = 0,
              layers=None, resolutions=None, steps: Sequence[int] | None = None, head: int | None = None,
              text_share: bool = True) -> torch.Tensor:
    """Sum of the chosen tokens' probabilities, averaged over the chosen layers, at image `size` (H, W).

    Each layer's map is upsampled (bilinear) to `size` before averaging, so every resolution counts equally.
    Returns a float32 tensor (H, W) of raw probabilities. In cross-attention each pixel's probabilities over
    the text tokens sum to 1; in joint attention they are the pixel's share of attention going to the text
    (the rest went to image tokens), unless `text_share=False` renormalises each layer's averaged map over the
    text tokens (rows sum to 1, comparable with cross-attention). See `token_maps` for several groups at once.
    """
    return token_maps(store, [token_indices], size, image_index=image_index, layers=layers,
                      resolutions=resolutions, steps=steps, head=head, text_share=text_share)[0]


def token_maps(store: MapStore, token_groups: Sequence[Sequence[int]], size: tuple[int, int], *,
               image_index: int = 0, layers=None, resolutions=None, steps: Sequence[int] | None = None,
               head: int | None = None, text_share: bool = True) -> torch.Tensor:
    """`token_map` for several token groups (e.g. every word of a prompt) at once: float32 (groups, H, W).

    Upsampling is linear, so the layers of one resolution are summed first and upsampled once: one interpolation
    per resolution for all groups, instead of one per layer and group (`word_maps` of a long prompt on a large
    image is then a few calls, not hundreds). A group's map is the same bits whether computed alone or with others.
    """
    store.flush()
    if not store.sums:
        raise ValueError("no attention maps were recorded (did the pipeline run inside capture()?)")
    if not 0 <= image_index < store.num_images:
        raise ValueError(f"image_index={image_index} is out of range; this run has {store.num_images} image(s)")
    names = store.select_layers(layers, resolutions)
    by_size = _resolution_sums(store, names, image_index, steps, head, text_share)
    groups = [torch.as_tensor(list(g), dtype=torch.long) for g in token_groups]
    total = torch.zeros((len(groups), *size), dtype=torch.float32)
    for (h, w), m in by_size.items():
        idx_groups = [idx.to(m.device) for idx in groups]
        picked = torch.stack([m.index_select(-1, idx).sum(-1) if len(idx) else m.new_zeros((h, w))
                              for idx in idx_groups])  # (groups, h, w)
        # Groups go on the batch axis: each is then upsampled as its own plane, so a group's values do not
        # depend on how many others are computed with it (stacked as channels, they can differ by 1 ulp).
        total += F.interpolate(picked[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].cpu()
    return total / len(names)


def _resolution_sums(store: MapStore, names: list[str], image_index: int, steps, head,
                     text_share: bool) -> dict[tuple[int, int], torch.Tensor]:
    """(h, w) -> the sum of the layer means of `names` of that size, (h, w, T), for image `image_index`.

    A store that kept per-step maps per resolution has them summed already: a step range then needs every
    recorded layer of each size it uses (the others' share cannot be taken out)."""
    by_size: dict[tuple[int, int], torch.Tensor] = {}
    if steps is not None and store.per_step_by == "resolution":
        if not text_share:
            raise ValueError("text_share=False renormalises each layer's map, but per-step maps were kept per "
                             "resolution (per_step_by='resolution'); use every step, or per_step_by='layer'")
        for hw in dict.fromkeys(store.layer_shape(n) for n in names):
            missing = [l for l in store.layers if store.layer_shape(l) == hw and l not in names]
            if missing:
                raise ValueError(f"per-step maps were kept per resolution (per_step_by='resolution'), so a step "
                                 f"range takes all {hw[0]}x{hw[1]} layers; {missing[0]} is not selected (pick "
                                 "resolutions rather than layers, or generate with per_step_by='layer')")
            by_size[hw] = store.resolution_mean(hw, steps)[image_index]
        return by_size
    for name in names:
        m = store.layer_mean(name, steps=steps, head=head)[image_index]
        if not text_share:
            total = store.layer_total(name, steps=steps, head=head)[image_index]
            m = m / total.clamp_min(torch.finfo(m.dtype).tiny)
        hw = tuple(m.shape[:2])
        by_size[hw] = by_size[hw] + m if hw in by_size else m
    return by_size


def normalize(m: torch.Tensor, how: str = "minmax") -> torch.Tensor:
    """Scale a map to [0, 1]: "minmax" (default), "max" (divide by the maximum) or "none" (clamp only)."""
    if how == "minmax":
        lo, hi = m.min(), m.max()
        return (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)
    if how == "max":
        hi = m.max()
        return m / hi if hi > 0 else torch.zeros_like(m)
    if how == "none":
        return m.clamp(0, 1)
    raise ValueError(f"unknown normalize={how!r}; use 'minmax', 'max' or 'none'")
