"""Prompt -> tokens -> words.

Cross-attention maps are indexed by token position in the text encoder's input. People think in words, so
this module aligns the two: a word split into several sub-tokens is merged, punctuation tokens belong to no
word, start/end/padding tokens are kept apart, and a prompt longer than the tokenizer's limit is truncated
exactly the way Diffusers' pipelines truncate it (`padding="max_length", truncation=True`), with a report of
which words fell off the end.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# A word is a run of letters/digits, optionally joined by an apostrophe or hyphen ("don't", "close-up").
_WORD_RE = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*")


@dataclass(frozen=True)
class Word:
    """One prompt word and the token positions (in the padded text-encoder input) that spell it."""

    text: str
    token_indices: tuple[int, ...]
    start: int  # character span in the prompt
    end: int


@dataclass(frozen=True)
class PromptTokens:
    """The alignment of one prompt: its words, its tokens, and what truncation removed."""

    prompt: str
    tokens: tuple[str, ...]  # the padded token strings the text encoder sees (length = max_length)
    words: tuple[Word, ...]  # words fully kept, in prompt order
    dropped_words: tuple[str, ...]  # words cut (wholly or partly) by the tokenizer's length limit
    special_indices: dict[str, tuple[int, ...]] = field(default_factory=dict)  # "start", "end", "pad"

    @property
    def word_texts(self) -> list[str]:
        return [w.text for w in self.words]

    def indices_of(self, word: str, occurrence: int | None = None) -> list[int]:
        """Token positions of `word` (case-insensitive); all occurrences unless `occurrence` (0-based) picks one.

        Also accepts "<start>" / "<end>" for the special tokens.
        """
        key = word.strip().lower()
        if key in ("<start>", "<sot>", "<bos>"):
            return list(self.special_indices.get("start", ()))
        if key in ("<end>", "<eot>", "<eos>"):
            return list(self.special_indices.get("end", ()))
        matches = [w for w in self.words if w.text.lower() == key]
        if not matches:
            dropped = f" ('{word}' was cut off by the tokenizer's length limit)" if key in (
                d.lower() for d in self.dropped_words) else ""
            raise ValueError(
                f"word '{word}' is not in the prompt{dropped}; the prompt's words are: "
                f"{', '.join(repr(w) for w in self.word_texts) or '(none)'}"
            )
        if occurrence is not None:
            if not 0 <= occurrence < len(matches):
                raise ValueError(
                    f"occurrence={occurrence} is out of range: '{word}' occurs {len(matches)} time(s); "
                    f"use 0..{len(matches) - 1}"
                )
            matches = [matches[occurrence]]
        return [i for w in matches for i in w.token_indices]


def align_prompt(tokenizer, prompt: str, max_length: int | None = None) -> PromptTokens:
    """Tokenize `prompt` as Diffusers does and align tokens to the prompt's words.

    Args:
        tokenizer: a Hugging Face tokenizer with a fast backend (offset mapping), e.g. `CLIPTokenizer`.
        prompt (`str`): the prompt; may be empty.
        max_length (`int`, *optional*): defaults to `tokenizer.model_max_length`, as in Diffusers.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    max_length = max_length or tokenizer.model_max_length
    enc = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
                    return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    tokens = tuple(tokenizer.convert_ids_to_tokens(ids))

    specials = set(tokenizer.all_special_ids)
    start_ids = {tokenizer.bos_token_id} if tokenizer.bos_token_id is not None else set()
    # The first end token closes the prompt; later copies of it (CLIP pads with the end token) are padding.
    special_indices: dict[str, list[int]] = {"start": [], "end": [], "pad": []}
    seen_end = False
    content: list[int] = []
    for i, tid in enumerate(ids):
        if tid in specials and offsets[i] == (0, 0):
            if i == 0 and tid in start_ids:
                special_indices["start"].append(i)
            elif not seen_end:
                special_indices["end"].append(i)
                seen_end = True
            else:
                special_indices["pad"].append(i)
        else:
            content.append(i)

    spans = [(m.start(), m.end(), m.group(0)) for m in _WORD_RE.finditer(prompt)]
    word_tokens: list[list[int]] = [[] for _ in spans]
    for i in content:
        t0, t1 = offsets[i]
        for w, (s, e, _) in enumerate(spans):
            if t0 < e and s < t1:  # overlap: this token spells (part of) word w
                word_tokens[w].append(i)
                break

    # Which characters did the kept tokens cover? A word is dropped unless all of it was tokenized.
    covered_until = max((offsets[i][1] for i in content), default=0)
    words, dropped = [], []
    for (s, e, text), idx in zip(spans, word_tokens):
        if idx and e <= covered_until:
            words.append(Word(text, tuple(idx), s, e))
        else:
            dropped.append(text)
    return PromptTokens(
        prompt=prompt, tokens=tokens, words=tuple(words), dropped_words=tuple(dropped),
        special_indices={k: tuple(v) for k, v in special_indices.items()},
    )


