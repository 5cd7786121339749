"""What the service tells the UI about a view: which layers a tick means, what a map is drawn from, an edit's two
images, and the settings an opened bundle recorded (issue 15). The seeded tiny pipeline at 32x32, 4 steps."""

import dataclasses

import numpy as np
import pytest
from conftest import tiny_sd_pipeline

from crossattn_sd.config import get_preset
from crossattn_sd.service import AttentionService, GenerateRequest

PRESET = dataclasses.replace(get_preset("tiny"), steps=4, height=32, width=32, max_side=64)
PROMPT = "a red square on the left"
EDIT = "a blue square on the left"


@pytest.fixture(scope="module")
def service():
    return AttentionService(PRESET, pipe=tiny_sd_pipeline(0))


@pytest.fixture(scope="module")
def entry(service):
    return service.generate(GenerateRequest(PROMPT))


@pytest.fixture(scope="module")
def edit(service):
    return service.generate(GenerateRequest(PROMPT, seed=7, steps=3, processor="edit", edit_prompt=EDIT, inject=0.5,
                                            negative_prompt="green", guidance=3.5))


def test_resolution_ticks_mean_exactly_their_layers(entry, service):
    c = service.choices(entry)
    assert c.resolutions == ["16x16", "8x8"] and c.default_resolutions == ["16x16"]
    fine = [name for label, name in c.layers if label.endswith("16x16")]
    assert c.default_layers == c.layers_at(["16x16"]) == fine and len(fine) == 3
    assert c.layers_at([]) == [] and c.resolutions_of([]) == []
    assert c.resolutions_of(c.layers_at(["8x8"])) == ["8x8"]
    assert c.resolutions_of([*c.layers_at(["8x8"]), fine[0]]) == ["8x8"]  # 16x16 only partly ticked
    assert c.resolutions_of([name for _, name in c.layers]) == c.resolutions


def test_the_summary_says_what_the_map_is_drawn_from_counting_steps_from_one(entry, service):
    view = service.inspect(entry, "red", grid=False, timeline=False)
    assert "Drawn from 3 of 7 layers (16x16) · steps 1–4 of 4 · mean of" in view.summary
    layers = service.choices(entry).layers_at(["8x8"])
    assert service.drawn_from(entry, service.filters(layers, step_from=1, step_to=2)).startswith(
        "4 of 7 layers (8x8) · steps 2–3 of 4 · mean of")
    assert " · step 4 of 4 · " in service.drawn_from(entry, service.filters("*", step_from=3))
    assert service.drawn_from(entry, service.filters("*", head=1)).endswith("steps 1–4 of 4 · head 1")
    assert "7 of 7 layers (16x16, 8x8)" in service.drawn_from(entry, service.filters("*"))


def test_a_result_without_maps_says_why(service):
    plain = service.generate(GenerateRequest(PROMPT, processor="default"))
    view = service.inspect(plain, None)
    assert view.overlay is None and "the default processor records none" in view.summary
    with pytest.raises(ValueError, match="the default processor records none"):
        service.value_at(plain, "red", service.filters(), 0, 0)


def test_an_edit_shows_either_image_with_its_own_words_and_maps(edit, service):
    assert edit.index == 1 and edit.words == ["a", "blue", "square", "on", "the", "left"]
    source = edit.showing(0)
    assert source.index == 0 and source.prompt == PROMPT and source.words[1] == "red"
    assert edit.index == 1  # the entry in the history is unchanged
    np.testing.assert_array_equal(np.asarray(source.image), np.asarray(edit.result.images[0]))
    f = service.filters()
    assert not np.array_equal(np.asarray(service.overlay(source, "square", f)),
                              np.asarray(service.overlay(edit, "square", f)))
    with pytest.raises(ValueError, match="image 2 is out of range"):
        edit.showing(2)


def test_an_opened_bundle_gives_back_the_settings_it_recorded(edit, service):
    opened = service.open_bundle(edit.bundle)
    assert service.recorded_settings(opened) == dict(
        prompt=PROMPT, negative_prompt="green", seed=7, steps=3, guidance=3.5, width=32, height=32,
        scheduler="default", mode="explicit", processor="edit", weights="", edit_prompt=EDIT, inject=0.5,
        per_step=True, processor_layers="*", concepts="")  # no concepts: the field is cleared
    reweighted = service.generate(GenerateRequest(PROMPT, processor="reweight", weights="square:2, red:0.5"))
    assert service.recorded_settings(reweighted)["weights"] == "square:2, red:0.5"
    # A result from elsewhere (another model, an edited bundle): what this server does not offer is left out.
    settings = {**edit.result.settings, "scheduler": "warp", "width": 4096, "steps": 0, "seed": "7",
                "processor": {**edit.result.settings["processor"], "name": "magic", "inject": 2}}
    other = dataclasses.replace(edit, result=dataclasses.replace(edit.result, settings=settings))
    kept = service.recorded_settings(other)
    assert {"scheduler", "width", "steps", "seed", "processor", "inject"}.isdisjoint(kept)
    assert kept["prompt"] == PROMPT and kept["height"] == 32 and kept["edit_prompt"] == EDIT
