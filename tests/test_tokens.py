"""Prompt -> tokens -> words: sub-word merging, punctuation, special tokens, truncation exactly as Diffusers does it."""
import pytest
import torch

from conftest import tiny_tokenizer
from crossattn_sd.tokens import align_prompt

# With the tiny tokenizer (max_length 16: 14 content tokens) "circle" is 6 sub-tokens; this prompt's first nine
# words take 9 tokens, so "circle" is cut after 5 of its 6 tokens and "on the right" falls off entirely.
LONG = "a red square on the left and a blue circle on the right"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_subword_tokens_merge_into_one_word(tok):
    a = align_prompt(tok, "a yellow circle")
    assert a.word_texts == ["a", "yellow", "circle"]
    yellow, circle = a.words[1], a.words[2]
    assert len(yellow.token_indices) > 1 and len(circle.token_indices) == 6
    assert circle.token_indices == tuple(range(yellow.token_indices[-1] + 1, yellow.token_indices[-1] + 7))
    assert "".join(a.tokens[i] for i in circle.token_indices).removesuffix("</w>") == "circle"
    assert (circle.start, circle.end) == (9, 15)
    assert a.indices_of("CIRCLE") == list(circle.token_indices)  # case-insensitive


def test_punctuation_is_no_word(tok):
    a = align_prompt(tok, "a red circle, on the left.")
    assert a.word_texts == ["a", "red", "circle", "on", "the", "left"]
    in_words = {i for w in a.words for i in w.token_indices}
    punctuation = [i for i, t in enumerate(a.tokens) if t in (",</w>", ".</w>")]
    assert len(punctuation) == 2 and not in_words & set(punctuation)
    assert a.dropped_words == ()
    with pytest.raises(ValueError, match="word ',' is not in the prompt"):
        a.indices_of(",")


def test_start_and_end_tokens(tok):
    a = align_prompt(tok, "a red circle")  # 1 + 1 + 6 content tokens
    assert a.indices_of("<start>") == [0] and a.tokens[0] == "<|startoftext|>"
    assert a.indices_of("<end>") == [9] and a.tokens[9] == "<|endoftext|>"
    assert a.special_indices["pad"] == tuple(range(10, 16))
    assert len(a.tokens) == tok.model_max_length == 16


def test_empty_prompt_has_no_words(tok):
    a = align_prompt(tok, "")
    assert a.words == () and a.dropped_words == () and a.word_texts == []
    assert a.indices_of("<start>") == [0] and a.indices_of("<end>") == [1]
    with pytest.raises(ValueError, match=r"the prompt's words are: \(none\)"):
        a.indices_of("circle")


def test_truncation_matches_diffusers_exactly(sd_pipe):
    """The tokens are the very ids Diffusers feeds its text encoder; the report names what it cut."""
    seen = []
    hook = sd_pipe.text_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        sd_pipe.encode_prompt(LONG, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    finally:
        hook.remove()
    a = align_prompt(sd_pipe.tokenizer, LONG)
    assert sd_pipe.tokenizer.convert_tokens_to_ids(list(a.tokens)) == seen[0][0].tolist()

    # What Diffusers reports as removed (its encode_prompt warning): the cut word's tail and the words after it.
    untruncated = sd_pipe.tokenizer(LONG, padding="longest").input_ids
    removed = sd_pipe.tokenizer.decode(untruncated[sd_pipe.tokenizer.model_max_length - 1:-1])
    assert removed.split() == ["e", "on", "the", "right"]
    assert a.dropped_words == ("circle", "on", "the", "right")  # a partially cut word counts as dropped
    assert a.word_texts == ["a", "red", "square", "on", "the", "left", "and", "a", "blue"]
    cut = [i for i in range(10, 15)]  # the 5 kept tokens of "circle" belong to no word
    assert [a.tokens[i] for i in cut] == ["c", "i", "r", "c", "l"]
    assert not {i for w in a.words for i in w.token_indices} & set(cut)
    assert a.indices_of("<end>") == [15]
    with pytest.raises(ValueError, match="'circle' was cut off by the tokenizer's length limit"):
        a.indices_of("circle")
    assert a.indices_of("on") == [4]  # only the kept "on"


def test_prompt_that_fits_exactly_drops_nothing(tok):
    a = align_prompt(tok, "a red square on the left and a circle")  # 8 + 6 = 14 content tokens
    assert a.dropped_words == () and a.word_texts[-1] == "circle"
    assert a.indices_of("<end>") == [15] and a.special_indices["pad"] == ()


def test_repeated_words_and_occurrence(tok):
    a = align_prompt(tok, "a red square and a blue square")
    assert a.indices_of("square") == [3, 7]
    assert a.indices_of("square", occurrence=0) == [3]
    assert a.indices_of("square", occurrence=1) == [7]
    assert a.indices_of("a") == [1, 5]
    with pytest.raises(ValueError, match=r"occurrence=2 is out of range: 'square' occurs 2 time\(s\); use 0..1"):
        a.indices_of("square", occurrence=2)


def test_unknown_word_lists_the_prompts_words(tok):
    a = align_prompt(tok, "a red circle")
    with pytest.raises(ValueError, match=r"word 'zebra' is not in the prompt; the prompt's words are: "
                                         r"'a', 'red', 'circle'"):
        a.indices_of("zebra")


def test_apostrophes_hyphens_and_spacing(tok):
    a = align_prompt(tok, "  A  close-up, don't ")
    assert a.word_texts == ["A", "close-up", "don't"]
    assert [(w.start, w.end) for w in a.words] == [(2, 3), (5, 13), (15, 20)]
    assert a.indices_of("a") == [1]


def test_non_string_prompt_is_refused(tok):
    with pytest.raises(TypeError, match="prompt must be a string, got list"):
        align_prompt(tok, ["a red circle"])


def test_max_length_argument(tok):
    a = align_prompt(tok, "a red circle", max_length=8)  # 6 content tokens: circle is cut
    assert len(a.tokens) == 8 and a.word_texts == ["a", "red"] and a.dropped_words == ("circle",)
    assert torch.tensor(tok.convert_tokens_to_ids(list(a.tokens))).tolist() == tok(
        "a red circle", padding="max_length", max_length=8, truncation=True).input_ids
