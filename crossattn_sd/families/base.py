"""The questions the core asks a model family, and the pieces every family's processors share.

A `Family` is bound to one denoiser (a UNet or a transformer) and answers, for the core:

- `layers()`: the text-conditioned attention layers, by name (keys of `attn_processors` minus ".processor"),
  in forward order;
- `token_grid(latent_hw, num_queries)`: where a layer's image tokens sit on the (h, w) grid for a latent;
  `layer_sizes(latent_hw)`: that grid for every layer;
- `step_input(args, kwargs)`: where a step begins: the latent size and timestep of a denoiser call (read by a
  forward pre-hook on the denoiser); `recorded_call(args, kwargs)`: whether that call is recorded at all (not
  a guidance call beside the conditional one: the negative-prompt call of Flux's true CFG, Chroma and
  Qwen-Image, SD3's skip-layer call: it runs on Diffusers' own processors);
- `recorded(store, batch)`: the rows of a recorded call's batch whose maps are kept;
- `processor(store, layer, mode, original, steering)`: the processor that records (and steers) one layer;
- `text_positions(pipe, prompt, ...)`: which tokenizer owns which text positions, as a `PromptTokens`;
- `native_latent_size()`, `pipeline_kwargs(...)`, `guidance_kwargs(...)`: what `generate` needs to call the
  pipeline.

`processors.py`, `maps.py` and `pipeline.py` ask these questions and name no architecture.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

MODES = ("exact", "explicit")


class Recorder:
    """Base of every processor this package installs: `install` refuses to nest on a model that has one."""

    store = None
    layer: str = ""


@dataclass
class Steering:
    """What a steering processor changes in one layer's attention; every family's processor applies it.

    Attributes:
        token_weights: (images, T) weights of the text tokens for the recorded images (reweight), or None.
        token_map: (T,) for a [source, edit] pair: edit token j takes the source's token token_map[j], or keeps
            its own where -1 (prompt-to-prompt edit), or None.
        inject_calls: the edit injects during the first `inject_calls` denoiser calls.
        uniform: every image query attends uniformly to the text tokens (`uniform_probs`): each pixel receives
            the mean of the values, the same pooled text everywhere (the `uniform` processor). It applies to every
            image of the batch, the unconditional half of classifier-free guidance too: it changes the layer's
            mechanism, not one prompt's attention.
    """

    token_weights: torch.Tensor | None = None
    token_map: torch.Tensor | None = None
    inject_calls: int = 0
    uniform: bool = False

    @property
    def name(self) -> str:
        """The steering processor's name, for messages."""
        return "uniform" if self.uniform else "edit" if self.token_map is not None else "reweight"

    def injecting(self, store) -> bool:
        return self.token_map is not None and store.num_steps - 1 < self.inject_calls

    def needs_probs(self, store) -> bool:
        """Whether this call needs the probabilities themselves (explicit math); reweight alone does not."""
        return self.uniform or self.injecting(store)

    def scale_values(self, value: torch.Tensor, rec: slice, columns: tuple[int, int | None]) -> torch.Tensor:
        """Reweight through the values: sum_j p_j w_j v_j = SDPA(Q, K, w * V). `value` (B, heads, keys, d); the
        text keys `columns` of the recorded images are scaled per token. All weights 1 leave `value` as it is."""
        if self.token_weights is None or bool((self.token_weights == 1).all()):
            return value
        w = self.token_weights.to(value.device, value.dtype)[:, None, :, None]  # (images, 1, T, 1)
        start, stop = columns
        value = value.clone()
        value[rec, :, start:stop] = value[rec, :, start:stop] * w
        return value

    def steer_probs(self, text_probs: torch.Tensor, rec: slice, heads: int, store) -> torch.Tensor:
        """Steer the probabilities of the text keys (batch * heads, queries, T): `reweight`, then `inject`."""
        return self.inject(self.reweight(text_probs, rec, heads), rec, heads, store)

    def reweight(self, text_probs: torch.Tensor, rec: slice, heads: int) -> torch.Tensor:
        """Scale the text columns of the recorded images' rows by the token weights (no renormalisation)."""
        if self.token_weights is None:
            return text_probs
        rows = slice(rec.start * heads, rec.stop * heads)
        w = self.token_weights.to(text_probs.device, text_probs.dtype).repeat_interleave(heads, dim=0)
        text_probs = text_probs.clone()
        text_probs[rows] = text_probs[rows] * w[:, None, :]
        return text_probs

    def inject(self, text_probs: torch.Tensor, rec: slice, heads: int, store) -> torch.Tensor:
        """While injecting, the edit's rows (the second recorded image) take the source's columns, mapped by
        `token_map`; tokens mapped to -1 keep their own."""
        if not self.injecting(store):
            return text_probs
        src = text_probs[rec.start * heads: (rec.start + 1) * heads]
        edit_rows = slice((rec.start + 1) * heads, (rec.start + 2) * heads)
        keep = self.token_map < 0
        injected = src[:, :, self.token_map.clamp(min=0)]
        injected[:, :, keep] = text_probs[edit_rows][:, :, keep]
        text_probs = text_probs.clone()
        text_probs[edit_rows] = injected
        return text_probs


