"""The questions the core asks a model family, and the pieces every family's processors share.

A `Family` is bound to one denoiser (a UNet or a transformer) and answers, for the core:

- `layers()`: the text-conditioned attention layers, by name (keys of `attn_processors` minus ".processor"),
  in forward order;
- `token_grid(latent_hw, num_queries)`: where a layer's image tokens sit on the (h, w) grid for a latent;
  `layer_sizes(latent_hw)`: that grid for every layer;
- `step_input(args, kwargs)`: where a step begins: the latent size and timestep of a denoiser call (read by a
  forward pre-hook on the denoiser);
- `processor(store, layer, mode, original, steering)`: the processor that records (and steers) one layer;
- `text_positions(pipe, prompt, ...)`: which tokenizer owns which text positions, as a `PromptTokens`;
- `native_latent_size()`, `pipeline_kwargs(...)`: what `generate` needs to call the pipeline.

`processors.py`, `maps.py` and `pipeline.py` ask these questions and name no architecture.
"""

from __future__ import annotations

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
    """

    token_weights: torch.Tensor | None = None
    token_map: torch.Tensor | None = None
    inject_calls: int = 0

    def injecting(self, store) -> bool:
        return self.token_map is not None and store.num_steps - 1 < self.inject_calls

    def needs_probs(self, store) -> bool:
        """Whether this call needs the probabilities themselves (explicit math); reweight alone does not."""
        return self.injecting(store)

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


class Family:
    """One model family's answers (see the module docstring). Subclasses set `name`, `denoiser_attr` and
    `model_classes` and implement the methods that raise NotImplementedError."""

    name = "?"
    description = ""
    denoiser_attr = ""  # the pipeline attribute holding the denoiser ("unet", "transformer")
    model_classes: tuple[str, ...] = ()  # Diffusers class names of the denoisers this family handles
    layer_kind = "text-attention"  # how errors name its layers
    latent_hint: tuple[int, int] | None = None  # the latent size `install` was given (or the native one)

    def __init__(self, model):
        self.model = model

    @classmethod
    def handles(cls, model) -> bool:
        import diffusers

        return any(isinstance(model, getattr(diffusers, c)) for c in cls.model_classes if hasattr(diffusers, c))

    # -- layers and grids ---------------------------------------------------------------------------------

    def is_text_layer(self, name: str, module) -> bool:
        raise NotImplementedError

    def layers(self, processors: dict | None = None) -> list[str]:
        """The text-conditioned attention layers, in forward order (`attn_processors` order)."""
        processors = self.model.attn_processors if processors is None else processors
        names = [key.removesuffix(".processor") for key in processors]
        return [n for n in names if self.is_text_layer(n, self.model.get_submodule(n))]

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

    def processor(self, store, layer: str, mode: str = "exact", original=None, steering: Steering | None = None):
        raise NotImplementedError

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


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
