"""The Mechanisms tab in headless Chromium: the prompt and seed of the Generate column on the four embedded models,
side by side, each image next to the judge's verdict and, for the attention models, the word's map; tiny-film says
why it has none. The models are the packaged ones (they load when the tab first runs)."""
import contextlib

import numpy as np
import pytest
import torch
from conftest import chromium, free_port, open_app, shown, tiny_sd_pipeline
from test_ui import PRESET, pytestmark  # noqa: F401 (pytestmark: the same warning filters)

from crossattn_sd.mechanisms import MODELS, Mechanisms
from crossattn_sd.service import AttentionService
from crossattn_sd.ui import enlarged

TIMEOUT = 120_000  # ms: four models load and generate on CI's two busy cores
PROMPT = "a red circle on the left and a blue square on the right"


@pytest.fixture(scope="module")
def mechanisms():
    torch.set_num_threads(1)
    return Mechanisms()


@pytest.fixture(scope="module")
def page(mechanisms):
    from crossattn_sd.ui import build_demo, launch

    demo = build_demo(AttentionService(PRESET, pipe=tiny_sd_pipeline(0)), mechanisms)
    _, url, _ = launch(demo, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    with contextlib.closing(demo), chromium() as browser:
        yield open_app(browser, url, {"width": 1600, "height": 1200}, TIMEOUT)


def test_mechanisms_tab_shows_four_models_side_by_side(page, mechanisms, tmp_path):
    page.locator("#prompt textarea").fill(PROMPT)
    page.get_by_role("tab", name="Mechanisms").click()
    page.locator("#mech-word textarea, #mech-word input").first.fill("circle")
    page.locator("#mech-run").click()
    page.locator("#mech-text-3").get_by_text("tiny-film has no attention maps: FiLM").wait_for()
    page.screenshot(path=tmp_path / "mechanisms.png", full_page=True)
    expected = mechanisms.run(PROMPT, seed=0, word="circle")  # the same models, prompt and seed: the same pixels
    for i, panel in enumerate(expected):
        assert MODELS[i] in page.locator(f"#mech-text-{i}").inner_text()
        assert np.array_equal(shown(page, f"#mech-image-{i}"), np.asarray(enlarged(panel.image)))
        if panel.heatmap is not None:
            assert np.array_equal(shown(page, f"#mech-map-{i}"), np.asarray(enlarged(panel.overlay())))
            assert "red circle on the left: right" in page.locator(f"#mech-text-{i}").inner_text()
    assert page.locator("#mech-map-3 img").count() == 0  # tiny-film: a message, not an empty map


def test_a_word_that_is_not_in_the_prompt_is_an_error_message(page):
    page.locator("#prompt textarea").fill(PROMPT)
    page.get_by_role("tab", name="Mechanisms").click()
    page.locator("#mech-word textarea, #mech-word input").first.fill("hexagon")
    page.locator("#mech-run").click()
    page.get_by_text("'hexagon' is not a word of the prompt").wait_for()
