"""`GenerationResult`: heat maps, filters, and a save/load round trip that loses nothing."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_sd_pipeline
from crossattn_sd import ProcessorSpec, generate, load_result
from crossattn_sd.aggregate import token_map
from crossattn_sd.result import GenerationResult

# 9 tokens of whole words, then "circle" (6 sub-tokens) is cut by the 14-token limit of the tiny tokenizer.
PROMPT = "a red square and a blue square on the left circle"
WORDS = ["a", "red", "square", "and", "a", "blue", "square", "on", "the", "left"]
H, W = 32, 48


@pytest.fixture(scope="module")
def result():
    pipe = tiny_sd_pipeline()
    return generate(pipe, PROMPT, steps=2, guidance_scale=3.0, height=H, width=W, per_step=True,
                    keep_heads=True)


def test_heatmap_is_float32_hw_in_unit_range(result):
    assert result.words == WORDS and result.dropped_words == ["circle"]
    assert result.size == (H, W)
    for word in ("square", "<start>", "<end>"):
        m = result.heatmap(word)
        assert m.dtype == np.float32 and m.shape == (H, W)
        assert m.min() == 0.0 and m.max() == 1.0  # minmax normalisation
    raw = result.heatmap("square", normalize_by="none")
    assert 0.0 < raw.min() and raw.max() <= 1.0


def test_unknown_and_dropped_words_are_explained(result):
    listed = ", ".join(repr(w) for w in WORDS)
    with pytest.raises(ValueError, match=f"word 'zebra' is not in the prompt; the prompt's words are: {listed}"):
        result.heatmap("zebra")
    with pytest.raises(ValueError, match="'circle' was cut off by the tokenizer's length limit"):
        result.heatmap("circle")
    with pytest.raises(ValueError, match=r"image_index=1 is out of range; there are 1 image\(s\)"):
        result.heatmap("red", image_index=1)


def test_occurrences_add_up(result):
    both = result.heatmap("square", normalize_by="none")
    first = result.heatmap("square", occurrence=0, normalize_by="none")
    second = result.heatmap("square", occurrence=1, normalize_by="none")
    np.testing.assert_allclose(first + second, both, rtol=0, atol=1e-6)
    assert np.abs(first - second).max() > 1e-4
    with pytest.raises(ValueError, match="occurrence=2 is out of range"):
        result.heatmap("square", occurrence=2)


def test_word_maps_one_per_distinct_word(result):
    maps = result.word_maps()
    assert list(maps) == list(dict.fromkeys(WORDS))
    assert (maps["square"] == result.heatmap("square")).all()


def test_resolution_and_layer_filters(result):
    store = result.store
    assert store.resolutions() == [(16, 24), (8, 12)]
    big = [l for l in store.layers if store.layer_shape(l) == (16, 24)]
    up = [l for l in store.layers if l.startswith("up_blocks.")]
    idx = result.alignments[0].indices_of("red")
    for kwargs, names in ((dict(resolutions=[24]), big), (dict(resolutions=[(16, 24)]), big),
                          (dict(layers="up_blocks.*"), up)):
        ours = result.heatmap("red", normalize_by="none", **kwargs)
        expected = sum(token_map(store, idx, (H, W), layers=[n]) for n in names) / len(names)
        np.testing.assert_allclose(ours, expected.numpy(), rtol=0, atol=1e-6)
    assert np.abs(result.heatmap("red", resolutions=[24]) - result.heatmap("red", resolutions=[12])).max() > 1e-3
    with pytest.raises(ValueError, match="recorded map sizes: 16x24, 8x12"):
        result.heatmap("red", resolutions=[64])
    with pytest.raises(ValueError, match="no recorded layer matches layers='mid'"):
        result.heatmap("red", layers="mid")


def test_a_model_without_a_preset_defaults_to_every_layer(result):
    assert result.settings["map_layers"] == "all" and result.default_resolutions() is None
    every = result.heatmap("red", normalize_by="none")
    np.testing.assert_array_equal(every, result.heatmap("red", layers="*", normalize_by="none"))
    finest = GenerationResult(result.images, result.alignments, result.store, {**result.settings, "map_layers": "finest"})
    assert finest.default_resolutions() == [(16, 24)]
    np.testing.assert_array_equal(finest.heatmap("red"), result.heatmap("red", resolutions=[(16, 24)]))


def test_a_last_layer_and_one_head_default_view(result):
    """`map_layers: last` with `map_head` (tiny-mmdit's preset): the default view is that head of the last recorded
    layer; a step range takes the mean of the heads (per-step maps are head-averaged); filters still pick any view."""
    last = GenerationResult(result.images, result.alignments, result.store,
                            {**result.settings, "map_layers": "last", "map_head": 1})
    assert last.default_layers() == result.store.layers[-1:] and last.default_head() == 1
    np.testing.assert_array_equal(last.heatmap("red"), result.heatmap("red", layers=result.store.layers[-1:], head=1))
    assert np.abs(last.heatmap("red") - result.heatmap("red", layers=result.store.layers[-1:])).max() > 1e-3
    np.testing.assert_array_equal(last.word_maps()["red"], last.heatmap("red"))
    np.testing.assert_array_equal(last.heatmap("red", steps=[0]),
                                  result.heatmap("red", layers=result.store.layers[-1:], steps=[0]))
    np.testing.assert_array_equal(last.heatmap("red", layers="*"), result.heatmap("red", layers="*"))


def test_generate_keeps_heads_when_the_default_view_picks_one():
    pipe = tiny_sd_pipeline()
    plain = generate(pipe, "a red square", steps=1, height=H, width=W)
    headed = generate(pipe, "a red square", steps=1, height=H, width=W, map_layers="last", map_head=0)
    assert not plain.store.keep_heads and plain.settings["map_head"] is None
    assert headed.store.keep_heads and (headed.settings["map_layers"], headed.settings["map_head"]) == ("last", 0)
    np.testing.assert_array_equal(np.asarray(headed.images[0]), np.asarray(plain.images[0]))
    with pytest.raises(ValueError, match="map_head"):
        generate(pipe, "a red square", steps=1, map_head=-1)


def test_generate_takes_the_default_view_as_an_argument():
    pipe = tiny_sd_pipeline()
    finest = generate(pipe, "a red square", steps=1, height=H, width=W, map_layers="finest")
    assert finest.settings["map_layers"] == "finest" and finest.default_resolutions() == [(16, 24)]
    with pytest.raises(ValueError, match="map_layers='best' is not a map view; use one of all, finest"):
        generate(pipe, "a red square", steps=1, map_layers="best")


def test_heads_and_steps_selectors(result):
    heads = result.store.num_heads(result.store.layers[0])
    per_head = [result.heatmap("red", head=h, normalize_by="none") for h in range(heads)]
    np.testing.assert_allclose(sum(per_head) / heads, result.heatmap("red", normalize_by="none"), atol=1e-6)
    with pytest.raises(ValueError, match=f"head={heads} is out of range"):
        result.heatmap("red", head=heads)
    with pytest.raises(ValueError, match="not a slice"):
        result.heatmap("red", steps=slice(0, 1))


def test_save_load_round_trip_loses_nothing(result, tmp_path):
    folder = result.save(tmp_path / "run")
    assert {p.name for p in folder.iterdir()} == {"image.png", "maps.npz", "meta.json", "attention.safetensors"}
    back = load_result(folder)

    assert len(back.images) == 1
    assert (np.asarray(back.images[0]) == np.asarray(result.images[0])).all()
    assert back.alignments == result.alignments
    assert back.words == WORDS and back.dropped_words == ["circle"]
    assert back.settings == result.settings  # as generate() wrote them, not a JSON-flattened copy
    assert ProcessorSpec.from_dict(back.settings["processor"]) == ProcessorSpec("capture")
    a, b = result.store, back.store
    assert b.layers == a.layers and b.counts == a.counts and b.timesteps == a.timesteps
    assert a.latent_hw == (H // 2, W // 2) and a.step_bytes > 0
    assert (b.per_step, b.keep_heads, b.max_step_bytes, b.steps_dropped, b.step_bytes, b.latent_hw) == (
        a.per_step, a.keep_heads, a.max_step_bytes, a.steps_dropped, a.step_bytes, a.latent_hw)
    for layer in a.layers:
        assert torch.equal(b.sums[layer], a.sums[layer])
        assert torch.equal(b.head_sums[layer], a.head_sums[layer])
    assert len(b.steps) == len(a.steps) == 2
    assert all(torch.equal(sb[l], sa[l]) for sb, sa in zip(b.steps, a.steps) for l in a.layers)
    for word in ("square", "<end>"):
        assert (back.heatmap(word) == result.heatmap(word)).all()
        assert (back.heatmap(word, steps=[1]) == result.heatmap(word, steps=[1])).all()
        assert (back.heatmap(word, occurrence=1, head=0) == result.heatmap(word, occurrence=1, head=0)).all()

    with np.load(folder / "maps.npz") as maps:
        assert sorted(maps.files) == sorted(set(WORDS))
        assert all((maps[w] == result.heatmap(w)).all() for w in maps.files)
    with Image.open(folder / "image.png") as im:
        assert im.text["parameters"].splitlines()[0] == PROMPT
        assert "seed: 0" in im.text["parameters"]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["words"] == WORDS and meta["dropped_words"] == ["circle"] and meta["prompts"] == [PROMPT]


def test_several_images_round_trip(tmp_path):
    pipe = tiny_sd_pipeline()
    res = generate(pipe, ["a red square", "cat"], steps=1, guidance_scale=1.0, height=16, width=16)
    back = load_result(res.save(tmp_path / "two"))
    assert [a.prompt for a in back.alignments] == ["a red square", "cat"]
    assert all((np.asarray(x) == np.asarray(y)).all() for x, y in zip(back.images, res.images, strict=True))
    assert (back.heatmap("cat", image_index=1) == res.heatmap("cat", image_index=1)).all()
    with np.load(tmp_path / "two" / "maps.npz") as maps:
        assert sorted(maps.files) == ["1/cat", "a", "red", "square"]


def test_an_edit_result_loads_back_with_both_prompts_images_and_maps(tmp_path):
    pipe = tiny_sd_pipeline()
    spec = ProcessorSpec("edit", edit_prompt="a blue square on the left", inject=0.5)
    res = generate(pipe, "a red square on the left", processor=spec, steps=2, height=16, width=24, per_step=True)
    back = load_result(res.save(tmp_path / "edit"))
    assert [a.prompt for a in back.alignments] == ["a red square on the left", "a blue square on the left"]
    assert back.settings == res.settings and ProcessorSpec.from_dict(back.settings["processor"]) == spec
    assert all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(back.images, res.images, strict=True))
    for i, word in ((0, "red"), (1, "blue"), (1, "square")):
        assert back.heatmap(word, image_index=i).tobytes() == res.heatmap(word, image_index=i).tobytes()
        assert (back.heatmap(word, image_index=i, steps=[1]) == res.heatmap(word, image_index=i, steps=[1])).all()
    assert back.store.latent_hw == res.store.latent_hw == (8, 12) and back.store.step_bytes == res.store.step_bytes


@pytest.mark.parametrize("damage", ["no meta", "bad json", "wrong format", "truncated maps", "no image"])
def test_corrupt_folder_is_a_value_error(result, tmp_path, damage):
    folder = result.save(tmp_path / "run", word_maps=False)
    if damage == "no meta":
        (folder / "meta.json").unlink()
    elif damage == "bad json":
        (folder / "meta.json").write_text("{not json")
    elif damage == "wrong format":
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "format": 99}))
    elif damage == "truncated maps":
        data = (folder / "attention.safetensors").read_bytes()
        (folder / "attention.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (folder / "image.png").unlink()
    with pytest.raises(ValueError, match="is not a readable crossattn-sd result"):
        load_result(folder)


def test_missing_folder_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="expected meta.json, attention.safetensors and image.png"):
        load_result(tmp_path / "nothing-here")
