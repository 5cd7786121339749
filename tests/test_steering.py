"""Steering processors against the capture processor: reweight, edit, default, layer subsets, weight parsing."""
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from conftest import tiny_sd_pipeline
from crossattn_sd import generate
from crossattn_sd.maps import MapStore
from crossattn_sd.processors import CaptureProcessor, cross_attention_layers
from crossattn_sd.steering import (EditProcessor, ProcessorSpec, ReweightProcessor, edit_token_map, parse_weights,
                                   token_weights)
from crossattn_sd.tokens import align_prompt

PROMPT = "a red circle on the left"
SWAP = "a blue circle on the left"  # "red" -> "blue": one token each, so a word swap
WORDS = ["a", "red", "circle", "on", "the", "left"]
KW = dict(steps=2, guidance_scale=3.0, height=32, width=48)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def explicit(pipe):
    """The capture processor in explicit mode: the baseline the steering processors build on."""
    return generate(pipe, PROMPT, mode="explicit", **KW)


@pytest.fixture(scope="module")
def exact(pipe):
    return generate(pipe, PROMPT, mode="exact", **KW)


def pixels(result, i=0):
    return np.asarray(result.images[i])


def reweight(*weights, **kwargs):
    return ProcessorSpec("reweight", weights=tuple(weights), **kwargs)


def edit(edit_prompt, **kwargs):
    return ProcessorSpec("edit", edit_prompt=edit_prompt, **kwargs)


@pytest.mark.parametrize("mode", ["exact", "explicit"])
def test_reweight_with_unit_weights_is_capture_bit_for_bit(pipe, exact, explicit, mode):
    """Exact mode reweights through the values (SDPA(Q, K, w * V)): weights 1 are capture's exact images."""
    spec = reweight(("red", 1.0), ("circle", 1.0), mode=mode)
    assert spec.mode == mode
    ours = generate(pipe, PROMPT, processor=spec, **KW)
    baseline = exact if mode == "exact" else explicit
    assert np.array_equal(pixels(ours), pixels(baseline))
    assert ours.store.layers == baseline.store.layers
    assert all(torch.equal(ours.store.sums[l], baseline.store.sums[l]) for l in baseline.store.layers)
    assert ours.settings["processor"]["weights"] == [["red", 1.0], ["circle", 1.0]]


def test_exact_reweight_equals_explicit_reweight(pipe):
    """SDPA(Q, K, w * V) = (p * w) @ V: the two modes agree to float rounding, maps included."""
    spec = dict(weights=(("circle", 0.0), ("red", 2.0)))
    ours = generate(pipe, PROMPT, processor=ProcessorSpec("reweight", mode="exact", **spec), **KW)
    ref = generate(pipe, PROMPT, processor=ProcessorSpec("reweight", mode="explicit", **spec), **KW)
    assert np.abs(pixels(ours).astype(int) - pixels(ref)).max() <= 1
    for layer in ref.store.layers:
        torch.testing.assert_close(ours.store.sums[layer], ref.store.sums[layer], rtol=0, atol=1e-5)
    assert ours.heatmap("circle", normalize_by="none").max() == 0


def test_default_processor_records_nothing_and_equals_capture_exact(pipe, exact):
    seen = []
    ours = generate(pipe, PROMPT, processor=ProcessorSpec("default"),
                    progress=lambda i, n: seen.append(dict(pipe.unet.attn_processors)), **KW)
    assert np.array_equal(pixels(ours), pixels(exact))
    assert ours.store.sums == {} and ours.store.num_steps == 0
    assert all(isinstance(p, AttnProcessor2_0) for step in seen for p in step.values())
    with pytest.raises(ValueError, match="no attention maps were recorded"):
        ours.heatmap("red")


def test_edit_with_identical_prompts_reproduces_the_plain_image(pipe, explicit):
    """Edit runs the explicit math on a batch of [source, edit]; the plain image's batch is one prompt, so the
    floats may differ in the last bits (~1e-6) and the 8-bit images are equal."""
    ours = generate(pipe, PROMPT, processor=edit(PROMPT), **KW)
    assert len(ours.images) == 2  # [source, edit]
    for i in range(2):
        assert np.array_equal(pixels(ours, i), pixels(explicit))
        for layer in explicit.store.layers:
            torch.testing.assert_close(ours.store.sums[layer][i], explicit.store.sums[layer][0], rtol=0, atol=1e-6)


