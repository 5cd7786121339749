"""The Inspect-an-image tab in headless Chromium on the embedded model: upload a rendered scene, inspect it with its
caption, pick a word, tick a filter, export the bundle; a file that is not an image is a one-line error that keeps
the earlier result on show."""

import io
import zipfile

import numpy as np
import pytest
from conftest import chromium, open_app, serve_app, shown, wait_changed
from PIL import Image
from test_ui import pixels, pytestmark  # noqa: F401 (pytestmark: the same warning filters)

from crossattn_sd.inspect import inspect_image
from crossattn_sd.overlay import DEFAULT_CMAP, colorize
from crossattn_sd.service import AttentionService
from crossattn_sd.tiny.evaluate import iou, region
from crossattn_sd.tiny.world import Scene, object_mask, place, render

TIMEOUT = 60_000
SCENE = Scene((place("red", "circle", "left"), place("blue", "square", "right")))
CAPTION = "a red circle on the left and a blue square on the right"


@pytest.fixture(scope="module")
def service():
    return AttentionService.from_model("tiny")


@pytest.fixture(scope="module")
def page(service):
    with serve_app(service) as url, chromium() as browser:
        # the result column's seven tabs in one row
        yield open_app(browser, url, {"width": 1600, "height": 1100}, TIMEOUT)


def src(page, selector: str):
    img = page.locator(f"{selector} img")
    return img.first.get_attribute("src") if img.count() else None


def test_upload_inspect_pick_a_word_filter_and_export(page, service, tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(render(SCENE)).resize((128, 128), Image.NEAREST).save(path)  # twice the model's size
    page.get_by_role("tab", name="Inspect").click()
    page.locator("#inspect-file input[type=file]").set_input_files(str(path))
    page.locator("#inspect-preview img").wait_for()
    page.locator("#inspect-prompt textarea").fill(CAPTION)
    page.locator("#inspect-concepts textarea, #inspect-concepts input").first.fill("triangle")
    old = src(page, "#overlay")
    page.locator("#inspect-run").click()
    wait_changed(page, "#overlay", old)  # the result opens on the Heat map tab
    assert page.get_by_role("tab", name="Heat map").get_attribute("aria-selected") == "true"
    np.testing.assert_array_equal(shown(page, "#image"), pixels(path))  # the uploaded image itself
    chips = page.locator("#word-chips input")
    assert [chips.nth(i).get_attribute("value") for i in range(chips.count())] == \
        ["a", "red", "circle", "on", "the", "left", "and", "blue", "square", "right", "triangle"]  # the concept last
    assert "inspected an uploaded 128×128 image · t 0.5" in page.locator("#status").inner_text()

    old = src(page, "#map")
    page.locator("#word-chips").get_by_text("square", exact=True).click()
    wait_changed(page, "#map", old)
    expected = inspect_image(service.pipe, pixels(path), CAPTION, concepts=["triangle"])
    heat = shown(page, "#map")[::2, ::2]  # sent enlarged x2 (256 px); the map is 128 x 128
    np.testing.assert_array_equal(heat, colorize(expected.heatmap("square"), DEFAULT_CMAP))
    assert iou(region(expected.heatmap("square")), object_mask(SCENE.objects[1], 128)) > 0.6  # on the square

    old = src(page, "#map")
    page.locator("#resolutions").get_by_text("8x8", exact=True).click()  # ticks the 8x8 layers too
    wait_changed(page, "#map", old)
    assert "8x8" in page.locator("#summary").inner_text()

    page.get_by_role("tab", name="History").click()
    link = page.locator("#bundle a").first
    link.wait_for()
    data = page.request.get(link.get_attribute("href")).body()
    with zipfile.ZipFile(io.BytesIO(data)) as zf, np.load(io.BytesIO(zf.read("maps.npz"))) as npz:
        np.testing.assert_array_equal(npz["square"], expected.heatmap("square"))
        assert np.array_equal(pixels(io.BytesIO(zf.read("image.png"))), pixels(path))


def test_a_file_that_is_not_an_image_is_one_line_and_keeps_the_result(page, tmp_path):
    before = src(page, "#overlay")
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    page.get_by_role("tab", name="Inspect").click()
    page.locator("#inspect-file").get_by_label("Clear").first.click()  # the earlier upload's file goes
    page.locator("#inspect-file input[type=file]").set_input_files(str(bad))
    message = page.get_by_text("the uploaded file is not an image this app can read")
    message.first.wait_for()  # said at once, by the preview
    page.locator(".toast-close").first.click()
    message.first.wait_for(state="hidden")
    page.locator("#inspect-prompt textarea").fill(CAPTION)
    page.locator("#inspect-run").click()
    message.first.wait_for()  # and again by Inspect
    assert src(page, "#overlay") == before  # the earlier result is still on show
