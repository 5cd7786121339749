"""The web UI, for real: the app served on a loopback port, driven by gradio_client (the browser: test_browser.py).

The service runs the seeded tiny random pipeline (conftest.py), so nothing here depends on how well the
embedded model is trained; its preset is the embedded one at 32x32 and 3 steps, to keep the module fast.
"""

import dataclasses
import io
import json
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import serve_app, tiny_sd_pipeline
from gradio_client import Client, handle_file
from PIL import Image
from test_imports import loaded_after

from crossattn_sd.cli import main
from crossattn_sd.config import get_preset
from crossattn_sd.pipeline import GenerationCancelled
from crossattn_sd.processors import layer_sizes
from crossattn_sd.service import MAX_PROMPT_CHARS, AttentionService, GenerateRequest

# Gradio's queue calls pandas APIs that pandas 3 deprecates; not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
PRESET = dataclasses.replace(get_preset("tiny"), steps=3, height=32, width=32, max_side=64)
PROMPT = "a red square on the left"


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def bundle_maps(path) -> dict[str, np.ndarray]:
    """The per-word maps (maps.npz) inside a downloaded bundle."""
    with zipfile.ZipFile(path) as zf, np.load(io.BytesIO(zf.read("maps.npz"))) as npz:
        return {k: npz[k] for k in npz.files}


def call_raw(url: str, api_name: str, data: list) -> str:
    """Call an endpoint over plain HTTP (Gradio's /call API); the event stream's text."""
    post = urllib.request.Request(f"{url}gradio_api/call/{api_name}", data=json.dumps({"data": data}).encode(),
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=30) as r:
        event = json.load(r)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api_name}/{event}", timeout=60) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def service():
    return AttentionService(PRESET, pipe=tiny_sd_pipeline(0))


@pytest.fixture(scope="module")
def server(service):
    with serve_app(service) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


def bundle_meta(path) -> dict:
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read("meta.json"))


# /generate's inputs after the prompt and their defaults: the README's table, with this module's preset
GENERATE_DEFAULTS = dict(negative_prompt="", seed=0, steps=PRESET.steps, guidance=PRESET.guidance, width=PRESET.width,
                         height=PRESET.height, scheduler="default", mode="exact", processor="capture", weights="",
                         edit_prompt="", inject=0.8, per_step=True, processor_layers="*", concepts="")


def test_generate_needs_only_the_prompt_and_every_input_takes_its_default(client, service):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]["parameters"]
    assert [p["parameter_name"] for p in api] == ["prompt", *GENERATE_DEFAULTS]
    assert not api[0]["parameter_has_default"]
    assert {p["parameter_name"]: p["parameter_default"] for p in api[1:]} == GENERATE_DEFAULTS

    image, words, bundle = client.predict(PROMPT, api_name="/generate")
    assert words == ["a", "red", "square", "on", "the", "left"]
    assert pixels(image).shape == (32, 32, 3)
    assert set(bundle_maps(bundle)) == set(words)
    s = bundle_meta(bundle)["settings"]  # what the run used
    assert (s["seed"], s["steps"], s["guidance_scale"], s["height"], s["width"]) == (0, 3, 2.0, 32, 32)
    assert (s["scheduler"], s["mode"], s["per_step"], s["negative_prompt"]) == ("default", "exact", True, None)
    assert s["processor"] == dict(name="capture", mode="exact", weights=[], edit_prompt=None, inject=0.8, layers="*")
    spelled_out = {k: v for k, v in GENERATE_DEFAULTS.items() if k in GenerateRequest.__dataclass_fields__}
    alone = service.generate(GenerateRequest(PROMPT, **spelled_out))
    np.testing.assert_array_equal(pixels(image), np.asarray(alone.result.images[0]))


def test_heatmap_draws_each_word(client):
    image, words, bundle = client.predict(PROMPT, api_name="/generate")

    red = pixels(client.predict(handle_file(bundle), "red", api_name="/heatmap"))
    square = pixels(client.predict(handle_file(bundle), "square", api_name="/heatmap"))
    assert red.shape == square.shape == (32, 32, 3)
    assert not np.array_equal(red, square)
    # Filters reach the service: opacity 0 is the image itself; one block's layers give another overlay.
    plain = client.predict(handle_file(bundle), "red", alpha=0.0, api_name="/heatmap")
    np.testing.assert_array_equal(pixels(plain), pixels(image))
    down = client.predict(handle_file(bundle), "red", layers="down_blocks.*", resolutions="16x16", api_name="/heatmap")
    assert not np.array_equal(pixels(down), red)


