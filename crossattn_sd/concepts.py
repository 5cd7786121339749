"""Concept maps: where the model puts a word that is not in the prompt, with the image left exactly as it is.

    >>> result = crossattn_sd.generate(pipe, "a red circle on the left", concepts=["triangle", "background"])
    >>> result.concepts                      # ['triangle', 'background']
    >>> result.heatmap("triangle")           # as for a prompt word; the result's default concept kind

Each concept is one word, encoded by the pipeline's own text encoder(s) in a short template (`DEFAULT_TEMPLATE`,
"a {}"): only the concept's own tokens are kept, not the start, end and padding tokens nor the template's words.
The family adapter decides how the image attends to them (`Family.concept_recorder`), always on the side: nothing
computed for a concept feeds the model's output, so the image is bit-identical to the same call without concepts.
Map kinds:

- UNet models (cross-attention): the image queries of every recorded layer against the concepts' keys
  (`to_k` of the concept states). "joint": the softmax over the prompt's tokens plus the concepts, as if the
  concepts had been appended to the prompt (the concept's share of each pixel's attention); "concepts-only": the
  softmax over the concepts alone (which concept each pixel prefers; needs two or more concepts to say anything).
- Joint-attention transformers (SD3): ConceptAttention's output-space maps ("output"; Helbling et al., 2025) and
  the image queries' attention over the concepts' keys ("attention"); see `families/concepts_sd3.py`.

A `Concepts` object belongs to one call: it holds the encoded concepts and one `MapStore` per kind, whose token
axis is the concepts' tokens (`token_groups` says which columns are which concept). The call's `MapStore` holds
it as `store.concepts` and forwards its step marks and flushes to it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .maps import MapStore

MAX_CONCEPTS = 16  # each concept adds key columns to every recorded layer; more is a slip, not a question
MAX_CONCEPT_CHARS = 64
DEFAULT_TEMPLATE = "a {}"  # the text a concept is encoded in; "a {}" localises best (README: Concept maps)
_ONE_WORD = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*")  # tokens.py's word: letters/digits joined by ' or -


def check_concepts(concepts, vocabulary: Sequence[str] = ()) -> list[str]:
    """The concepts as a list of stripped words, or a one-line ValueError naming the bad one: not text, empty,
    longer than `MAX_CONCEPT_CHARS`, not exactly one word, given twice, more than `MAX_CONCEPTS`, or (for a
    closed-vocabulary model) a word the model never saw."""
    if concepts is None:
        return []
    if isinstance(concepts, str):  # "triangle, background" from a text field; blanks between commas are skipped
        concepts = [c for c in concepts.split(",") if c.strip()]
    out: list[str] = []
    for c in concepts:
        if not isinstance(c, str):
            raise ValueError(f"concept {c!r} is not text; give words such as 'triangle'")
        word = c.strip()
        if not word:
            raise ValueError("a concept is empty; give a word such as 'triangle' (or leave concepts out)")
        if len(word) > MAX_CONCEPT_CHARS:
            raise ValueError(f"concept {word[:20]!r}... is {len(word)} characters long; a concept is one word of at "
                             f"most {MAX_CONCEPT_CHARS}")
        if not _ONE_WORD.fullmatch(word):
            words = _ONE_WORD.findall(word)
            what = (f"{len(words)} words" if len(words) > 1 else "not a word")
            raise ValueError(f"concept {word!r} is {what}; a concept is one word (give "
                             f"{' and '.join(repr(w) for w in words) or 'letters or digits'} as separate concepts)")
        if word.lower() in (o.lower() for o in out):
            raise ValueError(f"concept {word!r} is given twice; give each concept once")
        out.append(word)
    if len(out) > MAX_CONCEPTS:
        raise ValueError(f"{len(out)} concepts given; the limit is {MAX_CONCEPTS} per call")
    if vocabulary:
        known = {w.lower() for w in vocabulary}
        unknown = [w for w in out if w.lower() not in known]
        if unknown:
            raise ValueError(f"concept {unknown[0]!r} is not a word this model knows (it was trained on a closed "
                             f"vocabulary: {', '.join(vocabulary)})")
    return out


def concept_text(concept: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The text a concept is encoded in: `template` with the concept at its "{}"."""
    return template.replace("{}", concept, 1)


def check_template(template: str) -> str:
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"concept template {template!r} must hold one '{{}}' where the concept goes, e.g. 'a {{}}'")
    return template


def concept_token_positions(tokenizer, concept: str, template: str = DEFAULT_TEMPLATE) -> tuple[int, ...]:
    """Positions of `concept`'s word tokens in the padded encoding of `concept_text(concept, template)` (the
    template's words, start, end and padding left out); a one-line ValueError when the tokenizer's length limit
    cuts the word."""
    from .tokens import align_prompt

    start = template.index("{}")
    alignment = align_prompt(tokenizer, concept_text(concept, template))
    word = next((w for w in alignment.words if w.start == start and w.end == start + len(concept)), None)
    if word is None:
        raise ValueError(f"concept {concept[:20]!r} is cut by the tokenizer's limit of "
                         f"{tokenizer.model_max_length} tokens; give a shorter word")
    return word.token_indices