def prompt_columns(alignments) -> list[int]:
    """The text positions that are the prompts' own tokens, over all `alignments` (`PromptTokens`): for each,
    from its first to its last start, word or end token (punctuation between words included; padding, and
    whatever else shares the text sequence, left out). Per-step maps keep these columns (`MapStore.step_columns`)."""
    columns: set[int] = set()
    for a in alignments:
        used = [i for w in a.words for i in w.token_indices]
        used += [*a.special_indices.get("start", ()), *a.special_indices.get("end", ())]
        if used:
            columns.update(range(min(used), max(used) + 1))
    return sorted(columns)


def misaligned_words(first: PromptTokens, second: PromptTokens) -> list[str]:
    """Words of `first` that `second` (the same prompt, another tokenizer) places at other token positions.

    SDXL joins its two text encoders' states position by position, so a word's map is its own only where both
    tokenizers put it at the same positions. They share CLIP's vocabulary, but SDXL's second tokenizer pads with
    "!" and so splits every "!" off: "wow!!!" is two tokens in the first and four in the second.
    """
    positions = {(w.start, w.end): w.token_indices for w in second.words}
    return [w.text for w in first.words if positions.get((w.start, w.end)) != w.token_indices]


def unknown_words(prompt: str, vocabulary) -> list[str]:
    """The distinct words of `prompt` (lower case, in order) that are not in a closed `vocabulary`.

    A model trained on a closed vocabulary (the embedded ones) has never seen other words: their tokens keep
    their initial embeddings, so they steer nothing and their maps mean nothing. Empty `vocabulary`: none."""
    if not vocabulary:
        return []
    known = {w.lower() for w in vocabulary}
    words = dict.fromkeys(m.group(0).lower() for m in _WORD_RE.finditer(prompt))
    return [w for w in words if w not in known]


class VocabularyWarning(UserWarning):
    """A prompt uses words a closed-vocabulary model never saw (`generate` warns before it runs)."""


def vocabulary_note(prompts, vocabulary) -> str | None:
    """One line naming the words of `prompts` a closed-vocabulary model never saw, and the words it knows."""
    unknown = list(dict.fromkeys(w for p in prompts if p for w in unknown_words(p, vocabulary)))
    if not unknown:
        return None
    return (f"this model was trained on a closed vocabulary and never saw {', '.join(map(repr, unknown))}; "
            f"it knows: {', '.join(vocabulary)}")


def offset_alignment(part: PromptTokens, offset: int, tokens: tuple[str, ...]) -> PromptTokens:
    """`part`'s alignment moved to start at position `offset` of a longer text sequence whose token strings are
    `tokens` (e.g. SD3: CLIP's positions, then T5's): word and special indices shift by `offset`."""
    return PromptTokens(
        prompt=part.prompt, tokens=tuple(tokens),
        words=tuple(Word(w.text, tuple(i + offset for i in w.token_indices), w.start, w.end) for w in part.words),
        dropped_words=part.dropped_words,
        special_indices={k: tuple(i + offset for i in v) for k, v in part.special_indices.items()},
    )


def align_in_text(tokenizer, prompt: str, text: str, base: int, encoding, keep: list[int],
                  start: tuple[int, ...] = ()) -> PromptTokens:
    """Align `prompt`'s words to the text-encoder positions a pipeline keeps of a longer text that holds it.

    Args:
        tokenizer: the tokenizer that made `encoding` (for the token strings).
        prompt (`str`): the prompt as given.
        text (`str`): the text tokenized (a template or an instruction around the prompt, maybe lower-cased).
        base (`int`): where the prompt's character 0 sits in `text` (a word is aligned only if `text` reads the same
            there, case aside).
        encoding: `tokenizer(text, ..., return_offsets_mapping=True)`.
        keep (list of `int`): the token positions the pipeline passes on, in order (its text sequence).
        start (tuple of `int`): positions (in the kept sequence) that are a start token.
    Template and instruction tokens belong to no word; tokens with attention mask 0 are "pad"; a word none of whose
    tokens was kept, or only part of, is a dropped word.
    """
    ids = [encoding["input_ids"][i] for i in keep]
    offsets = [tuple(encoding["offset_mapping"][i]) for i in keep]
    mask = encoding.get("attention_mask")
    pad = tuple(k for k, i in enumerate(keep) if mask is not None and not mask[i])
    words, dropped = [], []
    for m in _WORD_RE.finditer(prompt):
        s, e = base + m.start(), base + m.end()
        idx = ()
        if text[s:e].lower() == m.group(0).lower():
            idx = tuple(k for k, (t0, t1) in enumerate(offsets) if k not in pad and t0 < e and s < t1)
        if idx and offsets[idx[0]][0] <= s and max(offsets[k][1] for k in idx) >= e:
            words.append(Word(m.group(0), idx, m.start(), m.end()))
        else:
            dropped.append(m.group(0))
    return PromptTokens(prompt=prompt, tokens=tuple(tokenizer.convert_ids_to_tokens(ids)), words=tuple(words),
                        dropped_words=tuple(dropped), special_indices={"start": tuple(start), "end": (), "pad": pad})
