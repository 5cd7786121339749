"""`GenerationResult`: images, the prompt's words, the recorded maps, and the settings that made them.

A result saves to a folder (`bundle_load.load_result` reads it back, checked, with nothing lost):

    image.png              first image, generation parameters in its PNG text chunk ("parameters")
    image-<i>.png          further images, if any
    maps.npz               one float32 (H, W) heat map per word of the first image (per image: "<i>/<word>")
    meta.json              prompt(s), words, dropped words, settings, model, versions, token alignment, and the
                           SHA-256 of attention.safetensors and the images (a bundle mixing two runs is refused)
    attention.safetensors  the raw map store (running sums per layer, per-step maps if kept)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .aggregate import normalize, token_maps
from .maps import MapStore
from .names import image_name
from .tokens import PromptTokens

FORMAT_VERSION = 1


def _steps_arg(steps) -> list[int] | None:
    """Accept None, a range, a slice, or a list of step indices."""
    if steps is None:
        return None
    if isinstance(steps, slice):
        raise ValueError("pass steps as range(start, stop) or a list of step indices, not a slice")
    return [int(s) for s in steps]


@dataclass
class GenerationResult:
    """What `generate` returns.

    Attributes:
        images: list of PIL images.
        alignments: one `PromptTokens` per image (its prompt's words and tokens).
        store: the `MapStore` with the recorded cross-attention maps.
        settings: every setting of the call (seed, steps, guidance, size, scheduler, processor, model, ...).
    """

    images: list
    alignments: list[PromptTokens]
    store: MapStore
    settings: dict = field(default_factory=dict)

    @property
    def words(self) -> list[str]:
        """The first prompt's words, in order (start/end tokens are not words)."""
        return self.alignments[0].word_texts

    @property
    def dropped_words(self) -> list[str]:
        """Words of the first prompt cut off by the tokenizer's length limit."""
        return list(self.alignments[0].dropped_words)

    @property
    def concepts(self) -> list[str]:
        """The concepts mapped beside the prompt's words (`generate(..., concepts=...)`), in the order given."""
        return [] if self.store.concepts is None else list(self.store.concepts.names)

    @property
    def concept_kinds(self) -> list[str]:
        """The concept map kinds recorded, the default first ([] without concepts)."""
        c = self.store.concepts
        return [] if c is None else [c.default_kind] + [k for k in c.kinds if k != c.default_kind]

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the images."""
        return self.images[0].height, self.images[0].width

    def heatmap(self, word: str, *, image_index: int = 0, steps=None, resolutions=None, layers=None,
                occurrence: int | None = None, head: int | None = None, normalize_by: str = "minmax",
                kind: str | None = None) -> np.ndarray:
        """Where `word` drew attention: a float32 (H, W) map of the image, values in [0, 1].

        Args:
            word (`str`): a word of the prompt (case-insensitive), "<start>" / "<end>", or a concept (a prompt
                word comes first when a concept is also a prompt word; `kind` picks the concept).
            image_index (`int`): which image (for prompt lists or several images per prompt).
            steps (range or list of `int`, *optional*): denoising steps to average (needs `per_step=True`).
            resolutions (list, *optional*): map sizes to use; an int matches a layer whose longer side is it,
                a (h, w) pair matches exactly.
            layers (`str` or list, *optional*): glob patterns over layer names, e.g. "up_blocks.*"; "*" is every
                layer. With neither `layers` nor `resolutions`, the model's default view (`default_layers`).
            occurrence (`int`, *optional*): for a word used several times, pick one (0-based); default sums all.
            head (`int`, *optional*): one attention head (needs `keep_heads=True`); default: mean of heads, or
                in the model's default view (no layers, resolutions or steps given) its head (`default_head`).
            normalize_by (`str`): "minmax" (default), "max", or "none" (raw summed probabilities).
            kind (`str`, *optional*): a concept map kind (`concept_kinds`); given, `word` is read as a concept.
                Default: the result's default kind for a concept.

        Raises:
            ValueError: the word is neither in the prompt nor a concept (the message lists both), or a filter
                selects nothing.
        """
        return self._heatmaps([word], image_index=image_index, steps=steps, resolutions=resolutions,
                              layers=layers, occurrence=occurrence, head=head, normalize_by=normalize_by,
                              kind=kind)[0]

    def concept_maps(self, image_index: int = 0, kind: str | None = None, **filters) -> dict[str, np.ndarray]:
        """Every concept's heat map for one image (`heatmap(concept, kind=kind, ...)` for each), in one pass."""
        if not self.concepts:
            return {}
        return dict(zip(self.concepts, self._heatmaps(self.concepts, image_index=image_index,
                                                      kind=self.store.concepts.kind(kind), **filters)))

    def default_resolutions(self) -> list[tuple[int, int]] | None:
        """The map sizes a heat map uses when no layer or resolution is asked for: None (every layer) unless
        the model's preset says `map_layers: finest`, then the largest recorded map size only (16x16 for the
        embedded model at 64 x 64, 32x32 at 128 x 128)."""
        sizes = self.store.resolutions()  # [] if nothing was recorded
        if self.settings.get("map_layers", "all") != "finest" or not sizes:
            return None
        return sizes[:1]

    def default_layers(self) -> list[str] | None:
        """The layers a heat map uses when no layer or resolution is asked for (None: every layer): the model's
        preset says `map_layers`: "all", "finest" (the layers of `default_resolutions`) or "last" (the last
        recorded layer in forward order: tiny-mmdit's last joint block)."""
        view = self.settings.get("map_layers", "all")
        if view == "last" and self.store.layers:
            return self.store.layers[-1:]
        sizes = self.default_resolutions()
        return None if sizes is None else self.store.select_layers(resolutions=sizes)

    def default_head(self) -> int | None:
        """The head the default view shows (the preset's `map_head`; tiny-mmdit: 2), or None for the mean."""
        head = self.settings.get("map_head")
        return None if head is None else int(head)

    def word_maps(self, image_index: int = 0, **filters) -> dict[str, np.ndarray]:
        """Every distinct word's heat map for one image (repeated words sum their occurrences).

        Takes `heatmap`'s filters; the maps equal `heatmap(word, ...)` and are computed in one pass.
        """
        if not 0 <= image_index < len(self.images):
            raise ValueError(f"image_index={image_index} is out of range; there are {len(self.images)} image(s)")
        words = {}
        for w in self.alignments[image_index].word_texts:
            words.setdefault(w.lower(), w)
        maps = self._heatmaps(list(words.values()), image_index=image_index, **filters) if words else []
        return dict(zip(words, maps))

    def _heatmaps(self, words: list[str], *, image_index: int = 0, steps=None, resolutions=None, layers=None,
                  occurrence: int | None = None, head: int | None = None, normalize_by: str = "minmax",
                  kind: str | None = None) -> list[np.ndarray]:
        if not 0 <= image_index < len(self.images):
            raise ValueError(f"image_index={image_index} is out of range; there are {len(self.images)} image(s)")
        alignment = self.alignments[image_index]
        concepts = self.store.concepts
        if kind is not None and concepts is None:
            raise ValueError(f"kind={kind!r} reads a concept map, but this result has no concepts (generate with "
                             "concepts=[...])")
        kind = None if kind is None else concepts.kind(kind)
        where: list[tuple[str, list[int]]] = []  # (store: "prompt" or a concept kind, token indices) per word
        for word in words:
            if kind is None:
                try:
                    where.append(("prompt", alignment.indices_of(word, occurrence)))
                    continue
                except ValueError as err:
                    if concepts is None or not concepts.has(word):
                        if concepts is not None:
                            names = ", ".join(map(repr, concepts.names))
                            raise ValueError(f"{err}; the concepts are: {names}") from None
                        raise
            where.append((kind or concepts.default_kind, concepts.indices_of(word)))
        given_head = head  # the model's default head is a view of the prompt's maps, not of the concepts'
        if layers is None and resolutions is None:
            layers = self.default_layers()
            if head is None and steps is None:  # per-step maps are head-averaged: a step range takes the mean
                head = self.default_head()
        box = self.map_box()
        size = self.size if box is None else box[2:]
        out: list[np.ndarray | None] = [None] * len(words)
        for source in dict.fromkeys(src for src, _ in where):
            store = self.store if source == "prompt" else concepts.stores[source]
            picked = [i for i, (src, _) in enumerate(where) if src == source]
            maps = token_maps(store, [where[i][1] for i in picked], size, image_index=image_index,
                              layers=layers, resolutions=resolutions, steps=_steps_arg(steps),
                              head=head if source == "prompt" else given_head)
            for i, m in zip(picked, maps):
                out[i] = normalize(m, normalize_by).numpy().astype(np.float32)
        if box is not None and tuple(size) != self.size:  # an image the model saw cropped: no map outside the crop
            top, left, h, w = box
            for i, m in enumerate(out):
                canvas = np.zeros(self.size, dtype=np.float32)
                canvas[top:top + h, left:left + w] = m
                out[i] = canvas
        return out

    def map_box(self) -> tuple[int, int, int, int] | None:
        """Where the maps lie on the image, (top, left, height, width): the region of an inspected image that
        the model saw (`inspect_image(..., fit="crop")` sees a centred crop; "resize" the whole image); None for a
        generated image (the maps cover it)."""
        box = (self.settings.get("inspect") or {}).get("box")
        return None if box is None else tuple(int(v) for v in box)

    # -- persistence -----------------------------------------------------------------------------------------

    def meta(self) -> dict:
        from . import __version__
        import diffusers
        import transformers

        return {
            "format": FORMAT_VERSION,
            "prompts": [a.prompt for a in self.alignments],
            "words": self.words,
            "dropped_words": self.dropped_words,
            "settings": self.settings,
            "model": self.settings.get("model"),
            "alignments": [_alignment_to_dict(a) for a in self.alignments],
            "concepts": None if self.store.concepts is None else self.store.concepts.meta(),
            "store": {"per_step": self.store.per_step, "keep_heads": self.store.keep_heads,
                      "max_step_bytes": self.store.max_step_bytes, "steps_dropped": self.store.steps_dropped,
                      "step_bytes": self.store.step_bytes, "per_step_by": self.store.per_step_by,
                      "per_step_dtype": str(self.store.per_step_dtype).removeprefix("torch."),
                      "latent_hw": None if self.store.latent_hw is None else list(self.store.latent_hw),
                      "layer_shapes": {l: list(self.store.layer_shape(l)) for l in self.store.layers}},
            "versions": {"crossattn_sd": __version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__, "torch": torch.__version__},
        }

    def save(self, folder: str | Path, *, word_maps: bool = True) -> Path:
        """Write the result to `folder` (created if needed); `load_result(folder)` reads it back.

        meta.json is written last and holds the SHA-256 of the other files, so a bundle mixing files of two runs
        is refused on load."""
        from PIL.PngImagePlugin import PngInfo
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = self.meta()
        for i, image in enumerate(self.images):
            info = PngInfo()
            info.add_text("parameters", parameters_text(self.settings, self.alignments[i].prompt))
            info.add_text("crossattn_sd", json.dumps({"settings": self.settings, "image_index": i}, default=str))
            image.save(folder / image_name(i), pnginfo=info)
        if word_maps:
            arrays = {}
            for i in range(len(self.images)):
                if not self.store.sums:
                    break
                for word, m in self.word_maps(i).items():
                    arrays[word if i == 0 else f"{i}/{word}"] = m
                for concept, m in self.concept_maps(i).items():  # the default kind
                    arrays[f"concept/{concept}" if i == 0 else f"{i}/concept/{concept}"] = m
            np.savez_compressed(folder / "maps.npz", **arrays)
        tensors = self.store.state_dict()
        if self.store.concepts is not None:
            tensors.update(self.store.concepts.state_dict())
        save_file(tensors, str(folder / "attention.safetensors"))
        meta["sha256"] = {name: _sha256(folder / name)
                          for name in ("attention.safetensors", *map(image_name, range(len(self.images))))}
        (folder / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        return folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parameters_text(settings: dict, prompt: str) -> str:
    """A one-look summary of the settings for the PNG text chunk, in the common "parameters" style."""
    neg = settings.get("negative_prompt")
    lines = [prompt]
    if neg:
        lines.append(f"Negative prompt: {neg if isinstance(neg, str) else neg}")
    lines.append(", ".join(f"{k}: {settings.get(k)}" for k in (
        "steps", "scheduler", "guidance_scale", "seed", "height", "width", "mode", "model")))
    return "\n".join(lines)


def _alignment_to_dict(a: PromptTokens) -> dict:
    return {"prompt": a.prompt, "tokens": list(a.tokens), "dropped_words": list(a.dropped_words),
            "special_indices": {k: list(v) for k, v in a.special_indices.items()},
            "words": [{"text": w.text, "token_indices": list(w.token_indices), "start": w.start, "end": w.end}
                      for w in a.words]}