@dataclass
class Concepts:
    """One call's concepts and their maps.

    Attributes:
        names: the concepts, in the order given.
        token_groups: for each concept, its columns in the concept token axis of every kind's store.
        kinds: the map kinds recorded (the first is the default).
        stores: kind -> `MapStore` over the concept tokens (same layers and steps as the call's store).
        states: the concepts' text states the family's recorder reads, (1, tokens, dim); None once loaded.
        cache: per-call scratch of the family's recorder (e.g. each layer's concept keys).
    """

    names: list[str]
    token_groups: list[tuple[int, ...]]
    kinds: tuple[str, ...]
    stores: dict[str, MapStore] = field(default_factory=dict)
    states: torch.Tensor | None = field(default=None, repr=False)
    cache: dict = field(default_factory=dict, repr=False)
    default_kind: str | None = None
    template: str = DEFAULT_TEMPLATE
    requires_grad = False  # (a class constant, not a field) concept maps are read, not trained: no graph kept

    def __post_init__(self):
        if self.default_kind is None:
            self.default_kind = self.kinds[0]

    @classmethod
    def like(cls, store: MapStore, names, token_groups, kinds, states=None, default_kind=None,
             template: str = DEFAULT_TEMPLATE) -> "Concepts":
        """Concepts recorded with `store`'s settings (per-step maps, their dtype and device, heads, budget, guidance
        halves); their per-step maps keep every column (each is a concept's) and one map per layer."""
        stores = {k: MapStore(per_step=store.per_step, keep_heads=store.keep_heads,
                              max_step_bytes=store.max_step_bytes, cfg=store.cfg, defer_bytes=store.defer_bytes,
                              chunk_bytes=store.chunk_bytes, per_step_dtype=store.per_step_dtype,
                              per_step_device=store.per_step_device) for k in kinds}
        return cls(list(names), [tuple(g) for g in token_groups], tuple(kinds), stores, states,
                   default_kind=default_kind, template=template)

    @property
    def num_tokens(self) -> int:
        return sum(len(g) for g in self.token_groups)

    # -- what the call's MapStore forwards ----------------------------------------------------------------------

    def begin_call(self, latent_hw, timestep, grid) -> None:
        for s in self.stores.values():
            s.grid = grid
            s.begin_call(latent_hw, timestep)

    def flush(self) -> None:
        for s in self.stores.values():
            s.flush()

    def select_images(self, images: slice) -> "Concepts":
        return Concepts(list(self.names), list(self.token_groups), self.kinds,
                        {k: s.select_images(images) for k, s in self.stores.items()}, default_kind=self.default_kind,
                        template=self.template)

    # -- reading ---------------------------------------------------------------------------------------------

    def kind(self, kind: str | None) -> str:
        """`kind`, checked (None: the default kind)."""
        if kind is None:
            return self.default_kind
        if kind not in self.stores:
            raise ValueError(f"concept map kind {kind!r} was not recorded; this result has {', '.join(self.kinds)}")
        return kind

    def indices_of(self, concept: str) -> list[int]:
        key = concept.strip().lower()
        for name, group in zip(self.names, self.token_groups):
            if name.lower() == key:
                return list(group)
        raise ValueError(f"{concept!r} is not a concept of this result; its concepts are: "
                         f"{', '.join(map(repr, self.names)) or '(none)'}")

    def has(self, concept: str) -> bool:
        return concept.strip().lower() in (n.lower() for n in self.names)

    # -- persistence (inside the result's attention.safetensors and meta.json) -----------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"concept/{kind}/{k}": v for kind, s in self.stores.items() for k, v in s.state_dict().items()}

    def meta(self) -> dict:
        return {"names": list(self.names), "token_groups": [list(g) for g in self.token_groups],
                "kinds": list(self.kinds), "default_kind": self.default_kind, "template": self.template}

    @classmethod
    def from_saved(cls, meta: dict, tensors: dict[str, torch.Tensor], **settings) -> "Concepts":
        by_kind: dict[str, dict[str, torch.Tensor]] = {k: {} for k in meta["kinds"]}
        for key, value in tensors.items():
            _, kind, rest = key.split("/", 2)
            by_kind[kind][rest] = value
        stores = {k: MapStore.from_state_dict(t, **settings) for k, t in by_kind.items()}
        return cls(list(meta["names"]), [tuple(g) for g in meta["token_groups"]], tuple(meta["kinds"]), stores,
                   default_kind=meta["default_kind"], template=str(meta.get("template", DEFAULT_TEMPLATE)))


def attach(store: MapStore, concepts: Concepts) -> None:
    """Record `concepts` beside `store`: its step marks and flushes reach them."""
    store.concepts = concepts
