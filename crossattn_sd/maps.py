"""The map store (what processors record into) and aggregation over heads, layers, resolutions and steps.

Recording is cheap and bounded: each cross-attention layer keeps a running sum of its head-averaged
attention probabilities at its own native resolution, shape (images, h, w, tokens). Per-step copies are kept
only when asked for, up to a byte budget; past it, per-step detail is dropped with a warning and the running
sums carry on, so a generation never fails because of its maps. Nothing here upsamples until a map is asked
for, and only that map is upsampled.

The "exact" processor hands over queries and keys instead of probabilities (`record_attention`): they wait,
up to `defer_bytes`, and `flush` turns each layer's waiting steps into probabilities in one batched
softmax(Q K^T) instead of one per step. Same maps, a few tensor calls per layer instead of a few per layer
and step, which is most of the recording cost when the UNet is small (each call has a fixed CPU cost).
`capture()` flushes when its block ends, and every reading method flushes first.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

DEFAULT_MAX_STEP_BYTES = 1 << 30  # 1 GiB of per-step maps before per-step detail is dropped
DEFAULT_DEFER_BYTES = 64 << 20  # queries and keys waiting for a batched softmax before they are flushed
DEFAULT_CHUNK_BYTES = 64 << 20  # scores computed at once by the side softmax (`text_attention`)


def same_grid(latent_hw: tuple[int, int], num_queries: int) -> tuple[int, int]:
    """The grid of a store filled by hand (no family adapter set `MapStore.grid`): the latent's own."""
    if latent_hw[0] * latent_hw[1] != num_queries:
        raise ValueError(f"cannot place {num_queries} queries on a latent of {latent_hw[0]}x{latent_hw[1]}; "
                         "set MapStore.grid (capture() sets it from the model's family)")
    return tuple(latent_hw)