def test_an_edit_shows_the_edited_image_and_its_words(client):
    image, words, bundle = client.predict(PROMPT, processor="edit", edit_prompt="a blue square on the left",
                                          api_name="/generate")
    assert words == ["a", "blue", "square", "on", "the", "left"]
    with zipfile.ZipFile(bundle) as zf:
        np.testing.assert_array_equal(pixels(image), pixels(io.BytesIO(zf.read("image-1.png"))))
    blue = client.predict(handle_file(bundle), "blue", api_name="/heatmap")
    assert pixels(blue).shape == (32, 32, 3)


def test_the_processor_goes_on_the_layers_of_the_chosen_resolution(service):
    entry = service.generate(GenerateRequest(PROMPT, processor="reweight", weights="square:3",
                                             processor_layers="up_blocks.*"))
    assert entry.result.store.layers and all(l.startswith("up_blocks.") for l in entry.result.store.layers)
    factor = service.pipe.vae_scale_factor
    sizes = layer_sizes(service.pipe.unet, (32 // factor, 32 // factor))  # the preset's 32 x 32 images
    smallest = min(max(hw) for hw in sizes.values())
    assert smallest < max(max(hw) for hw in sizes.values())  # the tiny UNet has more than one level
    entry = service.generate(GenerateRequest(PROMPT, processor="reweight", weights="square:3",
                                             processor_layers=str(smallest)))
    assert sorted(entry.result.store.layers) == sorted(l for l, hw in sizes.items() if max(hw) == smallest)


def test_parallel_clients_get_their_own_maps(server, service):
    jobs = [("a red square", 1), ("blue cat on the left", 2), ("green", 3), ("the red and blue square on the right", 4)]

    def run(prompt, seed):
        return Client(server, verbose=False).predict(prompt, seed=seed, api_name="/generate")

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: run(*job), jobs))
    for (prompt, seed), (image, words, bundle) in zip(jobs, results):
        assert words == prompt.split()
        alone = service.generate(GenerateRequest(prompt, seed=seed))
        np.testing.assert_array_equal(pixels(image), np.asarray(alone.result.images[0]))
        maps, ref = bundle_maps(bundle), bundle_maps(alone.bundle)
        assert maps.keys() == ref.keys() == set(prompt.split())
        for word in ref:
            np.testing.assert_array_equal(maps[word], ref[word])


@pytest.mark.parametrize("kwargs,named", [
    (dict(prompt=""), "the prompt is empty"),
    (dict(prompt="x" * (MAX_PROMPT_CHARS + 1)), f"{MAX_PROMPT_CHARS + 1} characters"),
    (dict(steps=0), "Steps: Value 0 is less than minimum value 1"),  # Gradio's slider bounds, named by us
    (dict(steps=1000), "Steps: Value 1000 is greater than maximum value"),
    (dict(width=36), "width=36 is not a multiple of 8"),
    (dict(width=4096), "Width: Value 4096 is greater than maximum value 64"),
    (dict(guidance=-1), "Guidance scale: Value -1 is less than minimum value 0"),
    (dict(seed=-5), "Seed: Value -5 is less than minimum value 0"),
    (dict(scheduler="warp"), "warp is not in the list of choices"),
    (dict(processor_layers="12"), "layers='12' matches no cross-attention layer"),
], ids=["empty", "huge", "steps-0", "steps-1000", "width-multiple", "width-range", "guidance", "seed", "scheduler",
        "layers"])
def test_bad_generate_input_is_an_error_naming_it(client, kwargs, named):
    with pytest.raises(Exception, match=named):
        client.predict(**{"prompt": PROMPT, **kwargs}, api_name="/generate")