def test_weight_zero_removes_a_words_column_without_renormalising(pipe):
    """Prompt-to-prompt's AttentionReweight: probabilities * weight after the softmax, rows not renormalised;
    only the conditional half of a guidance batch is steered."""
    unet = pipe.unet
    layer = cross_attention_layers(unet)[0]
    attn = unet.get_submodule(layer)
    alignment = align_prompt(pipe.tokenizer, PROMPT)
    circle = alignment.indices_of("circle")
    assert len(circle) > 1  # a word of several sub-tokens: all of them are scaled
    weights = token_weights(alignment, [("circle", 0.0)])[None]  # (1 conditional image, T)
    torch.manual_seed(0)
    hidden = torch.randn(2, 8 * 12, attn.to_q.in_features)  # [unconditional, conditional], an 8x12 latent
    text = torch.randn(2, len(alignment.tokens), attn.to_k.in_features)

    outputs, stores = {}, {}
    for name, proc in (("capture", lambda s: CaptureProcessor(s, layer, "explicit")),
                       ("reweight", lambda s: ReweightProcessor(s, layer, weights))):
        stores[name] = MapStore(keep_heads=True, cfg=True)
        stores[name].begin_call((8, 12))
        with torch.no_grad():
            outputs[name] = proc(stores[name])(attn, hidden, encoder_hidden_states=text)
    probs = stores["capture"].head_sums[layer]  # (1, heads, 8, 12, T), conditional image only
    steered = stores["reweight"].head_sums[layer]
    assert (steered[..., circle] == 0).all()
    others = [i for i in range(len(alignment.tokens)) if i not in circle]
    assert torch.equal(steered[..., others], probs[..., others])  # not renormalised
    torch.testing.assert_close(steered.sum(-1), 1 - probs[..., circle].sum(-1), rtol=0, atol=1e-6)

    assert torch.equal(outputs["reweight"][0], outputs["capture"][0])  # unconditional half untouched
    with torch.no_grad():  # conditional half: the steered probabilities weight the values
        value = attn.to_v(text[1:]).unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (1, heads, T, d)
        mixed = steered.flatten(2, 3) @ value  # (1, heads, Nq, d)
        expected = attn.to_out[0](mixed.transpose(1, 2).flatten(2))
    torch.testing.assert_close(outputs["reweight"][1:], expected, rtol=0, atol=1e-6)


def test_weight_two_changes_the_image_and_raises_the_words_map_mass(pipe, explicit):
    ours = generate(pipe, PROMPT, processor=reweight(("circle", 2.0)), **KW)
    assert not np.array_equal(pixels(ours), pixels(explicit))
    mass = ours.heatmap("circle", normalize_by="none").sum()
    assert mass > 1.5 * explicit.heatmap("circle", normalize_by="none").sum()
    assert ours.words == WORDS


def test_layer_subset_only_steers_and_records_those_layers(pipe, explicit):
    layers = cross_attention_layers(pipe.unet)
    down = [l for l in layers if l.startswith("down_blocks.")]
    before = dict(pipe.unet.attn_processors)
    seen = []
    ours = generate(pipe, PROMPT, processor=reweight(("circle", 0.0), layers="down_blocks.*"), per_step=True,
                    progress=lambda i, n: seen.append(dict(pipe.unet.attn_processors)), **KW)
    assert sorted(ours.store.layers) == sorted(down) and 0 < len(down) < len(layers)
    for key, proc in seen[0].items():
        if key.removesuffix(".processor") in down:
            assert isinstance(proc, CaptureProcessor) and proc.steering.token_weights is not None
        else:
            assert proc is before[key]
    circle = ours.alignments[0].indices_of("circle")
    assert all((step[l][..., circle] == 0).all() for step in ours.store.steps for l in down)
    assert not np.array_equal(pixels(ours), pixels(explicit))
    assert all(after is before[k] for k, after in pipe.unet.attn_processors.items())

    # generate's own `layers` applies when the processor does not name layers
    up = generate(pipe, PROMPT, processor=edit(SWAP), layers="up_blocks.*", **KW)
    assert up.store.layers == [l for l in layers if l.startswith("up_blocks.")]


def test_edit_word_swap_returns_source_and_edit_with_their_own_words(pipe, explicit):
    ours = generate(pipe, PROMPT, processor=edit(SWAP, inject=1.0), **KW)
    assert len(ours.images) == 2 and [a.prompt for a in ours.alignments] == [PROMPT, SWAP]
    assert ours.settings["edit_source_prompt"] == PROMPT and ours.settings["prompt"] == PROMPT
    assert list(ours.word_maps(0)) == WORDS and list(ours.word_maps(1)) == ["a", "blue", "circle", "on", "the", "left"]
    assert ours.heatmap("blue", image_index=1).shape == (32, 48)
    with pytest.raises(ValueError, match="word 'blue' is not in the prompt"):
        ours.heatmap("blue", image_index=0)
    assert np.array_equal(pixels(ours, 0), pixels(explicit))  # the source is the plain image
    # injected at every step, position to position: the edit used exactly the source's probabilities
    assert all(torch.equal(s[1], s[0]) for s in ours.store.sums.values())


def test_edit_with_no_injection_is_the_edit_prompt_generated_alone(pipe):
    alone = generate(pipe, SWAP, mode="explicit", **KW)
    ours = generate(pipe, PROMPT, processor=edit(SWAP, inject=0.0), **KW)
    assert np.array_equal(pixels(ours, 1), pixels(alone))
    for layer in alone.store.layers:
        torch.testing.assert_close(ours.store.sums[layer][1], alone.store.sums[layer][0], rtol=0, atol=1e-6)