def text_attention(query: torch.Tensor, key: torch.Tensor, scale: float, mask: torch.Tensor | None = None,
                   columns: tuple[int, int | None] = (0, None), keep_heads: bool = False,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of softmax(scale * Q K^T + mask) over ALL keys, restricted to the key `columns` (start, stop).

    For joint attention the columns are the text tokens: each entry is a query's share of attention going to
    that token, so a row sums to less than 1 (the rest went to image tokens). The softmax is computed in chunks
    of queries, at most `chunk_bytes` of scores at a time, so a large layer's full score matrix never exists.

    Args:
        query: (B, heads, Nq, d); key: (B, heads, Nk, d); mask: additive, broadcastable to (B, heads, Nq, Nk).
    Returns:
        The head mean (B, Nq, C) and, with `keep_heads`, the per-head probabilities (B, heads, Nq, C).
    """
    batch, heads, num_queries, _ = query.shape
    rows = max(1, chunk_bytes // max(1, batch * heads * key.shape[-2] * 4))
    start, stop = columns
    key_t = key.transpose(-1, -2)
    means, per_head = [], []
    for q0 in range(0, num_queries, rows):
        scores = torch.matmul(query[:, :, q0:q0 + rows], key_t).mul_(scale)
        if mask is not None:
            scores += mask[..., q0:q0 + rows, :] if mask.shape[-2] > 1 else mask
        probs = scores.softmax(dim=-1)[..., start:stop]  # (B, heads, rows, C)
        means.append(probs.mean(dim=1))
        if keep_heads:
            per_head.append(probs)
    mean = means[0] if len(means) == 1 else torch.cat(means, dim=1)
    if not keep_heads:
        return mean, None
    return mean, (per_head[0] if len(per_head) == 1 else torch.cat(per_head, dim=2))


def __getattr__(name):
    if name == "layer_hw":  # moved to the UNet family (its levels); kept importable from here
        from .families.unet import layer_hw

        return layer_hw
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class MapStore:
    """Per-call record of cross-attention probabilities.

    One store belongs to one generation call (never shared between requests). Processors call `record`;
    `begin_call` marks each UNet evaluation (one denoising step for single-evaluation schedulers).

    Args:
        per_step (`bool`): also keep each step's maps (needed for timestep ranges and timelines).
        keep_heads (`bool`): also keep per-head running sums (for "one head" views).
        max_step_bytes (`int`): budget for per-step maps; reaching it drops per-step detail with a warning.
        cfg (`bool` or callable): whether the UNet batch holds [unconditional, conditional] halves; only the
            conditional half is recorded. A callable is asked at every UNet call (pipelines decide per call).
        defer_bytes (`int`): memory that queries and keys handed to `record_attention` may hold before they
            are turned into maps (0: at once). The fields `sums`, `counts`, `head_sums` and `steps` are
            complete after `flush()`, which `capture()` calls on exit and the reading methods call first.
        grid (callable, *optional*): `grid(latent_hw, num_queries) -> (h, w)`, where a layer's image tokens sit;
            `capture()` sets it from the model's family (UNet levels, a transformer's patch grid). Default:
            the latent's own grid.
        chunk_bytes (`int`): the most scores `flush` computes at once (see `text_attention`).
    """

    per_step: bool = False
    keep_heads: bool = False
    max_step_bytes: int = DEFAULT_MAX_STEP_BYTES
    cfg: bool | Callable[[], bool] = False
    defer_bytes: int = DEFAULT_DEFER_BYTES
    grid: Callable[[tuple[int, int], int], tuple[int, int]] | None = field(default=None, repr=False)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    concepts: object | None = field(default=None, repr=False)  # a `concepts.Concepts` recorded beside this store

    latent_hw: tuple[int, int] | None = None
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (n, h, w, T)
    head_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (n, heads, h, w, T)
    counts: dict[str, int] = field(default_factory=dict)
    steps: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per UNet call: layer -> (n, h, w, T)
    timesteps: list[float] = field(default_factory=list)
    step_bytes: int = 0
    steps_dropped: bool = False
    _cfg_now: bool = False
    _pending: list = field(default_factory=list, repr=False)  # record_attention calls waiting for `flush`
    _pending_bytes: int = 0

    # -- recording -------------------------------------------------------------------------------------------

    def begin_call(self, latent_hw: tuple[int, int], timestep: float | None = None) -> None:
        """Mark the start of a UNet evaluation on a latent of size `latent_hw`."""
        self.latent_hw = tuple(int(s) for s in latent_hw)
        self._cfg_now = bool(self.cfg() if callable(self.cfg) else self.cfg)
        self.timesteps.append(float("nan") if timestep is None else float(timestep))
        if self.per_step and not self.steps_dropped:
            self.steps.append({})
        if self.concepts is not None:  # concept maps: stores of their own, marked in step
            self.concepts.begin_call(latent_hw, timestep, self.grid)

    def conditional(self, batch: int) -> slice:
        """The slice of a UNet batch whose maps are recorded: the conditional half under guidance."""
        if self._cfg_now:
            if batch % 2:
                raise ValueError(f"classifier-free guidance batch of odd size {batch}")
            return slice(batch // 2, batch)
        return slice(0, batch)

    def record(self, layer: str, attention_probs: torch.Tensor, heads: int) -> None:
        """Add one layer's probabilities, shape (n * heads, queries, tokens), for the recorded images only."""
        if self.latent_hw is None:
            raise RuntimeError("MapStore.record called before begin_call: install processors with capture()")
        probs = attention_probs.detach() if attention_probs.requires_grad else attention_probs
        if probs.dtype != torch.float32:
            probs = probs.float()
        n = probs.shape[0] // heads
        h, w = self._grid(probs.shape[1])
        probs = probs.reshape(1, n, heads, h, w, probs.shape[-1])
        self._add(layer, probs.mean(dim=2), probs if self.keep_heads else None, [self.num_steps - 1])

    def _grid(self, num_queries: int) -> tuple[int, int]:
        return tuple((self.grid or same_grid)(self.latent_hw, num_queries))

    def record_attention(self, layer: str, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                         scale: float, columns: tuple[int, int | None] = (0, None),
                         token_weights: torch.Tensor | None = None) -> None:
        """Record softmax(scale * Q K^T + mask) of the recorded images, computed later in a batch (see `flush`).

        Args:
            query (`torch.Tensor`): (n, heads, queries, d), the recorded images' image-token queries only.
            key (`torch.Tensor`): (n, heads, keys, d): every key the queries attend to.
            mask (`torch.Tensor`, *optional*): additive, broadcastable to (n, heads, queries, keys).
            scale (`float`): the layer's softmax scale (`attn.scale`).
            columns (`(start, stop)`): the text tokens' key positions; only those columns of the softmax over
                all keys are kept (see `text_attention`). Default: every key is a text token (cross-attention).
            token_weights (`torch.Tensor`, *optional*): (n, T) weights the probabilities are multiplied by, the
                steered probabilities p_j w_j of an exact-mode reweight.
        """
        if self.latent_hw is None:
            raise RuntimeError("MapStore.record called before begin_call: install processors with capture()")
        if query.requires_grad or key.requires_grad:
            query, key = query.detach(), key.detach()
            mask = None if mask is None else mask.detach()
        hw = self._grid(query.shape[-2])
        self._pending.append((layer, len(self.timesteps) - 1, hw, query, key, mask, scale, tuple(columns),
                              token_weights))
        # Views of the UNet's tensors keep the whole batch alive: both halves under guidance.
        self._pending_bytes += (query.numel() + key.numel()) * query.element_size() * (2 if self._cfg_now else 1)
        if self._pending_bytes > self.defer_bytes:
            self.flush()

    def flush(self) -> None:
        """Turn the queries and keys waiting from `record_attention` into maps: one batched softmax per layer."""
        if self.concepts is not None:
            self.concepts.flush()
        if not self._pending:
            return
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        groups: dict[tuple, list] = {}  # insertion order = first UNet call's layer order
        for entry in pending:
            layer, _, hw, query, key, mask, _, columns, weights = entry
            shape_key = (layer, hw, tuple(query.shape[1:]), tuple(key.shape[1:]), mask is None, columns,
                         weights is None)
            groups.setdefault(shape_key, []).append(entry)
        with torch.no_grad():
            for (layer, (h, w), *_), entries in groups.items():
                query = torch.cat([e[3] for e in entries]).float()  # (calls * n, heads, Nq, d)
                key = torch.cat([e[4] for e in entries]).float()
                mask = None if entries[0][5] is None else torch.cat([e[5] for e in entries])
                mean, heads = text_attention(query, key, entries[0][6], mask, entries[0][7], self.keep_heads,
                                             self.chunk_bytes)
                if entries[0][8] is not None:  # reweight: the steered probabilities p_j w_j
                    weights = torch.cat([e[8] for e in entries]).to(mean)  # (calls * n, T)
                    mean = mean * weights[:, None, :]
                    heads = None if heads is None else heads * weights[:, None, None, :]
                calls = len(entries)  # mean: (calls * n, Nq, T) -> (calls, n, h, w, T)
                mean = mean.reshape(calls, -1, h, w, mean.shape[-1])
                if heads is not None:
                    heads = heads.reshape(calls, -1, heads.shape[1], h, w, heads.shape[-1])
                self._add(layer, mean, heads, [e[1] for e in entries])

    def _add(self, layer: str, mean: torch.Tensor, probs: torch.Tensor | None, calls: list[int]) -> None:
        """Accumulate head-mean probabilities (calls, n, h, w, T) of the model calls with indices `calls`, and the
        per-head ones (calls, n, heads, h, w, T) when heads are kept."""
        total = mean.sum(dim=0) if len(calls) > 1 else mean[0]
        if layer in self.sums:
            self.sums[layer] += total
            self.counts[layer] += len(calls)
        else:
            self.sums[layer] = total
            self.counts[layer] = len(calls)
        if self.keep_heads and probs is not None:
            heads_total = probs.sum(dim=0)
            if layer in self.head_sums:
                self.head_sums[layer] += heads_total
            else:
                self.head_sums[layer] = heads_total
        if not (self.per_step and self.steps):
            return
        for step_mean, call in zip(mean, calls):
            if self.steps_dropped:
                return
            nbytes = step_mean.numel() * step_mean.element_size()
            if self.step_bytes + nbytes > self.max_step_bytes:
                self.steps_dropped = True
                self.steps.clear()
                self.step_bytes = 0
                warnings.warn(
                    f"per-step attention maps reached max_step_bytes={self.max_step_bytes}; per-step detail "
                    "was dropped and the running sums kept. Raise max_step_bytes or use fewer steps/layers.",
                    RuntimeWarning, stacklevel=3,
                )
                return
            self.steps[call][layer] = step_mean.clone()
            self.step_bytes += nbytes

    # -- reading ---------------------------------------------------------------------------------------------

    @property
    def layers(self) -> list[str]:
        self.flush()
        return list(self.sums)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def num_images(self) -> int:
        self.flush()
        return next(iter(self.sums.values())).shape[0] if self.sums else 0

    @property
    def has_steps(self) -> bool:
        self.flush()
        return self.per_step and not self.steps_dropped and bool(self.steps)

    def layer_shape(self, layer: str) -> tuple[int, int]:
        self.flush()
        return tuple(self.sums[layer].shape[1:3])

    def resolutions(self) -> list[tuple[int, int]]:
        """The distinct (h, w) map sizes, largest first."""
        return sorted({self.layer_shape(l) for l in self.layers}, key=lambda hw: -hw[0] * hw[1])

    def num_heads(self, layer: str) -> int | None:
        self.flush()
        return self.head_sums[layer].shape[1] if layer in self.head_sums else None

    def select_layers(self, layers: str | Iterable[str] | None = None,
                      resolutions: Iterable[int | tuple[int, int]] | None = None) -> list[str]:
        """Layer names matching glob patterns `layers` and map sizes `resolutions` (an int matches max(h, w))."""
        names = self.layers
        if layers is not None:
            patterns = [layers] if isinstance(layers, str) else list(layers)
            names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if resolutions is not None:
            wanted = list(resolutions)
            names = [n for n in names
                     if any(self.layer_shape(n) == tuple(r) if isinstance(r, (tuple, list))
                            else max(self.layer_shape(n)) == int(r) for r in wanted)]
        if not names:
            raise ValueError(
                f"no recorded layer matches layers={layers!r}, resolutions={resolutions!r}; recorded map sizes: "
                f"{', '.join(f'{h}x{w}' for h, w in self.resolutions()) or '(none)'}"
            )
        return names

    def layer_mean(self, layer: str, steps: Sequence[int] | None = None, head: int | None = None) -> torch.Tensor:
        """Mean probabilities of one layer over the chosen steps: (n, h, w, T)."""
        self.flush()
        if head is not None:
            if layer not in self.head_sums:
                raise ValueError("per-head maps were not kept; generate with keep_heads=True to pick a head")
            if steps is not None:
                raise ValueError("a head and a step range cannot be combined (per-step maps are head-averaged)")
            heads = self.head_sums[layer].shape[1]
            if not 0 <= head < heads:
                raise ValueError(f"head={head} is out of range; layer {layer} has heads 0..{heads - 1}")
            return self.head_sums[layer][:, head] / self.counts[layer]
        if steps is None:
            return self.sums[layer] / self.counts[layer]
        if not self.has_steps:
            why = "were dropped at max_step_bytes" if self.steps_dropped else "were not kept"
            raise ValueError(f"per-step maps {why}; generate with per_step=True (and enough max_step_bytes)")
        bad = [s for s in steps if not 0 <= s < len(self.steps)]
        if bad:
            raise ValueError(f"steps {bad} are out of range; this run has steps 0..{self.num_steps - 1}")
        picked = [self.steps[s][layer] for s in steps if layer in self.steps[s]]
        if not picked:
            raise ValueError(f"steps {list(steps)} select nothing; this run has steps 0..{self.num_steps - 1}")
        return torch.stack(picked).mean(dim=0)

    def select_images(self, images: slice) -> "MapStore":
        """A store holding only some of the recorded images (e.g. the edited one of a [source, edit] batch)."""
        self.flush()
        out = MapStore(per_step=self.per_step, keep_heads=self.keep_heads, max_step_bytes=self.max_step_bytes,
                       latent_hw=self.latent_hw, counts=dict(self.counts), timesteps=list(self.timesteps),
                       steps_dropped=self.steps_dropped)
        out.sums = {k: v[images].clone() for k, v in self.sums.items()}
        out.head_sums = {k: v[images].clone() for k, v in self.head_sums.items()}
        out.steps = [{k: v[images].clone() for k, v in step.items()} for step in self.steps]
        out.concepts = None if self.concepts is None else self.concepts.select_images(images)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors; `from_state_dict` inverts it."""
        self.flush()
        out = {f"sum/{k}": v.contiguous() for k, v in self.sums.items()}
        out.update({f"order/{k}": torch.tensor(i) for i, k in enumerate(self.sums)})  # safetensors sorts keys
        out.update({f"heads/{k}": v.contiguous() for k, v in self.head_sums.items()})
        out.update({f"count/{k}": torch.tensor(c) for k, c in self.counts.items()})
        for i, step in enumerate(self.steps):
            out.update({f"step/{i}/{k}": v.contiguous() for k, v in step.items()})
        out["timesteps"] = torch.tensor(self.timesteps, dtype=torch.float64)
        return out

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], **settings) -> "MapStore":
        store = cls(**settings)
        num_steps = 0
        steps: dict[int, dict[str, torch.Tensor]] = {}
        order: dict[str, int] = {}
        for key, value in tensors.items():
            kind, _, rest = key.partition("/")
            if kind == "sum":
                store.sums[rest] = value.float()
            elif kind == "heads":
                store.head_sums[rest] = value.float()
            elif kind == "count":
                store.counts[rest] = int(value)
            elif kind == "step":
                i, _, layer = rest.partition("/")
                steps.setdefault(int(i), {})[layer] = value.float()
                num_steps = max(num_steps, int(i) + 1)
            elif kind == "order":
                order[rest] = int(value)
            elif kind == "timesteps":
                store.timesteps = [float(t) for t in value.tolist()]
        store.steps = [steps.get(i, {}) for i in range(num_steps)]
        # Keep the order processors recorded the layers in (the model's forward order); bundles written before
        # the order was saved fall back to names with numbers sorted as numbers (a UNet's down < mid < up).
        store.sums = dict(sorted(store.sums.items(), key=lambda kv: (order.get(kv[0], len(order)),
                                                                      _natural(kv[0]))))
        return store


def _natural(name: str) -> list:
    """Sort key of a layer name with its numbers compared as numbers ("blocks.2" before "blocks.10")."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


# -- aggregation ---------------------------------------------------------------------------------------------


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
    by_size: dict[tuple[int, int], torch.Tensor] = {}  # (h, w) -> sum of that resolution's layer means (h, w, T)
    for name in names:
        m = store.layer_mean(name, steps=steps, head=head)[image_index]
        if not text_share:
            m = m / m.sum(-1, keepdim=True).clamp_min(torch.finfo(m.dtype).tiny)
        hw = tuple(m.shape[:2])
        by_size[hw] = by_size[hw] + m if hw in by_size else m
    groups = [torch.as_tensor(list(g), dtype=torch.long) for g in token_groups]
    total = torch.zeros((len(groups), *size), dtype=torch.float32)
    for (h, w), m in by_size.items():
        picked = torch.stack([m.index_select(-1, idx).sum(-1) if len(idx) else m.new_zeros((h, w))
                              for idx in groups])  # (groups, h, w)
        # Groups go on the batch axis: each is then upsampled as its own plane, so a group's values do not
        # depend on how many others are computed with it (stacked as channels, they can differ by 1 ulp).
        total += F.interpolate(picked[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return total / len(names)


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
