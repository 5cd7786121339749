"""The map store: what processors record into, and its reading per layer (means over steps and heads).

Turning a store into per-word maps at the image's size (layers averaged, upsampled) is aggregation, in
`aggregate.py`.

Recording is cheap and bounded: each cross-attention layer keeps a running sum of its head-averaged
attention probabilities at its own native resolution, shape (images, h, w, tokens). Per-step copies are kept
only when asked for, up to a byte budget; past it, per-step detail is dropped with a warning and the running
sums carry on, so a generation never fails because of its maps. Nothing here upsamples: `aggregate.token_maps`
upsamples only the map asked for, when it is asked for.

The "exact" processor hands over queries and keys instead of probabilities (`record_attention`): they wait,
up to `defer_bytes`, and `flush` turns each layer's waiting steps into probabilities in one batched
softmax(Q K^T) instead of one per step. Same maps, a few tensor calls per layer instead of a few per layer
and step, which is most of the recording cost when the UNet is small (each call has a fixed CPU cost).
`capture()` flushes when its block ends, and every reading method flushes first.

Per-step maps (`per_step=True`) are what grows with a long timeline, so they are kept small (see `keep_step`):
only the token columns a store is told are real (`step_columns`: the prompt's start, words and end, not its
padding), plus one column holding the rest's sum so a row keeps its total; in `per_step_dtype` (float16 halves
them); on `per_step_device` (the CPU by default, copied from a GPU without stalling it); and, with
`per_step_by="resolution"`, one map per resolution and step (the sum of that resolution's layers) instead of
one per layer. Map indices stay token indices: reading expands the kept columns back to the full token axis.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

DEFAULT_MAX_STEP_BYTES = 1 << 30  # 1 GiB of per-step maps before per-step detail is dropped
DEFAULT_DEFER_BYTES = 64 << 20  # queries and keys waiting for a batched softmax before they are flushed
DEFAULT_CHUNK_BYTES = 64 << 20  # scores computed at once by the side softmax (`text_attention`)
PER_STEP_BY = ("layer", "resolution")  # what one per-step map covers: one layer, or all layers of one size
RESOLUTION_KEY = "resolution:"  # per-step maps of `per_step_by="resolution"` are keyed "resolution:<h>x<w>"


def resolution_key(hw: tuple[int, int]) -> str:
    """The per-step key of a resolution's summed maps ("resolution:16x16")."""
    return f"{RESOLUTION_KEY}{int(hw[0])}x{int(hw[1])}"