def test_bad_bundles_and_words_are_errors_and_the_server_keeps_serving(server, client, tmp_path):
    _, _, bundle = client.predict(PROMPT, api_name="/generate")
    with pytest.raises(Exception, match="word 'zebra' is not in the prompt"):
        client.predict(handle_file(bundle), "zebra", api_name="/heatmap")
    corrupt = tmp_path / "maps.zip"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(Exception, match="maps.zip is not a crossattn-sd map bundle"):
        client.predict(handle_file(corrupt), "red", api_name="/heatmap")
    # A server path no one uploaded is refused, even a real bundle (raw HTTP: gradio_client would upload it).
    outside = tmp_path / "outside.zip"
    outside.write_bytes(Path(bundle).read_bytes())
    filters = ["red", "*", "", 0, -1, -1, 0.5, "jet"]  # the raw API has no defaults
    file = {"path": str(outside), "meta": {"_type": "gradio.FileData"}}
    assert call_raw(server, "heatmap", [file, *filters]).startswith("event: error")
    assert call_raw(server, "heatmap", [{**file, "path": bundle}, *filters]).startswith("event: complete")
    image, words, _ = client.predict("a blue cat", api_name="/generate")
    assert words == ["a", "blue", "cat"] and pixels(image).shape == (32, 32, 3)


def test_stop_cancels_restores_processors_and_keeps_results(service):
    pipe = service.pipe
    before = {name: (type(p), id(p)) for name, p in pipe.unet.attn_processors.items()}
    kept = service.generate(GenerateRequest(PROMPT, seed=5), session="s")
    history = service.add_to_history([], kept)
    seen = []

    def stop_after_first_step(step, total):
        seen.append(step)
        if step == 1:
            service.prepare_run("s")  # Generate clicked again while this run is on: Stop must still reach it
            service.stop("s")

    service.prepare_run("s")
    with pytest.raises(GenerationCancelled):
        service.generate(GenerateRequest("a blue cat", seed=6, steps=20), session="s", progress=stop_after_first_step)
    assert seen == [1]  # the other 19 steps never ran
    assert {name: (type(p), id(p)) for name, p in pipe.unet.attn_processors.items()} == before
    assert history == [kept] and kept.image_path.is_file() and kept.bundle.is_file()
    # Stop also stops a run still waiting in the queue; the flag does not outlive the run it stopped.
    service.prepare_run("s")
    assert service.stop("s")
    with pytest.raises(GenerationCancelled):
        service.generate(GenerateRequest(PROMPT), session="s")
    assert not service.stop("s")
    assert service.generate(GenerateRequest(PROMPT, seed=5), session="s").result.words == kept.result.words


def test_the_service_does_not_import_gradio():
    assert loaded_after(["crossattn_sd.service"], ["gradio"]) == []


@pytest.mark.parametrize("model", ["/srv/models/sd", "./local-model", "someone/some-model"])
def test_any_model_needs_the_allow_any_model_flag(model, capsys):
    with pytest.raises(PermissionError, match="--allow-any-model"):
        AttentionService.from_model(model)
    assert main(["serve", "--model", model, "--outputs", ""]) == 2
    assert "--allow-any-model" in capsys.readouterr().err
    assert AttentionService.from_model(model, allow_any_model=True).preset.source == model  # loads lazily


def test_an_allowed_folder_loads_at_its_own_size(sd_pipe_dir):
    service = AttentionService.from_model(str(sd_pipe_dir), allow_any_model=True, device="cpu")
    assert AttentionService.from_model("tiny").preset == get_preset("tiny")
    d = service.defaults()
    assert (d.height, d.width, d.size_step) == (16, 16, 8)  # UNet sample_size 8 x VAE factor 2, not 512


def test_compare_runs_both_processors_on_the_same_seed(service):
    req = GenerateRequest(PROMPT, seed=5, processor="capture", mode="exact")
    same = service.compare(req, "default")
    np.testing.assert_array_equal(np.asarray(same.a.image), np.asarray(same.b.image))  # exact = Diffusers
    assert "max 0 / 255" in same.summary and not same.a.has_maps and same.b.has_maps
    a, b, diff, note = service.compare_maps(same, "red")
    assert diff is None and "records no maps" in note

    cmp = service.compare(dataclasses.replace(req, processor="reweight", weights="square:0"), "capture")
    alone = service.generate(dataclasses.replace(req, processor="reweight", weights="square:0"))
    np.testing.assert_array_equal(np.asarray(cmp.b.image), np.asarray(alone.image))
    assert not np.array_equal(np.asarray(cmp.a.image), np.asarray(cmp.b.image))
    _, _, diff, note = service.compare_maps(cmp, "square")
    b_square = cmp.b.result.heatmap("square", normalize_by="none")
    a_square = cmp.a.result.heatmap("square", normalize_by="none")
    assert np.count_nonzero(b_square) == 0 and a_square.max() > 0  # weight 0 removes the word's column
    assert diff is not None and f"B − A for **square**: red where B gives it more attention, blue where less " \
        f"(±{100 * a_square.max():.1f}% at full colour)" in note  # B − A is −A: its span is A's maximum
    red = [e.result.heatmap("red", normalize_by="none") for e in (cmp.a, cmp.b)]
    assert red[0].max() > 0 and red[1].max() > 0


