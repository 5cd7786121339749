"""The Mechanisms view: one prompt and seed on tiny, tiny-untaught, tiny-mmdit and tiny-film (package data)."""
import json

import numpy as np
import pytest
import torch

from crossattn_sd import cli
from crossattn_sd.mechanisms import MODELS, Mechanisms, default_word, save
from crossattn_sd.pipeline import generate
from crossattn_sd.tiny.world import parse_caption

PROMPT = "a red circle on the left and a blue square on the right"


@pytest.fixture(scope="module")
def mechanisms():
    torch.set_num_threads(1)
    loaded = []

    def loader(name):
        from crossattn_sd.pipeline import load_pipeline

        loaded.append(name)
        return load_pipeline(name, device="cpu")

    m = Mechanisms(loader=loader)
    m.loaded = loaded
    return m


@pytest.fixture(scope="module")
def panels(mechanisms):
    return mechanisms.run(PROMPT, seed=0, word="circle")


def test_every_model_draws_the_prompt_with_its_own_mechanism(mechanisms, panels):
    assert [p.model for p in panels] == list(MODELS)
    for p in panels:
        assert p.image.size == (64, 64) and p.verdict is not None and len(p.verdict.objects) == 2
        # the same image as the model's own generate() with that seed: each panel is the model's real answer
        alone = generate(mechanisms.pipe(p.model), PROMPT, seed=0)
        assert np.array_equal(np.asarray(alone.images[0]), np.asarray(p.image))
    for p in panels[:3]:  # the attention models: the word's map over the image
        assert p.word == "circle" and p.heatmap.shape == (64, 64) and p.note == ""
        assert "red circle on the left" in p.verdict_text()


def test_a_word_on_tiny_film_gets_a_message_not_an_empty_map(panels):
    film = panels[-1]
    assert film.model == "tiny-film" and film.heatmap is None
    assert film.note.startswith("tiny-film has no attention maps: FiLM")
    assert "'circle'" in film.note
    assert film.overlay() is film.image


def test_models_load_lazily_and_once(mechanisms, panels):
    mechanisms.run("a blue square on the left", seed=1)
    assert mechanisms.loaded == list(MODELS)  # loaded by the first run, in order, and never again
    assert Mechanisms(loader=lambda name: pytest.fail("loaded at construction"))  # nothing loads before a run


def test_bad_input_is_refused_with_a_message(mechanisms, panels):
    with pytest.raises(ValueError, match="'hexagon' is not a word of the prompt; its words are a, red"):
        mechanisms.run(PROMPT, word="hexagon")
    with pytest.raises(ValueError, match="the prompt is empty"):
        mechanisms.run("  ")


def test_captions_parse_back_and_others_are_not_judged():
    assert parse_caption(PROMPT) == [("red", "circle", "left"), ("blue", "square", "right")]
    assert parse_caption("a  Blue square on the top") == [("blue", "square", "top")]
    assert parse_caption("a purple circle on the left") is None
    assert parse_caption("a red circle") is None
    assert default_word(["a", "red", "circle"], parse_caption("a red circle on the left")) == "circle"
    assert default_word(["an", "image", "of", "shapes"], None) == "image"


def test_save_and_the_cli_write_the_panels(tmp_path, panels, capsys, monkeypatch, mechanisms):
    out = save(panels, tmp_path / "m", PROMPT, 0)
    data = json.loads((out / "mechanisms.json").read_text())
    assert [p["model"] for p in data["panels"]] == list(MODELS)
    assert [p["has_map"] for p in data["panels"]] == [True, True, True, False]
    assert (out / "mechanisms.png").is_file() and (out / "tiny-circle.png").is_file()
    assert not (out / "tiny-film-circle.png").exists()

    monkeypatch.setattr("crossattn_sd.mechanisms.Mechanisms", lambda: mechanisms)  # reuse the loaded models
    assert cli.main(["mechanisms", PROMPT, "--out", str(tmp_path / "cli"), "--word", "square"]) == 0
    printed = capsys.readouterr().out
    assert "tiny-film has no attention maps: FiLM" in printed and "'square'" in printed
    assert (tmp_path / "cli" / "tiny-mmdit-square.png").is_file()
    assert cli.main(["mechanisms", PROMPT, "--out", str(tmp_path / "bad"), "--word", "hexagon"]) == 2
    assert "'hexagon' is not a word of the prompt" in capsys.readouterr().err
