"""The processor registry: `default`, `capture`, `reweight` and `edit`, each installable on all cross-attention
layers or a subset, from Python, the CLI and the UI.

- default: Diffusers' own processors, untouched (the baseline; records nothing).
- capture: records maps (`exact` or `explicit` mode, see `processors.py`).
- reweight: scales the attention given to chosen words, prompt-to-prompt's re-weighting: the probabilities'
  columns of those words' tokens are multiplied by the weight (not renormalised) before they weight the values.
  In "exact" mode (the default) this runs through the values, sum_j p_j w_j v_j = SDPA(Q, K, w * V), so it
  costs what capture costs and all weights 1.0 reproduce `capture`'s exact images bit for bit; "explicit" mode
  spells out (p * w) @ V. Weight 0 removes a word's column.
- edit: prompt-to-prompt editing. The source prompt and the edited prompt are generated together from the
  same noise; for the first `inject` fraction of the steps the edit's image->text probabilities are replaced
  by the source's (word swap when both prompts have as many tokens, refinement by token alignment otherwise:
  words only in the edit keep their own attention). In joint attention the edit's image->image probabilities
  are scaled to fill the rest of each row (see `families.sd3.joint_steer`). The call returns two images,
  [source, edit], each with its own prompt's words and maps. Identical prompts reproduce the plain image
  (explicit mode: edit always runs the explicit math).

Every steering processor records the probabilities it actually used, so maps show where words landed after
steering. Per-call state (weights, token mapping) lives in the processor objects made for that call.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from .families import Steering, family_of
from .maps import DEFAULT_MAX_STEP_BYTES, MapStore
from .processors import (MODES, CaptureProcessor, capture, concept_maps, cross_attention_layers, guidance_probe,
                         install)
from .tokens import PromptTokens

PROCESSORS = ("default", "capture", "reweight", "edit")


def parse_weights(text: str) -> tuple[tuple[str, float], ...]:
    """Parse "circle:2.0, red:0.5" into (("circle", 2.0), ("red", 0.5))."""
    out = []
    for item in filter(None, (p.strip() for p in re.split(r"[,;]", text or ""))):
        word, sep, value = item.rpartition(":")
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if not sep or not word.strip() or weight is None:
            raise ValueError(f"bad weight {item!r}; write word:weight pairs such as 'circle:2.0, red:0.5'")
        if not -10 <= weight <= 10:
            raise ValueError(f"weight {weight} for {word.strip()!r} is out of range; use -10..10")
        out.append((word.strip(), weight))
    return tuple(out)


@dataclass(frozen=True)
class ProcessorSpec:
    """Which processor to use and its options.

    Args:
        name: "default", "capture", "reweight" or "edit".
        mode: "exact" or "explicit" (capture and reweight; edit always computes probs @ V explicitly).
        weights: reweight: (word, weight) pairs; parse a "word:weight, ..." string with `parse_weights`.
        edit_prompt: edit: the edited prompt.
        inject: edit: fraction of the denoising steps that take the source's cross-attention maps (0..1).
        layers: comma-separated selectors of the cross-attention layers the processor goes on: glob patterns of
            layer names ("up_blocks.*") or map resolutions ("16": longer side 16; "16x12"); other layers keep
            Diffusers' processor and record nothing.
    """

    name: str = "capture"
    mode: str = "exact"
    weights: tuple[tuple[str, float], ...] = ()
    edit_prompt: str | None = None
    inject: float = 0.8
    layers: str = "*"

    def __post_init__(self):
        if self.name not in PROCESSORS:
            raise ValueError(f"unknown processor {self.name!r}; use one of {', '.join(PROCESSORS)}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; use one of {', '.join(MODES)}")
        if self.name == "edit" and self.mode != "explicit":
            object.__setattr__(self, "mode", "explicit")  # edit replaces the probabilities: explicit math
        if self.name == "reweight" and not self.weights:
            raise ValueError("the reweight processor needs weights, e.g. 'circle:2.0, red:0.5'")
        if self.name == "edit":
            if not isinstance(self.edit_prompt, str) or not self.edit_prompt.strip():
                raise ValueError("the edit processor needs an edit prompt (the prompt with the words changed)")
            if not 0.0 <= float(self.inject) <= 1.0:
                raise ValueError(f"inject={self.inject} is out of range; use a fraction of the steps in 0..1")

    def to_dict(self) -> dict:
        """The spec as JSON keeps it (weights as lists), so a saved result's settings load back equal."""
        return {**asdict(self), "weights": [list(w) for w in self.weights]}

    @classmethod
    def from_dict(cls, data: dict) -> "ProcessorSpec":
        data = dict(data)
        data["weights"] = tuple(tuple(w) for w in data.get("weights", ()))
        return cls(**data)

    @property
    def layer_patterns(self) -> list[str]:
        return [p.strip() for p in self.layers.split(",") if p.strip()] or ["*"]

    # How a processor reshapes the pipeline call: edit runs [source, edit] as one batch and returns both.

    def batch_prompts(self, prompts: list[str], negative: str | list[str] | None):
        """The (prompt, negative_prompt) the pipeline is called with."""
        if self.name != "edit":  # Diffusers wants both as lists or both as strings; prompts is a list
            return prompts, [negative] * len(prompts) if isinstance(negative, str) else negative
        if isinstance(negative, list):
            negative = negative[0]
        return [prompts[0], self.edit_prompt], None if negative is None else [negative, negative]

    def result_prompts(self, prompts: list[str]) -> list[str]:
        """The prompt of each image the call returns (edit: the source's, then the edited prompt's)."""
        return [prompts[0], self.edit_prompt] if self.name == "edit" else prompts


