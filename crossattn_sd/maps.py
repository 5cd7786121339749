"""The map store (what processors record into) and aggregation over heads, layers, resolutions and steps.

Recording is cheap and bounded: each cross-attention layer keeps a running sum of its head-averaged
attention probabilities at its own native resolution, shape (images, h, w, tokens). Per-step copies are kept
only when asked for, up to a byte budget; past it, per-step detail is dropped with a warning and the running
sums carry on, so a generation never fails because of its maps. Nothing here upsamples until a map is asked
for, and only that map is upsampled.
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


def layer_hw(latent_hw: tuple[int, int], num_queries: int) -> tuple[int, int]:
    """(h, w) of a layer with `num_queries` pixels in a UNet whose input latent is `latent_hw`.

    UNet downsamplers are stride-2 convolutions with padding 1, so each level has ceil(h/2) x ceil(w/2).
    """
    h, w = latent_hw
    while h * w > num_queries and (h > 1 or w > 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != num_queries:
        raise ValueError(f"cannot place {num_queries} queries on a latent of {latent_hw[0]}x{latent_hw[1]}")
    return h, w


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
    """

    per_step: bool = False
    keep_heads: bool = False
    max_step_bytes: int = DEFAULT_MAX_STEP_BYTES
    cfg: bool | Callable[[], bool] = False

    latent_hw: tuple[int, int] | None = None
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (n, h, w, T)
    head_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (n, heads, h, w, T)
    counts: dict[str, int] = field(default_factory=dict)
    steps: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per UNet call: layer -> (n, h, w, T)
    timesteps: list[float] = field(default_factory=list)
    step_bytes: int = 0
    steps_dropped: bool = False
    _cfg_now: bool = False

    # -- recording -------------------------------------------------------------------------------------------

    def begin_call(self, latent_hw: tuple[int, int], timestep: float | None = None) -> None:
        """Mark the start of a UNet evaluation on a latent of size `latent_hw`."""
        self.latent_hw = tuple(int(s) for s in latent_hw)
        self._cfg_now = bool(self.cfg() if callable(self.cfg) else self.cfg)
        self.timesteps.append(float("nan") if timestep is None else float(timestep))
        if self.per_step and not self.steps_dropped:
            self.steps.append({})

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
        probs = attention_probs.detach().float()
        n = probs.shape[0] // heads
        h, w = layer_hw(self.latent_hw, probs.shape[1])
        probs = probs.reshape(n, heads, h, w, probs.shape[-1])  # (n, heads, h, w, T)
        mean = probs.mean(dim=1)
        if layer in self.sums:
            self.sums[layer] += mean
            self.counts[layer] += 1
        else:
            self.sums[layer] = mean.clone()
            self.counts[layer] = 1
        if self.keep_heads:
            if layer in self.head_sums:
                self.head_sums[layer] += probs
            else:
                self.head_sums[layer] = probs.clone()
        if self.per_step and not self.steps_dropped and self.steps:
            nbytes = mean.numel() * mean.element_size()
            if self.step_bytes + nbytes > self.max_step_bytes:
                self.steps_dropped = True
                self.steps.clear()
                self.step_bytes = 0
                warnings.warn(
                    f"per-step attention maps reached max_step_bytes={self.max_step_bytes}; per-step detail "
                    "was dropped and the running sums kept. Raise max_step_bytes or use fewer steps/layers.",
                    RuntimeWarning, stacklevel=2,
                )
            else:
                self.steps[-1][layer] = mean.clone()
                self.step_bytes += nbytes

    # -- reading ---------------------------------------------------------------------------------------------

    @property
    def layers(self) -> list[str]:
        return list(self.sums)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def num_images(self) -> int:
        return next(iter(self.sums.values())).shape[0] if self.sums else 0

    @property
    def has_steps(self) -> bool:
        return self.per_step and not self.steps_dropped and bool(self.steps)

    def layer_shape(self, layer: str) -> tuple[int, int]:
        return tuple(self.sums[layer].shape[1:3])

    def resolutions(self) -> list[tuple[int, int]]:
        """The distinct (h, w) map sizes, largest first."""
        return sorted({self.layer_shape(l) for l in self.sums}, key=lambda hw: -hw[0] * hw[1])

    def num_heads(self, layer: str) -> int | None:
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
        out = MapStore(per_step=self.per_step, keep_heads=self.keep_heads, max_step_bytes=self.max_step_bytes,
                       latent_hw=self.latent_hw, counts=dict(self.counts), timesteps=list(self.timesteps),
                       steps_dropped=self.steps_dropped)
        out.sums = {k: v[images].clone() for k, v in self.sums.items()}
        out.head_sums = {k: v[images].clone() for k, v in self.head_sums.items()}
        out.steps = [{k: v[images].clone() for k, v in step.items()} for step in self.steps]
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors; `from_state_dict` inverts it."""
        out = {f"sum/{k}": v.contiguous() for k, v in self.sums.items()}
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
            elif kind == "timesteps":
                store.timesteps = [float(t) for t in value.tolist()]
        store.steps = [steps.get(i, {}) for i in range(num_steps)]
        # Keep layer order stable: the order processors recorded them, which is the UNet's order.
        store.sums = dict(sorted(store.sums.items(), key=lambda kv: _unet_order(kv[0])))
        return store


def _unet_order(name: str) -> tuple:
    """Sort key that puts UNet layers in forward order: down blocks, mid block, up blocks."""
    block = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(name.split(".")[0], 3)
    return (block, [int(p) if p.isdigit() else p for p in name.split(".")[1:]])


# -- aggregation ---------------------------------------------------------------------------------------------


def token_map(store: MapStore, token_indices: Sequence[int], size: tuple[int, int], *, image_index: int = 0,
              layers=None, resolutions=None, steps: Sequence[int] | None = None, head: int | None = None,
              ) -> torch.Tensor:
    """Sum of the chosen tokens' probabilities, averaged over the chosen layers, at image `size` (H, W).

    Each layer's map is upsampled (bilinear) to `size` before averaging, so every resolution counts equally.
    Returns a float32 tensor (H, W) of raw probabilities (each pixel's probabilities over all tokens sum to 1).
    """
    if not store.sums:
        raise ValueError("no attention maps were recorded (did the pipeline run inside capture()?)")
    if not 0 <= image_index < store.num_images:
        raise ValueError(f"image_index={image_index} is out of range; this run has {store.num_images} image(s)")
    idx = torch.as_tensor(list(token_indices), dtype=torch.long)
    total = torch.zeros(size, dtype=torch.float32)
    names = store.select_layers(layers, resolutions)
    for name in names:
        m = store.layer_mean(name, steps=steps, head=head)[image_index]  # (h, w, T)
        m = m.index_select(-1, idx).sum(-1) if len(idx) else torch.zeros(m.shape[:2])
        total += F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
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
