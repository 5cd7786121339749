"""Loading a saved result: `load_result` reads a folder written by `GenerationResult.save`, checked as a whole.

Nothing is used before it is checked: meta.json's field types, the SHA-256 of attention.safetensors and the
images (files of two runs are refused), the tensor keys `MapStore.state_dict` writes, and that the maps fit the
prompts' tokens and the image's size. Every refusal is one `ValueError` line naming what is wrong. (Writing is
`GenerationResult.save`, in result.py; a zip of the folder is `bundles.py`'s.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .maps import MapStore, key_resolution
from .names import image_name
from .result import FORMAT_VERSION, GenerationResult, _sha256
from .tokens import PromptTokens, Word

MAX_IMAGES = 64  # images a saved result may hold (`generate`'s num_images_per_prompt limit)
MAX_IMAGE_SIDE = 8192  # pixels a side (`generate`'s size limit)


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