def uniform_probs(rows: int, queries: int, keys: int, attention_mask: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """(rows, queries, keys) attention probabilities that are uniform over the keys: 1 / keys, or with an additive
    `attention_mask` (rows, 1 or queries, keys) uniform over the keys it leaves open (softmax of the mask alone,
    i.e. of all-equal scores)."""
    if attention_mask is None:
        return torch.full((rows, queries, keys), 1.0 / keys, dtype=dtype, device=device)
    scores = torch.zeros((rows, queries, keys), dtype=dtype, device=device) + attention_mask.to(dtype)
    return scores.softmax(dim=-1)


class Family:
    """One model family's answers (see the module docstring). Subclasses set `name`, `denoiser_attr` and
    `model_classes` and implement the methods that raise NotImplementedError."""

    name = "?"
    description = ""
    denoiser_attr = ""  # the pipeline attribute holding the denoiser ("unet", "transformer")
    model_classes: tuple[str, ...] = ()  # Diffusers class names of the denoisers this family handles
    layer_kind = "text-attention"  # how errors name its layers
    uniform_attention = False  # whether its processors run `Steering.uniform` (the `uniform` processor)
    batched_guidance = True  # classifier-free guidance runs [unconditional, conditional] as one batch
    latent_hint: tuple[int, int] | None = None  # the latent size `install` was given (or the native one)
    _attention_layers: dict | None = None  # the last `attention_layers()` walk: key -> attention module

    def __init__(self, model):
        self.model = model

    @classmethod
    def handles(cls, model) -> bool:
        import diffusers

        return any(isinstance(model, getattr(diffusers, c)) for c in cls.model_classes if hasattr(diffusers, c))

    # -- layers and grids ---------------------------------------------------------------------------------

    def is_text_layer(self, name: str, module) -> bool:
        raise NotImplementedError

    def attention_layers(self) -> dict[str, torch.nn.Module]:
        """Every attention layer of the model by its `attn_processors` key ("<layer>.processor"), in the same
        order: the modules with Diffusers' public `get_processor` / `set_processor`, which `AttentionMixin`'s
        `attn_processors` and `set_attn_processor` walk the model for. Found in one `named_modules` pass and
        kept on this (per-call) adapter; `attn_processors()` walks again."""
        self._attention_layers = {f"{name}.processor": module
                                  for name, module in self.model.named_modules(remove_duplicate=False)
                                  if name and hasattr(type(module), "get_processor")}
        return self._attention_layers

    def attn_processors(self) -> dict:
        """The model's processors by layer (`"<layer>.processor"` keys), as Diffusers' `attn_processors` gives
        them: each attention layer's `get_processor()` (one walk over the model, not Diffusers' one per read)."""
        return {key: module.get_processor() for key, module in self.attention_layers().items()}

    def set_attn_processor(self, processors: dict) -> None:
        """Set every layer's processor (one entry per key of `attn_processors`, as Diffusers'
        `set_attn_processor` takes them) through each layer's `set_processor`, on the layers the last
        `attn_processors()` read found: no walk (Diffusers' walks the model twice per call, ~2 ms on the
        embedded UNet's 342 modules, and `install` sets twice per generation). `processors` is not emptied."""
        layers = self._attention_layers or self.attention_layers()
        if processors.keys() != layers.keys():
            missing = sorted(set(layers) - set(processors)) or sorted(set(processors) - set(layers))
            raise ValueError(f"set_attn_processor needs one processor for each of the {len(layers)} attention "
                             f"layers of the {type(self.model).__name__}; {missing[0]!r} is "
                             f"{'missing' if missing[0] in layers else 'not one of them'}")
        for key, processor in processors.items():
            layers[key].set_processor(processor)

    def layers(self, processors: dict | None = None) -> list[str]:
        """The text-conditioned attention layers, in forward order (`attn_processors` order)."""
        processors = self.attn_processors() if processors is None else processors
        modules = self._attention_layers or {}
        names = [key.removesuffix(".processor") for key in processors]
        return [n for n in names if self.is_text_layer(n, self._module(modules, n))]

    def _module(self, modules: dict, name: str) -> torch.nn.Module:
        """Layer `name`'s module: from the last walk when it found it, else looked up."""
        module = modules.get(f"{name}.processor")
        return self.model.get_submodule(name) if module is None else module

    def token_grid(self, latent_hw: tuple[int, int], num_queries: int) -> tuple[int, int]:
        raise NotImplementedError

    def layer_sizes(self, latent_hw=None, names=None) -> dict[str, tuple[int, int]]:
        raise NotImplementedError

    def native_latent_size(self) -> int:
        return int(self.model.config.sample_size)

    def latent_hw(self, latent_size) -> tuple[int, int]:
        if latent_size is None:
            latent_size = self.native_latent_size()
        return (latent_size, latent_size) if isinstance(latent_size, int) else tuple(int(v) for v in latent_size)

    # -- calls ---------------------------------------------------------------------------------------------

    def step_input(self, args: tuple, kwargs: dict) -> tuple[tuple[int, int], torch.Tensor | float | None]:
        """(latent (h, w), timestep) of one denoiser call, from its forward pre-hook's arguments."""
        raise NotImplementedError

    def recorded_call(self, args: tuple, kwargs: dict) -> bool:
        """Whether a denoiser call is recorded. False for a guidance call the pipeline makes beside the
        conditional one (`install` runs it with Diffusers' own processors: no maps, no steering, no step)."""
        return True

    def processor(self, store, layer: str, mode: str = "exact", original=None, steering: Steering | None = None):
        raise NotImplementedError

    def recorded(self, store, batch: int) -> slice:
        """The rows of this call's batch whose maps are kept: the store's (the conditional half under guidance
        batched as [unconditional, conditional])."""
        return store.conditional(batch)
    def default_processors(self) -> tuple[type, ...]:
        """Diffusers' own processors of this family's layers, which its processor replaces (transformers)."""
        return ()

    def keeps(self, layer: str, original, mode: str, steering: Steering | None) -> bool:
        """Whether a layer keeps `original`, a processor other than `default_processors()` (an IP-Adapter's): in
        exact capture it stays, unrecorded, with a warning; explicit mode and steering, which would drop what
        it adds, refuse it by name."""
        if original is None or type(original) in self.default_processors():
            return False
        if mode == "explicit" or steering is not None:
            what = ("capture (explicit mode)" if steering is None
                    else "reweight" if steering.token_map is None else "edit")
            raise ValueError(f"the {what} processor would replace layer {layer}'s {type(original).__name__} and drop "
                             "what it adds; use capture in exact mode, leave the layer out with layers=..., or remove "
                             "it first (e.g. pipe.unload_ip_adapter())")
        warnings.warn(f"{self.name} layers with a {type(original).__name__} keep it and are not recorded",
                      RuntimeWarning, stacklevel=3)
        return True

    # -- text ----------------------------------------------------------------------------------------------

    def text_parts(self, pipe) -> list[str]:
        """The names of the text parts whose words can be shown (the first is the default)."""
        return ["clip"]

    def text_positions(self, pipe, prompt: str, part: str | None = None, max_sequence_length: int | None = None):
        raise NotImplementedError

    def concept_recorder(self, pipe, store, names: list[str], kind: str | None = None, template: str | None = None):
        """A context manager that records maps of the words `names` (checked by `concepts.check_concepts`) beside
        `store` while the pipeline runs, leaving its output unchanged; it yields the call's `concepts.Concepts`.
        `kind` is the result's default concept map kind (None: the family's default); `template` the text each
        concept is encoded in (None: `concepts.DEFAULT_TEMPLATE`)."""
        raise ValueError(f"concept maps are not available for {self.description} yet; leave concepts out")

    def pipeline_kwargs(self, pipe, max_sequence_length: int | None = None) -> dict:
        """Extra keyword arguments `generate` passes to the pipeline call."""
        return {}

    def guidance_kwargs(self, pipe, guidance_scale: float, negative_prompt) -> dict:
        """The pipeline call's guidance arguments for `generate`'s guidance scale (and its negative prompt, None
        when not given); they override the negative prompt argument."""
        return {"guidance_scale": guidance_scale}

    # -- one denoiser call (inspecting an image) -----------------------------------------------------------

    def text_conditioning(self, pipe, prompt: str, size: tuple[int, int], max_sequence_length: int | None = None
                          ) -> dict:
        """The denoiser's text inputs for one `prompt` and one image of `size` (H, W), without guidance, from the
        pipeline's own `encode_prompt`: the keyword arguments `denoise` passes on."""
        raise NotImplementedError(f"inspecting an image is not supported on {self.description} yet; use a UNet or "
                                  "SD3 model")

    def denoise(self, latents: torch.Tensor, timestep: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """One denoiser call on `latents` (B, C, h, w) at `timestep` (B,), as the pipeline's loop makes it."""
        raise NotImplementedError(f"inspecting an image is not supported on {self.description} yet")


def as_additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An attention mask as SDPA applies it, in additive form: a boolean mask keeps True (0) and drops False
    (-inf); a float mask is added to the scores as it is."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class PatchGrid:
    """For a transformer whose image tokens are the latent cut in `patch` x `patch` patches, row by row (SD3,
    Sana, Z-Image; FLUX.1's 2x2 packing is the same grid). Mix in before `Family`."""

    @property
    def patch(self) -> int:
        return int(self.model.config.patch_size)

    def token_grid(self, latent_hw, num_queries):
        p = self.patch
        h, w = latent_hw[0] // p, latent_hw[1] // p
        if h * w != num_queries:
            raise ValueError(f"cannot place {num_queries} image tokens on a {latent_hw[0]}x{latent_hw[1]} latent "
                             f"in patches of {p}x{p}")
        return h, w

    def layer_sizes(self, latent_hw=None, names=None):
        h, w = self.latent_hw(latent_hw)
        p = self.patch
        return {name: (h // p, w // p) for name in (self.layers() if names is None else names)}


def joint_steer(probs: torch.Tensor, steering: Steering, rec: slice, heads: int, image: slice, text: slice,
                store) -> torch.Tensor:
    """Steer joint-attention probabilities (B * heads, N, N) whose keys hold the generated image's tokens at
    `image` and the text tokens at `text` (SD3: [image; text]; Flux: [text; image (; reference images)]).

    Reweight scales the text columns for every query of the recorded images, image and text alike (rows not
    renormalised, as in prompt-to-prompt): exactly what scaling the text values does, so both modes agree. An
    edit takes the source's image->text probabilities into the edit's image rows; the rest of each of those
    rows (the edit's own attention to non-text tokens) is scaled to fill 1 - the source's text share, so rows
    still sum to 1, the edit keeps its own layout of attention among image tokens, and identical prompts
    reproduce the plain image (the factor is then exactly 1). The text queries' rows are not injected.
    """
    if steering.token_weights is not None:
        probs = probs.clone()
        probs[:, :, text] = steering.reweight(probs[:, :, text], rec, heads)
    if steering.injecting(store):
        image_text = probs[:, image, text]
        steered = steering.inject(image_text, rec, heads, store)
        edit_rows = slice((rec.start + 1) * heads, (rec.start + 2) * heads)
        own = image_text[edit_rows].sum(-1, keepdim=True)
        taken = steered[edit_rows].sum(-1, keepdim=True)
        probs = probs.clone()
        probs[edit_rows, image] *= (1 - taken) / (1 - own).clamp_min(torch.finfo(probs.dtype).tiny)
        probs[:, image, text] = steered  # (the edit rows' text columns scaled just above are replaced)
    return probs


def weights_kwarg(steering: Steering | None) -> dict:
    """`record_attention`'s `token_weights` for an exact-mode reweight (none without weights)."""
    if steering is None or steering.token_weights is None:
        return {}
    return {"token_weights": steering.token_weights}


def additive_mask(mask: torch.Tensor | None, rec: slice, queries: slice, num_keys: int,
                  dtype: torch.dtype) -> torch.Tensor | None:
    """An SDPA `attn_mask` (boolean, True = attend, or additive; broadcastable to (B, heads, Nq, Nk); a (B, Nk)
    mask is Diffusers' per-key padding mask) as an additive mask for the recorded images' `queries` rows:
    (n, 1 or heads, 1 or len(queries), Nk), what `text_attention` adds to the scores."""
    if mask is None:
        return None
    if mask.ndim == 2 and mask.shape[-1] == num_keys and mask.shape[0] > 1:
        mask = mask[:, None, None, :]  # (B, Nk): as Diffusers' native backend reads it
    while mask.ndim < 4:
        mask = mask[None]
    if mask.shape[0] > 1:
        mask = mask[rec]
    if mask.shape[-2] > 1:
        mask = mask[..., queries, :]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype).expand(rec.stop - rec.start, *mask.shape[1:])


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
