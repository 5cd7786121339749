"""The web UI in a real browser: headless Chromium (Playwright) on the app served for real.

One app and one browser for the module; each test opens a fresh page, so a fresh session. The service runs the
seeded tiny random pipeline at 32 x 32 and 3 steps (test_ui.py's preset), so its images and maps can be
recomputed here and compared pixel for pixel with what the page shows. Without Chromium these tests fail with
a message saying how to install it (CROSSATTN_SD_SKIP_BROWSER=1 skips them instead).
"""

import dataclasses
import re

import numpy as np
import pytest
from conftest import chromium, open_app, serve_app, shown, tiny_sd_pipeline, wait_changed
from test_ui import PRESET, PROMPT, pytestmark  # noqa: F401 (pytestmark: the same warning filters)

from crossattn_sd.service import AttentionService, GenerateRequest
from crossattn_sd.ui import enlarged

TIMEOUT = 60_000  # ms; CI's two cores may be busy


@pytest.fixture(scope="module")
def service():
    return AttentionService(PRESET, pipe=tiny_sd_pipeline(0))


@pytest.fixture(scope="module")
def browser(service):
    with serve_app(service) as url, chromium() as browser:
        browser.url = url
        yield browser


@pytest.fixture
def page(browser):
    page = open_app(browser, browser.url, {"width": 1400, "height": 1000}, TIMEOUT)
    yield page
    page.close()


def generate(page, prompt: str = PROMPT) -> None:
    """Type the prompt, click Generate and wait until the overlay of the first word is drawn."""
    old = page.locator("#overlay img").get_attribute("src") if page.locator("#overlay img").count() else None
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#generate").click()
    page.wait_for_function("old => { const i = document.querySelector('#overlay img'); return i && i.src !== old; }",
                           arg=old)


def text(page, selector: str) -> str:
    return " ".join(page.locator(selector).inner_text().split())


def test_generate_click_a_word_and_stop(page, tmp_path):
    generate(page)
    overlay = page.locator("#overlay img")
    page.locator("#image img").wait_for()
    chips = page.locator("#word-chips")
    assert chips.locator("input:checked").get_attribute("value") == "red"  # first word that is not "a"
    first = shown(page, "#overlay")
    page.screenshot(path=tmp_path / "generated.png", full_page=True)

    old = overlay.get_attribute("src")  # read before the click: its redraw can land before a read after it
    chips.get_by_text("square", exact=True).click()
    wait_changed(page, "#overlay", old)
    assert not np.array_equal(first, shown(page, "#overlay"))

    # The other tabs draw when selected: the all-words grid, the timeline's frames and its GIF.
    page.get_by_role("tab", name="All words").click()
    page.locator("#grid img").wait_for()
    page.get_by_role("tab", name="Timeline").click()
    page.locator("#animation img").wait_for()
    assert page.locator("#timeline img").count() == PRESET.steps
    page.get_by_role("tab", name="Heat map").click()

    # A long run shows its progress and stops on Stop; the previous image stays on show.
    image_src = page.locator("#image img").get_attribute("src")
    for name, value in (("Steps", "100"), ("Width", "64"), ("Height", "64")):
        page.get_by_label(f"number input for {name}").fill(value)
        page.get_by_label(f"number input for {name}").press("Enter")
    page.locator("#generate").click()
    page.locator("#image").get_by_text("denoising").wait_for()
    page.locator("#stop").click()
    page.get_by_text("Stopped. Your previous results are kept.").wait_for()
    page.screenshot(path=tmp_path / "stopped.png", full_page=True)
    assert page.locator("#image img").get_attribute("src") == image_src
    assert chips.locator("input:checked").get_attribute("value") == "square"


def test_processor_options_show_and_hide_and_the_random_seed_button(page):
    mode = page.locator("label").filter(has_text=re.compile(r"^\s*explicit\s*$")).first  # a radio option's box
    weights, edit_prompt = page.get_by_label("Word weights"), page.get_by_label("Edited prompt")
    inject = page.get_by_label("number input for Injection")

    def visible():
        return [x.is_visible() for x in (mode, weights, edit_prompt, inject)]

    mode.wait_for(state="visible")
    assert visible() == [True, False, False, False]  # capture: only its mode
    page.locator("#processor").get_by_text("reweight", exact=True).click()
    weights.wait_for(state="visible")
    assert visible() == [False, True, False, False]
    page.locator("#processor").get_by_text("edit", exact=True).click()
    edit_prompt.wait_for(state="visible")
    assert visible() == [False, False, True, True]
    page.locator("#processor").get_by_text("default", exact=True).click()
    edit_prompt.wait_for(state="hidden")
    assert visible() == [False, False, False, False]

    seed = page.locator("#seed input")
    assert seed.input_value() == "0"
    page.locator("#random-seed").click()
    page.wait_for_function("() => document.querySelector('#seed input').value !== '0'")
    first = int(seed.input_value())
    page.locator("#random-seed").click()
    page.wait_for_function("v => document.querySelector('#seed input').value !== v", arg=str(first))
    assert first != int(seed.input_value())  # (a repeat of the same seed in 2**32 draws would be a rare fail)


