"""`GenerationResult`: images, the prompt's words, the recorded maps, and the settings that made them.

A result saves to a folder (and loads back with nothing lost):

    image.png              first image, generation parameters in its PNG text chunk ("parameters")
    image-<i>.png          further images, if any
    maps.npz               one float32 (H, W) heat map per word of the first image (per image: "<i>/<word>")
    meta.json              prompt(s), words, dropped words, settings, model, versions, token alignment
    attention.safetensors  the raw map store (running sums per layer, per-step maps if kept)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .maps import MapStore, normalize, token_maps
from .tokens import PromptTokens, Word

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
    def size(self) -> tuple[int, int]:
        """(H, W) of the images."""
        return self.images[0].height, self.images[0].width

    def heatmap(self, word: str, *, image_index: int = 0, steps=None, resolutions=None, layers=None,
                occurrence: int | None = None, head: int | None = None, normalize_by: str = "minmax",
                ) -> np.ndarray:
        """Where `word` drew attention: a float32 (H, W) map of the image, values in [0, 1].

        Args:
            word (`str`): a word of the prompt (case-insensitive), or "<start>" / "<end>".
            image_index (`int`): which image (for prompt lists or several images per prompt).
            steps (range or list of `int`, *optional*): denoising steps to average (needs `per_step=True`).
            resolutions (list, *optional*): map sizes to use; an int matches a layer whose longer side is it,
                a (h, w) pair matches exactly.
            layers (`str` or list, *optional*): glob patterns over layer names, e.g. "up_blocks.*"; "*" is every
                layer. With neither `layers` nor `resolutions`, the model's default view (`default_resolutions`).
            occurrence (`int`, *optional*): for a word used several times, pick one (0-based); default sums all.
            head (`int`, *optional*): one attention head (needs `keep_heads=True`); default: mean of heads.
            normalize_by (`str`): "minmax" (default), "max", or "none" (raw summed probabilities).

        Raises:
            ValueError: the word is not in the prompt (the message lists the prompt's words), or a filter
                selects nothing.
        """
        return self._heatmaps([word], image_index=image_index, steps=steps, resolutions=resolutions,
                              layers=layers, occurrence=occurrence, head=head, normalize_by=normalize_by)[0]

    def default_resolutions(self) -> list[tuple[int, int]] | None:
        """The map sizes a heat map uses when no layer or resolution is asked for: None (every layer) unless
        the model's preset says `map_layers: finest`, then the largest recorded map size only (16x16 for the
        embedded model at 64 x 64, 32x32 at 128 x 128)."""
        sizes = self.store.resolutions()  # [] if nothing was recorded
        if self.settings.get("map_layers", "all") != "finest" or not sizes:
            return None
        return sizes[:1]

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
                  ) -> list[np.ndarray]:
        if not 0 <= image_index < len(self.images):
            raise ValueError(f"image_index={image_index} is out of range; there are {len(self.images)} image(s)")
        alignment = self.alignments[image_index]
        groups = [alignment.indices_of(word, occurrence) for word in words]
        if layers is None and resolutions is None:
            resolutions = self.default_resolutions()
        maps = token_maps(self.store, groups, self.size, image_index=image_index, layers=layers,
                          resolutions=resolutions, steps=_steps_arg(steps), head=head)
        return [normalize(m, normalize_by).numpy().astype(np.float32) for m in maps]

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
            "store": {"per_step": self.store.per_step, "keep_heads": self.store.keep_heads,
                      "max_step_bytes": self.store.max_step_bytes, "steps_dropped": self.store.steps_dropped,
                      "step_bytes": self.store.step_bytes,
                      "latent_hw": None if self.store.latent_hw is None else list(self.store.latent_hw),
                      "layer_shapes": {l: list(self.store.layer_shape(l)) for l in self.store.layers}},
            "versions": {"crossattn_sd": __version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__, "torch": torch.__version__},
        }

    def save(self, folder: str | Path, *, word_maps: bool = True) -> Path:
        """Write the result to `folder` (created if needed); `load_result(folder)` reads it back."""
        from PIL.PngImagePlugin import PngInfo
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = self.meta()
        for i, image in enumerate(self.images):
            info = PngInfo()
            info.add_text("parameters", parameters_text(self.settings, self.alignments[i].prompt))
            info.add_text("crossattn_sd", json.dumps({"settings": self.settings, "image_index": i}, default=str))
            image.save(folder / ("image.png" if i == 0 else f"image-{i}.png"), pnginfo=info)
        if word_maps:
            arrays = {}
            for i in range(len(self.images)):
                if not self.store.sums:
                    break
                for word, m in self.word_maps(i).items():
                    arrays[word if i == 0 else f"{i}/{word}"] = m
            np.savez_compressed(folder / "maps.npz", **arrays)
        (folder / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        save_file(self.store.state_dict(), str(folder / "attention.safetensors"))
        return folder


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


def _alignment_from_dict(d: dict) -> PromptTokens:
    return PromptTokens(
        prompt=d["prompt"], tokens=tuple(d["tokens"]), dropped_words=tuple(d["dropped_words"]),
        words=tuple(Word(w["text"], tuple(w["token_indices"]), w["start"], w["end"]) for w in d["words"]),
        special_indices={k: tuple(v) for k, v in d["special_indices"].items()},
    )


def load_result(folder: str | Path) -> GenerationResult:
    """Read a result written by `GenerationResult.save` (raises `ValueError` if the folder is not one)."""
    from PIL import Image
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported format {meta.get('format')!r}")
        alignments = [_alignment_from_dict(d) for d in meta["alignments"]]
        store_meta = meta["store"]
        store = MapStore.from_state_dict(
            load_file(str(folder / "attention.safetensors")),
            per_step=store_meta["per_step"], keep_heads=store_meta["keep_heads"],
            max_step_bytes=store_meta["max_step_bytes"])
        store.steps_dropped = store_meta["steps_dropped"]
        store.step_bytes = int(store_meta.get("step_bytes", 0))  # (absent from bundles written before 0.1.0's end)
        latent_hw = store_meta.get("latent_hw")
        store.latent_hw = None if latent_hw is None else tuple(int(s) for s in latent_hw)
        images = []
        for i in range(len(alignments)):
            with Image.open(folder / ("image.png" if i == 0 else f"image-{i}.png")) as im:
                images.append(im.convert("RGB"))
    except (OSError, KeyError, TypeError, json.JSONDecodeError, ValueError, SafetensorError) as err:
        raise ValueError(f"{str(folder)!r} is not a readable crossattn-sd result ({type(err).__name__}: {err}); "
                         "expected meta.json, attention.safetensors and image.png written by result.save()") from err
    return GenerationResult(images=images, alignments=alignments, store=store, settings=meta["settings"])