def test_compare_through_the_api_returns_both_images_their_difference_and_the_words(client, service):
    summary, a, b, diff, word, gallery = client.predict(PROMPT, seed=5, processor="reweight", weights="square:0",
                                                        baseline="capture", api_name="/compare")
    req = GenerateRequest(PROMPT, seed=5)
    capture = service.generate(req)
    reweight = service.generate(dataclasses.replace(req, processor="reweight", weights="square:0"))
    np.testing.assert_array_equal(pixels(a), np.asarray(capture.image))
    np.testing.assert_array_equal(pixels(b), np.asarray(reweight.image))
    changed = np.abs(np.asarray(capture.image, dtype=int) - np.asarray(reweight.image, dtype=int))
    assert pixels(diff).shape == (32, 32, 3) and changed.max() > 0
    assert "**A** = capture, **B** = reweight; same prompt and seed 5." in summary
    assert [c[0] for c in word["choices"]] == ["a", "red", "square", "on", "the", "left"]  # B's words ...
    assert word["value"] == "red"  # ... with the first that is not "a" chosen: its maps are shown first
    assert len(gallery) >= 2  # A and B joined this session's gallery


def test_a_downloaded_bundle_opens_again_with_the_same_maps(service):
    entry = service.generate(GenerateRequest(PROMPT, seed=9, per_step=True))
    opened = service.open_bundle(entry.bundle)
    assert opened.words == entry.words and opened.prompt_words == entry.prompt_words
    np.testing.assert_array_equal(np.asarray(opened.image), np.asarray(entry.image))
    for word in entry.words:
        np.testing.assert_array_equal(opened.result.heatmap(word), entry.result.heatmap(word))
    f = service.filters(step_from=0, step_to=1)  # per-step maps survive the round trip
    np.testing.assert_array_equal(np.asarray(service.overlay(opened, "red", f)), np.asarray(service.overlay(entry, "red", f)))


def test_history_is_newest_first_and_bounded(service):
    from crossattn_sd.service import MAX_HISTORY

    entries = [service.generate(GenerateRequest(PROMPT, seed=s, steps=1)) for s in range(3)]
    history = None
    for e in entries:
        history = service.add_to_history(history, e)
    assert history == entries[::-1]
    assert len(service.add_to_history(entries * MAX_HISTORY, entries[0])) == MAX_HISTORY


def test_the_first_view_is_the_presets_default_and_star_is_every_layer(service):
    entry = service.generate(GenerateRequest(PROMPT, seed=3))
    c = service.choices(entry)
    assert len(c.resolutions) > 1 and c.default_resolutions == c.resolutions[:1]  # the tiny preset: finest only
    default, every = service.filters(), service.filters(layers="*")
    assert default.layers is None and every.layers == ("*",)
    finest = service.filters(resolutions=c.resolutions[0])

    def overlay(f):
        return np.asarray(service.overlay(entry, "red", f))

    np.testing.assert_array_equal(overlay(default), overlay(finest))
    assert not np.array_equal(overlay(default), overlay(every))
    np.testing.assert_array_equal(overlay(every), overlay(service.filters(resolutions=",".join(c.resolutions))))


def test_generate_takes_concepts_over_the_api(client):
    image, words, bundle = client.predict(PROMPT, concepts="circle, triangle", api_name="/generate")
    assert bundle_meta(bundle)["settings"]["concepts"] == ["circle", "triangle"]
    assert {"concept/circle", "concept/triangle"} <= set(bundle_maps(bundle))
    plain, _, _ = client.predict(PROMPT, api_name="/generate")
    np.testing.assert_array_equal(pixels(image), pixels(plain))  # the same image
    overlay = client.predict(handle_file(bundle), "triangle", api_name="/heatmap")  # a concept reads like a word
    assert pixels(overlay).shape == (32, 32, 3)