def test_edit_refinement_keeps_the_added_words_own_attention(pipe):
    source, refined = "a square", "a red square"
    ours = generate(pipe, source, processor=edit(refined, inject=1.0), **KW)
    assert [a.word_texts for a in ours.alignments] == [["a", "square"], ["a", "red", "square"]]
    src, ed = (a.indices_of for a in ours.alignments)
    for sums in ours.store.sums.values():  # (2, h, w, T): [source, edit]
        for word in ("a", "square", "<start>", "<end>"):
            assert torch.equal(sums[1][..., ed(word)], sums[0][..., src(word)])
        assert not torch.equal(sums[1][..., ed("red")], sums[0][..., [0]])  # its own column, no source one
    assert list(ours.word_maps(1)) == ["a", "red", "square"]


def test_edit_token_map_for_swap_and_refinement(pipe):
    tok = pipe.tokenizer
    a = lambda p: align_prompt(tok, p)  # noqa: E731
    T = tok.model_max_length
    assert torch.equal(edit_token_map(a(PROMPT), a(SWAP)), torch.arange(T))

    # refinement "a square" (<s> a square </s> pads) -> "a red square" (<s> a red square </s> pads)
    mapping = edit_token_map(a("a square"), a("a red square"))
    assert mapping[:5].tolist() == [0, 1, -1, 2, 3]  # start, a, red (own), square, end
    assert mapping[5:].tolist() == list(range(4, T - 1))  # padding to padding, in order
    mapping = edit_token_map(a("a red square"), a("a square"))  # the edit is shorter: it has one more pad
    assert mapping[:4].tolist() == [0, 1, 3, 4] and mapping[4:].tolist() == list(range(5, T)) + [T - 1]
    # a word with another number of sub-tokens is a refinement, not a swap: "circle" is several tokens
    mapping = edit_token_map(a("a red square"), a("a red circle"))
    circle = a("a red circle").indices_of("circle")
    assert mapping[1:3].tolist() == [1, 2] and (mapping[circle] == -1).all()
    assert mapping[a("a red circle").special_indices["end"][0]] == a("a red square").special_indices["end"][0]


def test_edit_processor_injects_only_for_the_first_calls(pipe):
    layer = cross_attention_layers(pipe.unet)[0]
    attn = pipe.unet.get_submodule(layer)
    T = pipe.tokenizer.model_max_length
    torch.manual_seed(0)
    hidden = torch.randn(2, 16, attn.to_q.in_features)
    text = torch.randn(2, T, attn.to_k.in_features)
    store = MapStore(keep_heads=True)
    proc = EditProcessor(store, layer, torch.arange(T), inject_calls=1)
    for _ in range(2):
        store.begin_call((4, 4))
        with torch.no_grad():
            proc(attn, hidden, encoder_hidden_states=text)
    heads = store.head_sums[layer]  # both calls summed: the first injected, the second its own
    assert not torch.equal(heads[1], heads[0])
    store = MapStore(keep_heads=True)
    store.begin_call((4, 4))
    with torch.no_grad():
        EditProcessor(store, layer, torch.arange(T), inject_calls=1)(attn, hidden, encoder_hidden_states=text)
    assert torch.equal(store.head_sums[layer][1], store.head_sums[layer][0])


def test_parse_weights():
    assert parse_weights("circle:2.0, red:0.5; left : -1") == (("circle", 2.0), ("red", 0.5), ("left", -1.0))
    assert parse_weights("") == () and parse_weights(None) == ()


@pytest.mark.parametrize("text,message", [
    ("circle", "bad weight 'circle'"),
    ("circle:2, red", "bad weight 'red'"),
    ("circle:big", "bad weight 'circle:big'"),
    (":2", "bad weight ':2'"),
    ("circle:20", "weight 20.0 for 'circle' is out of range"),
    ("red:1, circle:nan", "weight nan for 'circle' is out of range"),
])
def test_parse_weights_errors_name_the_bad_item(text, message):
    with pytest.raises(ValueError, match=message):
        parse_weights(text)


def test_unknown_word_in_weights_lists_the_prompts_words(pipe):
    listed = ", ".join(repr(w) for w in WORDS)
    with pytest.raises(ValueError, match=f"word 'zebra' is not in the prompt; the prompt's words are: {listed}"):
        generate(pipe, PROMPT, processor=reweight(("zebra", 2.0)), **KW)


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="fancy"), "unknown processor 'fancy'"),
    (dict(name="capture", mode="fast"), "unknown mode 'fast'"),
    (dict(name="reweight"), "the reweight processor needs weights"),
    (dict(name="edit"), "the edit processor needs an edit prompt"),
    (dict(name="edit", edit_prompt="  "), "the edit processor needs an edit prompt"),
    (dict(name="edit", edit_prompt="a cat", inject=1.5), "inject=1.5 is out of range"),
])
def test_bad_processor_specs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProcessorSpec(**kwargs)


def test_edit_takes_one_source_prompt(pipe):
    with pytest.raises(ValueError, match=r"one source prompt.*got 2 prompt\(s\) x 1 image\(s\)"):
        generate(pipe, [PROMPT, SWAP], processor=edit(PROMPT), **KW)
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