def test_the_value_under_a_click_and_the_head_filter(page, service):
    generate(page)
    entry = service.generate(GenerateRequest(PROMPT))  # what the page ran: the same defaults, the same seed
    np.testing.assert_array_equal(shown(page, "#image"), np.asarray(entry.image))

    # Left of and below the middle (the map panel is sent enlarged, so any click maps to its pixel of the map).
    box = page.locator("#map img").bounding_box()
    page.locator("#map img").click(position={"x": box["width"] / 2 - 10, "y": box["height"] / 2 + 6})
    page.wait_for_function("() => document.querySelector('#readout').innerText.includes('At (x=')")
    readout = text(page, "#readout")
    x, y = map(int, re.search(r"At \(x=(\d+), y=(\d+)\)", readout).groups())
    assert x < 16 <= y  # left of and below the middle of the 32 x 32 map
    assert readout == service.value_at(entry, "red", service.filters(), x, y).replace("**", "")

    heads = service.choices(entry).heads
    assert heads >= 2
    old = page.locator("#overlay img").get_attribute("src")
    page.locator("#heads input").click()
    page.get_by_role("option", name="1", exact=True).click()
    wait_changed(page, "#overlay", old)
    # the clickable panels are sent enlarged (nearest neighbour) so that every click maps to its pixel
    expected = np.asarray(enlarged(service.overlay(entry, "red", service.filters(head=1))))
    np.testing.assert_array_equal(shown(page, "#overlay"), expected)
    assert not np.array_equal(expected, np.asarray(service.overlay(entry, "red", service.filters())))


def test_picking_from_the_gallery_and_opening_a_bundle(page, service):
    generate(page)  # seed 0
    page.locator("#seed input").fill("1")
    page.locator("#seed input").press("Enter")
    generate(page)  # seed 1
    seed0 = service.generate(GenerateRequest(PROMPT, seed=0))
    seed1 = service.generate(GenerateRequest(PROMPT, seed=1))
    np.testing.assert_array_equal(shown(page, "#image"), np.asarray(seed1.image))

    page.get_by_role("tab", name="History").click()
    thumbs = page.locator("#history .thumbnail-item")
    thumbs.nth(1).wait_for()
    assert thumbs.count() == 2
    old = page.locator("#image img").get_attribute("src")
    thumbs.nth(1).click()  # newest first: the second is the seed-0 run
    wait_changed(page, "#image", old)
    np.testing.assert_array_equal(shown(page, "#image"), np.asarray(seed0.image))

    other = service.generate(GenerateRequest("a blue cat on the right", seed=4))
    old = page.locator("#image img").get_attribute("src")
    page.locator("#upload input[type=file], input[type=file]").first.set_input_files(str(other.bundle))
    wait_changed(page, "#image", old)
    np.testing.assert_array_equal(shown(page, "#image"), np.asarray(other.image))
    chips = page.locator("#word-chips input")
    page.wait_for_function("() => document.querySelectorAll('#word-chips input').length === 6")
    assert [chips.nth(i).get_attribute("value") for i in range(chips.count())] == \
        ["a", "blue", "cat", "on", "the", "right"]
    assert page.locator("#history .thumbnail-item").count() == 3  # the opened bundle joined the gallery


def test_the_compare_tab(page, service):
    generate(page)  # (Compare before any Generate in a session draws no maps: reported, service-side)
    page.locator("#processor").get_by_text("reweight", exact=True).click()
    page.locator("textarea, input").and_(page.get_by_label("Word weights")).fill("square:0")
    page.locator("#prompt textarea").fill(PROMPT)
    page.get_by_role("tab", name="Compare").click()
    page.get_by_role("button", name="Compare A and B").click()
    page.locator("#cmp-diff img").wait_for()
    page.wait_for_function("() => document.querySelector('#cmp-note').innerText.includes('B − A')")
    req = GenerateRequest(PROMPT)
    a, b = service.generate(req), service.generate(dataclasses.replace(req, processor="reweight", weights="square:0"))
    np.testing.assert_array_equal(shown(page, "#cmp-a"), np.asarray(a.image))
    np.testing.assert_array_equal(shown(page, "#cmp-b"), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert "A = capture, B = reweight; same prompt and seed 0." in text(page, "#cmp-summary")
    assert text(page, "#cmp-note").startswith("B − A for red:")
