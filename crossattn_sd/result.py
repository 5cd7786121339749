"""`GenerationResult`: images, the prompt's words, the recorded maps, and the settings that made them.

A result saves to a folder (and loads back with nothing lost):

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
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .aggregate import normalize, token_maps
from .maps import MapStore, key_resolution
from .names import image_name
from .tokens import PromptTokens, Word

FORMAT_VERSION = 1
MAX_IMAGES = 64  # images a saved result may hold (`generate`'s num_images_per_prompt limit)
MAX_IMAGE_SIDE = 8192  # pixels a side (`generate`'s size limit)


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


def _alignment_from_dict(d: dict) -> PromptTokens:
    return PromptTokens(
        prompt=d["prompt"], tokens=tuple(d["tokens"]), dropped_words=tuple(d["dropped_words"]),
        words=tuple(Word(w["text"], tuple(w["token_indices"]), w["start"], w["end"]) for w in d["words"]),
        special_indices={k: tuple(v) for k, v in d["special_indices"].items()},
    )


class _Bad(ValueError):
    """One thing wrong with a saved result (load_result adds which result)."""


def _expect(value, kind, what: str):
    """`value` if it has JSON type `kind` (bool is not an int here), else `_Bad` naming `what`."""
    names = {dict: "an object", list: "a list", str: "text", int: "a whole number", bool: "true or false"}
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise _Bad(f"{what} is {json.dumps(value, default=str)[:40]}; expected {names[kind]}")
    return value


def _check_meta(meta) -> None:
    """Refuse a meta.json whose fields have the wrong types, before anything reads them."""
    _expect(meta, dict, "meta.json")
    if meta.get("format") != FORMAT_VERSION:
        raise _Bad(f"unsupported format {meta.get('format')!r}; this version reads format {FORMAT_VERSION}")
    _expect(meta.get("settings"), dict, "settings")
    store = _expect(meta.get("store"), dict, "store")
    for key, kind in (("per_step", bool), ("keep_heads", bool), ("steps_dropped", bool), ("max_step_bytes", int)):
        _expect(store.get(key), kind, f"store.{key}")
    alignments = _expect(meta.get("alignments"), list, "alignments")
    if not 1 <= len(alignments) <= MAX_IMAGES:
        raise _Bad(f"alignments has {len(alignments)} entries; expected 1..{MAX_IMAGES} (one per image)")
    for i, a in enumerate(alignments):
        where = f"alignments[{i}]"
        _expect(a, dict, where)
        _expect(a.get("prompt"), str, f"{where}.prompt")
        for key in ("tokens", "dropped_words"):
            for j, t in enumerate(_expect(a.get(key), list, f"{where}.{key}")):
                _expect(t, str, f"{where}.{key}[{j}]")
        for name, indices in _expect(a.get("special_indices"), dict, f"{where}.special_indices").items():
            for j, t in enumerate(_expect(indices, list, f"{where}.special_indices.{name}")):
                _expect(t, int, f"{where}.special_indices.{name}[{j}]")
        for j, w in enumerate(_expect(a.get("words"), list, f"{where}.words")):
            _expect(w, dict, f"{where}.words[{j}]")
            _expect(w.get("text"), str, f"{where}.words[{j}].text")
            for key in ("start", "end"):
                _expect(w.get(key), int, f"{where}.words[{j}].{key}")
            for k, t in enumerate(_expect(w.get("token_indices"), list, f"{where}.words[{j}].token_indices")):
                _expect(t, int, f"{where}.words[{j}].token_indices[{k}]")
    concepts = meta.get("concepts")
    if concepts is not None:  # absent in bundles saved before concept maps
        _expect(concepts, dict, "concepts")
        names = _expect(concepts.get("names"), list, "concepts.names")
        groups = _expect(concepts.get("token_groups"), list, "concepts.token_groups")
        kinds = _expect(concepts.get("kinds"), list, "concepts.kinds")
        for j, n in enumerate(names):
            _expect(n, str, f"concepts.names[{j}]")
        for j, k in enumerate(kinds):
            if not isinstance(k, str) or not re.fullmatch(r"[a-z][a-z-]*", k):
                raise _Bad(f"concepts.kinds[{j}] is {json.dumps(k, default=str)[:40]}; expected a kind's name")
        for j, g in enumerate(groups):
            for k, t in enumerate(_expect(g, list, f"concepts.token_groups[{j}]")):
                _expect(t, int, f"concepts.token_groups[{j}][{k}]")
        if concepts.get("template") is not None:
            _expect(concepts["template"], str, "concepts.template")
        if not names or len(groups) != len(names) or not kinds or concepts.get("default_kind") not in kinds:
            raise _Bad("concepts has no names, a token group per name, kinds and a default kind among them")
    sha = meta.get("sha256")
    if sha is not None:  # absent in bundles saved before checksums were written
        for name, digest in _expect(sha, dict, "sha256").items():
            _expect(digest, str, f"sha256.{name}")


def _split_concepts(tensors: dict, meta: dict) -> tuple[dict, dict]:
    """(the call's store's tensors, the concept stores' "concept/<kind>/..." tensors), each kind checked."""
    concepts = meta.get("concepts")
    kinds = set(concepts["kinds"]) if concepts else set()
    own = {k: v for k, v in tensors.items() if not k.startswith("concept/")}
    theirs = {k: v for k, v in tensors.items() if k.startswith("concept/")}
    for kind in kinds:
        prefix = f"concept/{kind}/"
        _check_tensors({k[len(prefix):]: v for k, v in theirs.items() if k.startswith(prefix)})
    stray = [k for k in theirs if k.split("/")[1] not in kinds]
    if stray:
        raise _Bad(f"attention.safetensors has concept maps {stray[0][:60]!r} that meta.json does not list")
    return own, theirs


def _check_tensors(tensors: dict) -> None:
    """Refuse keys `MapStore.state_dict` does not write (and per-step indices past the recorded steps)."""
    timesteps = tensors.get("timesteps")
    if timesteps is None or timesteps.ndim != 1:
        raise _Bad("attention.safetensors has no 1-D 'timesteps' tensor")
    for key, value in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "step":
            index, _, layer = rest.partition("/")
            if not (index.isdigit() and int(index) < len(timesteps) and layer):
                raise _Bad(f"attention.safetensors has per-step key {key[:60]!r} past its {len(timesteps)} steps")
            if not value.is_floating_point():
                raise _Bad(f"attention.safetensors' {key[:60]!r} is not a float tensor")
        elif kind in ("count", "order"):  # order: the layers' recording order (safetensors sorts keys)
            if value.numel() != 1:
                raise _Bad(f"attention.safetensors' {key[:60]!r} is not one number")
        elif kind == "step_columns":  # the token columns per-step maps keep (MapStore.step_columns)
            if value.ndim != 1 or value.is_floating_point() or rest:
                raise _Bad("attention.safetensors' 'step_columns' is not a 1-D list of token indices")
        elif kind not in ("sum", "heads", "timesteps") or (kind != "timesteps" and not rest):
            raise _Bad(f"attention.safetensors has an unknown tensor {key[:60]!r}")


def _check_store(store: MapStore, alignments: list[PromptTokens], size: tuple[int, int], meta: dict) -> None:
    """Refuse maps that do not belong to these prompts and this image: tensor ranks, one token axis that every
    token index fits, one image per alignment, and map sizes of the image's aspect (a map of h x w cells on an
    H x W image: H / h == W / w up to the UNet's rounding)."""
    if not store.sums:
        return  # the default processor records no maps
    shapes = {}
    for layer, s in store.sums.items():
        if s.ndim != 4:
            raise _Bad(f"the map of layer {layer!r} has shape {tuple(s.shape)}; expected (images, h, w, tokens)")
        shapes[layer] = tuple(s.shape)
        h = store.head_sums.get(layer)
        if h is not None and (h.ndim != 5 or (h.shape[0], *h.shape[2:]) != s.shape):
            raise _Bad(f"the per-head map of layer {layer!r} has shape {tuple(h.shape)}; expected "
                       f"({s.shape[0]}, heads, {', '.join(map(str, s.shape[1:]))})")
        if store.counts.get(layer, 0) < 1:
            raise _Bad(f"layer {layer!r} has no positive count of recorded calls")
    extra = [l for l in store.head_sums if l not in store.sums] + [l for st in store.steps for l in st
                                                                    if l not in store.sums and key_resolution(l) is None]
    if extra:
        raise _Bad(f"layer {extra[0]!r} has per-head or per-step maps but no summed map")
    images, tokens = {s[0] for s in shapes.values()}, {s[3] for s in shapes.values()}
    if images != {len(alignments)} or len(tokens) != 1:
        raise _Bad(f"the maps hold {sorted(images)} image(s) over {sorted(tokens)} tokens; expected "
                   f"{len(alignments)} image(s) and one token axis")
    (num_tokens,) = tokens
    _check_steps(store, shapes, num_tokens)
    for i, a in enumerate(alignments):
        used = [t for w in a.words for t in w.token_indices] + [t for v in a.special_indices.values() for t in v]
        bad = [t for t in used if not 0 <= t < num_tokens]
        if bad:
            raise _Bad(f"prompt {i}'s token index {bad[0]} is outside the maps' {num_tokens} tokens")
    recorded = {l: list(hw) for l, hw in _expect(meta["store"].get("layer_shapes", {}), dict,
                                                   "store.layer_shapes").items()}
    actual = {l: [s[1], s[2]] for l, s in shapes.items()}
    if recorded and recorded != actual:
        raise _Bad("meta.json's layer shapes differ from the maps' (the files come from different runs)")
    height, width = size
    settings = meta["settings"]
    inspected = settings.get("inspect")
    if inspected is not None:  # an inspected image: the maps fit the size the model saw, drawn over its box
        height, width = _check_inspected(inspected, size, settings)
    for layer, (_, h, w, _) in shapes.items():
        if not (0 < h <= height and 0 < w <= width and abs(height / h - width / w) <= max(height / h, width / w) / min(h, w)):
            raise _Bad(f"layer {layer!r}'s {h}x{w} maps do not fit the {width}x{height} image")
    if (settings.get("height"), settings.get("width")) not in ((None, None), (height, width)):
        raise _Bad(f"the image is {width}x{height} but settings say {settings.get('width')}x{settings.get('height')}")


def _check_inspected(inspected, size: tuple[int, int], settings: dict) -> tuple[int, int]:
    """An inspected image's record: its size is the image's, its box lies inside it; returns the size the model
    saw (settings' height and width), which the maps must fit."""
    _expect(inspected, dict, "settings.inspect")
    image_size = [_expect(v, int, "settings.inspect.image_size") for v in
                  _expect(inspected.get("image_size"), list, "settings.inspect.image_size")]
    if image_size != list(size):
        said = "x".join(map(str, image_size[::-1]))
        raise _Bad(f"the image is {size[1]}x{size[0]} but settings.inspect.image_size says {said}")
    box = [_expect(v, int, "settings.inspect.box") for v in _expect(inspected.get("box"), list, "settings.inspect.box")]
    if len(box) != 4 or box[0] < 0 or box[1] < 0 or box[2] < 1 or box[3] < 1 or box[0] + box[2] > size[0] \
            or box[1] + box[3] > size[1]:
        raise _Bad(f"settings.inspect.box {box} is not a region of the {size[1]}x{size[0]} image")
    return (_expect(settings.get("height"), int, "settings.height"), _expect(settings.get("width"), int, "settings.width"))


def _check_concept_stores(concepts, store: MapStore) -> None:
    """Refuse concept maps that do not go with the call's maps: the same layers, images and map sizes, and a
    token axis holding every concept's columns."""
    needed = max((t for g in concepts.token_groups for t in g), default=-1) + 1
    for kind, cs in concepts.stores.items():
        if list(cs.sums) != list(store.sums):
            raise _Bad(f"the {kind!r} concept maps cover other layers than the prompt's maps")
        for layer, m in cs.sums.items():
            if m.ndim != 4 or tuple(m.shape[:3]) != tuple(store.sums[layer].shape[:3]) or m.shape[3] < needed:
                raise _Bad(f"the {kind!r} concept map of layer {layer!r} has shape {tuple(m.shape)}; expected "
                           f"{tuple(store.sums[layer].shape[:3])} and at least {needed} concept tokens")
            if cs.counts.get(layer, 0) < 1:
                raise _Bad(f"the {kind!r} concept map of layer {layer!r} has no positive count")
            h = cs.head_sums.get(layer)
            if h is not None and (h.ndim != 5 or (h.shape[0], *h.shape[2:]) != m.shape):
                raise _Bad(f"the per-head {kind!r} concept map of layer {layer!r} has shape {tuple(h.shape)}")
        for i, step in enumerate(cs.steps):
            for layer, m in step.items():
                if layer not in cs.sums or m.shape != cs.sums[layer].shape:
                    raise _Bad(f"step {i}'s {kind!r} concept map of layer {layer!r} does not fit its summed map")
        if cs.steps and len(cs.steps) != len(store.steps):
            raise _Bad(f"the {kind!r} concept maps have {len(cs.steps)} steps; the prompt's have {len(store.steps)}")


def _check_steps(store: MapStore, shapes: dict[str, tuple], num_tokens: int) -> None:
    """Refuse per-step maps that do not fit the summed maps: each of a recorded layer (or, kept per resolution,
    of a recorded layer size), of its shape, over every token or over `step_columns` and the rest's sum."""
    columns = store.step_columns
    if columns is not None and (list(columns) != sorted(set(columns)) or not all(0 <= c < num_tokens for c in columns)):
        raise _Bad(f"step_columns are not distinct token indices in 0..{num_tokens - 1}")
    width = num_tokens if columns is None else len(columns) + 1
    sizes = {s[1:3] for s in shapes.values()}
    kinds = {key_resolution(k) is None for step in store.steps for k in step}
    if len(kinds) > 1:
        raise _Bad("the per-step maps mix per-layer and per-resolution keys")
    for i, step in enumerate(store.steps):
        for key, m in step.items():
            hw = key_resolution(key)
            if hw is not None and hw not in sizes:
                raise _Bad(f"step {i} has {hw[0]}x{hw[1]} maps, but no layer has that size")
            n, h, w = shapes[key][:3] if hw is None else (next(iter(shapes.values()))[0], *hw)
            if tuple(m.shape) != (n, h, w, width):
                raise _Bad(f"step {i}'s map {key!r} has shape {tuple(m.shape)}; expected {(n, h, w, width)}")


def load_result(folder: str | Path, *, name: str | None = None) -> GenerationResult:
    """Read a result written by `GenerationResult.save`, checked as a whole before any use.

    Args:
        folder (`str` or `Path`): the folder `save` wrote.
        name (`str`, *optional*): what error messages call it (default: the folder's name).

    Raises:
        ValueError: the folder is not a complete, consistent result (one line naming what is wrong).
    """
    from PIL import Image
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        _check_meta(meta)
        alignments = [_alignment_from_dict(d) for d in meta["alignments"]]
        for name_, digest in (meta.get("sha256") or {}).items():
            if name_ not in {"attention.safetensors", *map(image_name, range(len(alignments)))}:
                raise _Bad(f"sha256 names {name_!r}, which is not a file of a result")
            if _sha256(folder / name_) != digest:
                raise _Bad(f"{name_} is not the file meta.json describes (the files come from different runs)")
        store_meta = meta["store"]
        tensors = load_file(str(folder / "attention.safetensors"))
        tensors, concept_tensors = _split_concepts(tensors, meta)
        _check_tensors(tensors)
        settings = dict(per_step=store_meta["per_step"], keep_heads=store_meta["keep_heads"],
                        max_step_bytes=store_meta["max_step_bytes"])
        store = MapStore.from_state_dict(tensors, **settings)
        if meta.get("concepts"):
            from .concepts import Concepts

            store.concepts = Concepts.from_saved(meta["concepts"], concept_tensors, **settings)
            _check_concept_stores(store.concepts, store)
        store.steps_dropped = store_meta["steps_dropped"]
        store.step_bytes = int(store_meta.get("step_bytes", 0))  # (absent from bundles written before 0.1.0's end)
        latent_hw = store_meta.get("latent_hw")
        store.latent_hw = None if latent_hw is None else tuple(int(s) for s in latent_hw)
        images = []
        for i in range(len(alignments)):
            with Image.open(folder / image_name(i)) as im:
                if max(im.size) > MAX_IMAGE_SIDE:
                    raise _Bad(f"{image_name(i)} is {im.width}x{im.height}; the limit is {MAX_IMAGE_SIDE} a side")
                images.append(im.convert("RGB"))
        if len({im.size for im in images}) != 1:
            raise _Bad("the images differ in size")
        _check_store(store, alignments, (images[0].height, images[0].width), meta)
    except (OSError, KeyError, TypeError, json.JSONDecodeError, ValueError, SafetensorError) as err:
        why = str(err) if isinstance(err, _Bad) else f"{type(err).__name__}: {_without_paths(err)}"
        raise ValueError(f"{name or folder.name} is not a readable crossattn-sd result ({why}); expected meta.json, "
                         "attention.safetensors and image.png written by result.save()") from err
    return GenerationResult(images=images, alignments=alignments, store=store, settings=meta["settings"])


def _without_paths(err: Exception) -> str:
    """An error's message without file paths (an OSError names the server's folder; say only the file)."""
    if isinstance(err, OSError) and err.filename:
        return f"{err.strerror or 'cannot read'}: {Path(err.filename).name}"
    return str(err)