class ReweightProcessor(CaptureProcessor):
    """A UNet layer's processor that scales chosen tokens' attention columns in the conditional images."""

    def __init__(self, store: MapStore, layer: str, token_weights: torch.Tensor, mode: str = "explicit"):
        super().__init__(store, layer, mode, Steering(token_weights=token_weights))  # (images, T); 1.0: untouched


class EditProcessor(CaptureProcessor):
    """A UNet layer's processor that injects the source image's cross-attention into the edited image for the
    first `inject_calls` steps (`token_map`: edit token j takes source column token_map[j], or its own if -1)."""

    def __init__(self, store: MapStore, layer: str, token_map: torch.Tensor, inject_calls: int):
        super().__init__(store, layer, "explicit", Steering(token_map=token_map, inject_calls=inject_calls))


def token_weights(alignment: PromptTokens, weights: Sequence[tuple[str, float]]) -> torch.Tensor:
    """A (T,) vector of 1.0 with each named word's tokens set to its weight (unknown words raise ValueError)."""
    w = torch.ones(len(alignment.tokens))
    for word, weight in weights:
        w[alignment.indices_of(word)] = float(weight)
    return w


def edit_token_map(source: PromptTokens, edit: PromptTokens) -> torch.Tensor:
    """For each edit token, the source token whose attention it takes (-1: keep its own).

    Equal token counts: a word swap, position to position. Otherwise a refinement: tokens are aligned by
    content (difflib), start/end/padding map to their counterparts, and tokens only in the edit keep their own.
    """
    n = len(edit.tokens)
    if len(source.tokens) != n:
        raise ValueError("source and edit prompts must be tokenized to the same length")
    src_content = [i for w in source.words for i in w.token_indices]
    edit_content = [i for w in edit.words for i in w.token_indices]
    if len(src_content) == len(edit_content):
        return torch.arange(n)
    mapping = torch.full((n,), -1, dtype=torch.long)
    matcher = difflib.SequenceMatcher(a=[source.tokens[i] for i in src_content],
                                      b=[edit.tokens[i] for i in edit_content], autojunk=False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            mapping[edit_content[block.b + k]] = src_content[block.a + k]
    for kind in ("start", "end", "pad"):
        s_idx, e_idx = source.special_indices.get(kind, ()), edit.special_indices.get(kind, ())
        for k, j in enumerate(e_idx):
            if s_idx:
                mapping[j] = s_idx[min(k, len(s_idx) - 1)]
    return mapping


@contextmanager
def use_processor(pipe, spec: ProcessorSpec, *, prompts: list[str], steps: int, per_step: bool = False,
                  keep_heads: bool = False, max_step_bytes: int = DEFAULT_MAX_STEP_BYTES, layers="*",
                  num_images_per_prompt: int = 1, latent_size=None,
                  alignment: Callable[[str], PromptTokens] | None = None, concepts: Sequence[str] | None = None,
                  concept_kind: str | None = None, concept_template: str | None = None) -> Iterator[MapStore]:
    """Install `spec`'s processor on `pipe` for one call; yields the call's `MapStore`.

    `latent_size` ((h, w) of the call's latents) resolves resolution selectors in the layers ("16", "16x12");
    `alignment(prompt)` gives a prompt's word positions in the text sequence (default: the family's);
    `concepts` are mapped beside the prompt's words (see `capture`)."""
    patterns = spec.layer_patterns if spec.layers != "*" else ([layers] if isinstance(layers, str) else list(layers))
    if spec.name == "default":
        if concepts:
            raise ValueError("the default processor records no maps, so it cannot map concepts; use capture (or "
                             "leave concepts out)")
        yield MapStore()
        return
    if spec.name == "capture":
        with capture(pipe, spec.mode, patterns, per_step=per_step, keep_heads=keep_heads,
                     max_step_bytes=max_step_bytes, latent_size=latent_size, concepts=concepts,
                     concept_kind=concept_kind, concept_template=concept_template) as store:
            yield store
        return
    family = family_of(pipe)
    align = alignment or (lambda p: family.text_positions(pipe, p))
    store = MapStore(per_step=per_step, keep_heads=keep_heads, max_step_bytes=max_step_bytes,
                     cfg=guidance_probe(pipe))
    if spec.name == "reweight":
        per_image = [token_weights(align(p), spec.weights) for p in prompts for _ in range(num_images_per_prompt)]
        steering = Steering(token_weights=torch.stack(per_image))
    else:
        if len(prompts) != 1 or num_images_per_prompt != 1:
            raise ValueError("the edit processor takes one source prompt and makes one image; got "
                             f"{len(prompts)} prompt(s) x {num_images_per_prompt} image(s)")
        mapping = edit_token_map(align(prompts[0]), align(spec.edit_prompt))
        steering = Steering(token_map=mapping, inject_calls=round(float(spec.inject) * steps))
    factory = lambda s, layer, original: family.processor(s, layer, spec.mode, original, steering)  # noqa: E731
    with concept_maps(pipe, family, store, concepts, concept_kind, concept_template), \
            install(family, store, factory, patterns, latent_size):
        yield store


__all__ = ["PROCESSORS", "ProcessorSpec", "parse_weights", "use_processor", "cross_attention_layers"]