def key_resolution(key: str) -> tuple[int, int] | None:
    """The (h, w) of a per-step key made by `resolution_key`; None for a layer's key."""
    if not key.startswith(RESOLUTION_KEY):
        return None
    h, _, w = key[len(RESOLUTION_KEY):].partition("x")
    return (int(h), int(w)) if h.isdigit() and w.isdigit() else None


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
    # Scores are laid out (keys, queries): the softmax then runs over a non-last axis with the queries
    # contiguous, which PyTorch's CPU kernel vectorises across (a softmax over a last axis of ~20 text tokens
    # is mostly per-row overhead): a generation's flush on the embedded model 9.2 -> 8.5 ms. The scale goes on
    # the (few) keys.
    key = key * scale
    means, per_head = [], []
    for q0 in range(0, num_queries, rows):
        scores = torch.matmul(key, query[:, :, q0:q0 + rows].transpose(-1, -2))  # (B, heads, Nk, rows)
        if mask is not None:
            scores += (mask[..., q0:q0 + rows, :] if mask.shape[-2] > 1 else mask).transpose(-1, -2)
        probs = scores.softmax(dim=-2)[:, :, start:stop]  # (B, heads, C, rows)
        means.append(probs.mean(dim=1))
        if keep_heads:
            per_head.append(probs)
    mean = (means[0] if len(means) == 1 else torch.cat(means, dim=-1)).transpose(-1, -2)  # (B, Nq, C)
    if not keep_heads:
        return mean, None
    return mean, (per_head[0] if len(per_head) == 1 else torch.cat(per_head, dim=-1)).transpose(-1, -2)


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
        step_columns (sequence of `int`, *optional*): the token columns per-step maps keep (`generate` passes
            the prompts' real tokens, `tokens.prompt_columns`); each per-step map then holds those columns and
            one more, the sum of the others. Default: every column. The running sums always keep every column.
        per_step_dtype (`torch.dtype`): dtype per-step maps are stored in (float16 halves them).
        per_step_device (`str`, *optional*): where per-step maps are stored; default the CPU (from a GPU, by
            non-blocking copies into pinned memory: the GPU is not stalled at each layer); None: where they
            were recorded.
        per_step_by (`str`): "layer" (one map per layer and step) or "resolution" (one per resolution and
            step: the sum of that resolution's layers; enough for every view that takes whole resolutions).
    """

    per_step: bool = False
    keep_heads: bool = False
    max_step_bytes: int = DEFAULT_MAX_STEP_BYTES
    cfg: bool | Callable[[], bool] = False
    defer_bytes: int = DEFAULT_DEFER_BYTES
    grid: Callable[[tuple[int, int], int], tuple[int, int]] | None = field(default=None, repr=False)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    concepts: object | None = field(default=None, repr=False)  # a `concepts.Concepts` recorded beside this store
    step_columns: Sequence[int] | None = None
    per_step_dtype: torch.dtype = torch.float32
    per_step_device: str | torch.device | None = "cpu"
    per_step_by: str = "layer"

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
    _open: dict = field(default_factory=dict, repr=False)  # (call, key) -> a resolution's sum, still growing
    _copying: set = field(default_factory=set, repr=False)  # devices with non-blocking copies in flight
    _columns: dict = field(default_factory=dict, repr=False)  # (device, tokens) -> (kept, rest) index tensors

    def __post_init__(self):
        if self.per_step_by not in PER_STEP_BY:
            raise ValueError(f"per_step_by={self.per_step_by!r} is not known; use one of {', '.join(PER_STEP_BY)}")
        if isinstance(self.per_step_dtype, str):
            self.per_step_dtype = getattr(torch, self.per_step_dtype, None)
        if self.per_step_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"per_step_dtype={self.per_step_dtype!r} is not a float dtype kept here; use "
                             "float32, float16 or bfloat16")
        if self.step_columns is not None:
            cols = sorted({int(c) for c in self.step_columns})
            if cols and cols[0] < 0:
                raise ValueError(f"step_columns holds {cols[0]}; token columns are >= 0")
            self.step_columns = tuple(cols)

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
        self._seal(self.num_steps - 1)

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
            self._flush_pending()

    def flush(self) -> None:
        """Turn the queries and keys waiting from `record_attention` into maps (one batched softmax per layer),
        and finish the per-step maps (copies in flight land): every field is complete afterwards (the concepts'
        stores too)."""
        if self.concepts is not None:
            self.concepts.flush()
        self._flush_pending()
        self._seal(None)
        for device in self._copying:
            torch.cuda.synchronize(device)  # the non-blocking copies into pinned memory have landed
        self._copying.clear()

    def _flush_pending(self) -> None:
        """The batched softmax of `flush`, also run while recording when the waiting inputs pass `defer_bytes`."""
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
        self._seal(self.num_steps - 1)  # the current call may have layers still to come

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
            self.keep_step(call, layer, step_mean)

    def keep_step(self, call: int, layer: str, step_mean: torch.Tensor) -> None:
        """Keep one layer's head-mean map (n, h, w, T) of model call `call` as per-step detail: its kept columns
        (`step_columns` and the rest's sum), in `per_step_dtype`, on `per_step_device`; per resolution, added
        to the call's sum for that size (kept on the recording device until the call is complete). Past
        `max_step_bytes` every per-step map is dropped with a warning."""
        compact = self._compact(step_mean)
        if self.per_step_by == "layer":
            if self._count_step_bytes(compact):
                self.steps[call][layer] = self._to_storage(compact)
            return
        key = resolution_key(step_mean.shape[1:3])
        if (call, key) in self._open:
            self._open[call, key] += compact
        elif key in self.steps[call]:  # sealed early (read in mid-call): add to it where it is kept
            kept = self.steps[call][key]
            self.steps[call][key] = (kept.float() + compact.float().to(kept.device)).to(kept.dtype)
        elif self._count_step_bytes(compact):
            self._open[call, key] = compact.float()  # a sum in float32 even for float16 maps

    def _compact(self, step_mean: torch.Tensor) -> torch.Tensor:
        """(n, h, w, T) -> a new tensor of the kept columns and the rest's sum, (n, h, w, K + 1); a copy of every
        column if none are set."""
        if self.step_columns is None:
            return step_mean.clone()
        num_tokens = step_mean.shape[-1]
        key = (step_mean.device, num_tokens)
        if key not in self._columns:
            kept = [c for c in self.step_columns if c < num_tokens]
            if len(kept) < len(self.step_columns):
                raise ValueError(f"step_columns go up to {self.step_columns[-1]}, but the layers have "
                                 f"{num_tokens} token columns")
            rest = sorted(set(range(num_tokens)) - set(kept))
            self._columns[key] = tuple(torch.tensor(c, dtype=torch.long, device=step_mean.device)
                                       for c in (kept, rest))
        kept, rest = self._columns[key]
        return torch.cat([step_mean.index_select(-1, kept), step_mean.index_select(-1, rest).sum(-1, keepdim=True)],
                         dim=-1)

    def _count_step_bytes(self, compact: torch.Tensor) -> bool:
        """Count a new per-step map against the budget; False (and per-step detail dropped) past it."""
        nbytes = compact.numel() * self.per_step_dtype.itemsize
        if self.step_bytes + nbytes > self.max_step_bytes:
            self.steps_dropped = True
            self.steps.clear()
            self._open.clear()
            self.step_bytes = 0
            warnings.warn(
                f"per-step attention maps reached max_step_bytes={self.max_step_bytes}; per-step detail "
                "was dropped and the running sums kept. Raise max_step_bytes, use fewer steps/layers, "
                "per_step_dtype=float16 or per_step_by='resolution'.",
                RuntimeWarning, stacklevel=4,
            )
            return False
        self.step_bytes += nbytes
        return True

    def _to_storage(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (a tensor of the store's own) in `per_step_dtype` on `per_step_device`. From a GPU the copy is non-blocking into pinned
        memory (PyTorch's caching host allocator), so recording never waits for the GPU; `flush` synchronises
        before anything reads it. The dtype is converted first, on the GPU, so less crosses the bus."""
        t = t.to(self.per_step_dtype)
        device = t.device if self.per_step_device is None else torch.device(self.per_step_device)
        if t.device == device:
            return t
        if t.device.type == "cuda" and device.type == "cpu":
            self._copying.add(t.device)
            return t.to(device, non_blocking=True)
        return t.to(device)

    def _seal(self, before: int | None) -> None:
        """Move the per-resolution sums of the calls before `before` (all: None), complete now, to storage."""
        for call, key in [k for k in self._open if before is None or k[0] < before]:
            total = self._open.pop((call, key))
            if not self.steps_dropped:
                self.steps[call][key] = self._to_storage(total)

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
        if self.per_step_by == "resolution":
            raise ValueError("per-step maps were kept per resolution (per_step_by='resolution'), not per layer; "
                             "pick whole resolutions for a step range (token_maps does), or generate with "
                             "per_step_by='layer'")
        return self._expand(self._step_mean(layer, steps))

    def _step_mean(self, key: str, steps: Sequence[int]) -> torch.Tensor:
        """Mean of the per-step maps under `key` (a layer, or a `resolution_key`) over `steps`, float32, as kept
        (the kept columns and the rest's sum when `step_columns` is set)."""
        if not self.has_steps:
            why = "were dropped at max_step_bytes" if self.steps_dropped else "were not kept"
            raise ValueError(f"per-step maps {why}; generate with per_step=True (and enough max_step_bytes)")
        bad = [s for s in steps if not 0 <= s < len(self.steps)]
        if bad:
            raise ValueError(f"steps {bad} are out of range; this run has steps 0..{self.num_steps - 1}")
        picked = [self.steps[s][key] for s in steps if key in self.steps[s]]
        if not picked:
            raise ValueError(f"steps {list(steps)} select nothing; this run has steps 0..{self.num_steps - 1}")
        return torch.stack(picked).float().mean(dim=0)

    def _expand(self, kept: torch.Tensor) -> torch.Tensor:
        """A per-step map as kept -> (n, h, w, T) on the full token axis: the kept columns at their token indices,
        zeros elsewhere (the rest's sum is only a row total, see `layer_total`)."""
        if self.step_columns is None:
            return kept
        num_tokens = next(iter(self.sums.values())).shape[-1]
        full = kept.new_zeros((*kept.shape[:-1], num_tokens))
        full[..., list(self.step_columns)] = kept[..., :-1]
        return full

    def layer_total(self, layer: str, steps: Sequence[int] | None = None, head: int | None = None) -> torch.Tensor:
        """Each pixel's probability summed over every token column, (n, h, w, 1): `layer_mean`'s row totals,
        also for per-step maps that keep only some columns (their last column holds the others' sum)."""
        if steps is None or self.step_columns is None or self.per_step_by == "resolution":
            return self.layer_mean(layer, steps=steps, head=head).sum(-1, keepdim=True)  # (or its error)
        return self._step_mean(layer, steps).sum(-1, keepdim=True)

    def resolution_mean(self, hw: tuple[int, int], steps: Sequence[int]) -> torch.Tensor:
        """The sum of the maps of every layer of size `hw`, averaged over `steps`: (n, h, w, T). With
        `per_step_by="resolution"` this is what the store keeps; otherwise it is summed from the layers."""
        self.flush()
        hw = tuple(int(v) for v in hw)
        if self.per_step_by == "resolution":
            return self._expand(self._step_mean(resolution_key(hw), steps))
        names = [l for l in self.layers if self.layer_shape(l) == hw]
        if not names:
            raise ValueError(f"no recorded layer has {hw[0]}x{hw[1]} maps")
        total = self.layer_mean(names[0], steps)
        for name in names[1:]:
            total = total + self.layer_mean(name, steps)
        return total

    def select_images(self, images: slice) -> "MapStore":
        """A store holding only some of the recorded images (e.g. the edited one of a [source, edit] batch)."""
        self.flush()
        out = MapStore(per_step=self.per_step, keep_heads=self.keep_heads, max_step_bytes=self.max_step_bytes,
                       latent_hw=self.latent_hw, counts=dict(self.counts), timesteps=list(self.timesteps),
                       steps_dropped=self.steps_dropped, step_columns=self.step_columns,
                       per_step_dtype=self.per_step_dtype, per_step_by=self.per_step_by)
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
        if self.step_columns is not None:
            out["step_columns"] = torch.tensor(self.step_columns, dtype=torch.int64)
        out["timesteps"] = torch.tensor(self.timesteps, dtype=torch.float64)
        return out

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], **settings) -> "MapStore":
        """The store `state_dict` wrote; per-step maps keep their dtype, and how they were kept (`step_columns`,
        `per_step_by`, `per_step_dtype`) is read from the tensors."""
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
                steps.setdefault(int(i), {})[layer] = value
                num_steps = max(num_steps, int(i) + 1)
                store.per_step_dtype = value.dtype
                if key_resolution(layer) is not None:
                    store.per_step_by = "resolution"
            elif kind == "step_columns":
                store.step_columns = tuple(int(c) for c in value.tolist())
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
