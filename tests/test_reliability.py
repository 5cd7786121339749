"""The server under a client's cancel, a lost client, file tricks, bad values, an outputs folder anywhere, SIGTERM.

The app is served on a loopback port with the seeded tiny random pipeline (conftest.py), as in test_ui.py, and
driven by gradio_client and raw HTTP.
"""

import dataclasses
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_sd_pipeline
from gradio_client import Client, handle_file
from PIL import Image

from crossattn_sd.config import get_preset
from crossattn_sd.service import AttentionService, GenerateRequest

pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
PRESET = dataclasses.replace(get_preset("tiny"), steps=3, height=32, width=32, max_side=64)
PROMPT = "a red square on the left"
# A long run: 100 steps at 64 x 64 (latent side 32) with steering and per-step maps, on another scheduler.
LONG = dict(seed=1, steps=100, width=64, height=64, processor="reweight", weights="square:3", per_step=True,
            scheduler="dpm++")
FILTERS = ["red", "*", "", 0, -1, -1, 0.5, "jet"]  # /heatmap's other inputs (the raw API has no defaults)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def call_raw(url: str, api_name: str, data: list) -> str:
    """Call an endpoint over plain HTTP (Gradio's /call API); the event stream's text."""
    post = urllib.request.Request(f"{url}gradio_api/call/{api_name}", data=json.dumps({"data": data}).encode(),
                                  headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=30) as r:
        event = json.load(r)["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{api_name}/{event}", timeout=60) as r:
        return r.read().decode()


def outside_folder() -> Path:
    """A folder outside the working directory and the temp folder (Gradio allows those two by default)."""
    for root in ("/var/tmp", str(Path.home())):
        if os.access(root, os.W_OK) and not Path(root).resolve().is_relative_to(Path(tempfile.gettempdir()).resolve()):
            folder = Path(tempfile.mkdtemp(prefix="crossattn-test-outputs-", dir=root))
            if not folder.resolve().is_relative_to(Path.cwd().resolve()):
                return folder
            shutil.rmtree(folder)
    pytest.skip("no writable folder outside the working directory and the temp folder")


@pytest.fixture(scope="module")
def outputs():
    folder = outside_folder()
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def service(outputs):
    return AttentionService(PRESET, pipe=tiny_sd_pipeline(0), outputs=outputs)


@pytest.fixture(scope="module")
def server(service):
    from crossattn_sd.ui import build_demo, launch

    demo = build_demo(service)
    _, url, _ = launch(demo, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


@pytest.fixture
def unet_calls(service):
    """The latent side of every UNet call, in order; the long run's calls are slowed (20 ms each) so that it is
    still running when the test acts. Nothing is asserted about time."""
    calls = []

    def hook(module, args):
        calls.append(int(args[0].shape[-1]))
        if calls[-1] == LONG["width"] // service.pipe.vae_scale_factor:
            time.sleep(0.02)

    handle = service.pipe.unet.register_forward_pre_hook(hook)
    yield calls
    handle.remove()


def wait_for(condition, what: str, limit: float = 120):
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def processors(service):
    return {name: type(p) for name, p in service.pipe.unet.attn_processors.items()}


def saved_seeds(outputs: Path) -> list[str]:
    return sorted(p.name.rsplit("-", 2)[-2] for p in outputs.iterdir())


def test_a_cancel_ends_the_run_before_the_next_request_runs(server, service, outputs, unet_calls):
    before, saved = processors(service), saved_seeds(outputs)
    client = Client(server, verbose=False)
    job = client.submit(PROMPT, **LONG, api_name="/generate")
    wait_for(lambda: len(unet_calls) > 2, "the long run to start")
    job.cancel()
    image, _, _ = client.predict(PROMPT, seed=2, processor="default", api_name="/generate")
    fresh = AttentionService(PRESET, pipe=tiny_sd_pipeline(0)).generate(
        GenerateRequest(PROMPT, seed=2, processor="default"))
    np.testing.assert_array_equal(pixels(image), np.asarray(fresh.image))  # bit for bit a fresh server's
    long_side, short_side = LONG["width"] // 2, PRESET.width // 2
    first_short = unet_calls.index(short_side)
    assert set(unet_calls[:first_short]) == {long_side} and set(unet_calls[first_short:]) == {short_side}
    assert len(unet_calls[:first_short]) < LONG["steps"]  # stopped early (one call a step: CFG is one batch)
    assert processors(service) == before
    assert saved_seeds(outputs) == sorted([*saved, "s2"])  # the cancelled run (seed 1) is not saved


def test_a_lost_client_stops_its_run(server, service, unet_calls, monkeypatch):
    # Gradio notices a lost heartbeat connection only when it next writes to it: every 15 s by default, longer than
    # the whole long run on a fast machine. Gradio reads the interval at each heartbeat connection.
    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.2")
    gone = Client(server, verbose=False)
    gone.submit(PROMPT, **LONG, api_name="/generate")
    wait_for(lambda: len(unet_calls) > 2, "the long run to start")
    gone.close()  # ends its heartbeat: Gradio runs the unload event for the session
    image, _, _ = Client(server, verbose=False).predict(PROMPT, seed=3, api_name="/generate")
    assert pixels(image).shape == (32, 32, 3)
    assert unet_calls.count(LONG["width"] // 2) < LONG["steps"]


def test_one_generation_at_a_time_whoever_calls(service, unet_calls):
    """Two threads call the service at once (no Gradio): the second waits for the first to end."""
    results = {}

    def run(seed, side):
        results[seed] = service.generate(GenerateRequest(PROMPT, seed=seed, steps=10, width=side, height=side))

    first = threading.Thread(target=run, args=(5, LONG["width"]))
    first.start()
    wait_for(lambda: len(unet_calls) > 2, "the first run to start")
    second = threading.Thread(target=run, args=(6, PRESET.width))
    second.start()
    first.join()
    second.join()
    assert unet_calls == [LONG["width"] // 2] * 10 + [PRESET.width // 2] * 10
    alone = AttentionService(PRESET, pipe=tiny_sd_pipeline(0))
    for seed, side in ((5, LONG["width"]), (6, PRESET.width)):
        np.testing.assert_array_equal(np.asarray(results[seed].image), np.asarray(
            alone.generate(GenerateRequest(PROMPT, seed=seed, steps=10, width=side, height=side)).image))


def error_text(stream: str) -> str | None:
    """The message of an error event (None: Gradio hides an unexpected exception's text from clients)."""
    assert stream.startswith("event: error"), stream
    data = json.loads(stream.split("data:", 1)[1].strip())
    return data.get("error") if isinstance(data, dict) else data


def test_heatmap_reads_no_path_the_client_names(server, tmp_path):
    client = Client(server, verbose=False)
    _, _, bundle = client.predict(PROMPT, api_name="/generate")
    real = tmp_path / "elsewhere.zip"
    shutil.copyfile(bundle, real)
    missing = tmp_path / "missing.zip"
    texts = {}
    for name, path in (("real", real), ("missing", missing), ("passwd", Path("/etc/passwd"))):
        texts[name, "string"] = error_text(call_raw(server, "heatmap", [str(path), *FILTERS]))
        texts[name, "dict"] = error_text(call_raw(server, "heatmap", [{"path": str(path)}, *FILTERS]))
        file = {"path": str(path), "meta": {"_type": "gradio.FileData"}}
        texts[name, "filedata"] = error_text(call_raw(server, "heatmap", [file, *FILTERS]))
    # The same answer whether the file exists or not, and it names no server path.
    assert len({text for (name, kind), text in texts.items() if kind != "filedata"}) == 1
    assert "uploaded to this server" in texts["real", "string"]
    assert len({str(text).replace(str(p), "PATH") for (name, kind), text in texts.items() if kind == "filedata"
                for p in [{"real": real, "missing": missing, "passwd": Path("/etc/passwd")}[name]]}) == 1
    assert str(tmp_path) not in texts["real", "string"]
    # An upload works, by gradio_client and by the raw API's upload route.
    assert pixels(client.predict(handle_file(real), "red", api_name="/heatmap")).shape == (32, 32, 3)
    assert call_raw(server, "heatmap", [{"path": bundle, "meta": {"_type": "gradio.FileData"}}, *FILTERS]
                    ).startswith("event: complete")


@pytest.mark.parametrize("seed,message", [
    ("abc", "Seed: 'abc' is not a number"), (float("nan"), "Seed: 'nan' is not a number"),
    (float("inf"), "Seed: Value inf is greater than maximum value 4294967295."),
], ids=["text", "nan", "inf"])
def test_a_seed_that_is_not_a_number_is_an_error_naming_it(server, seed, message):
    # Raw HTTP: gradio_client refuses to send NaN; Python's json writes it as NaN, which the server reads.
    generate = [PROMPT, "", seed, 1, 7.5, 32, 32, "default", "exact", "capture", "", "", 0.8, False, "*", ""]
    assert error_text(call_raw(server, "generate", generate)) == message
    image, _, _ = Client(server, verbose=False).predict(PROMPT, seed=1, steps=1, api_name="/generate")
    assert pixels(image).shape == (32, 32, 3)  # and the server keeps serving


def crafted(folder: Path, zip_path: Path, meta_edit) -> Path:
    meta = meta_edit(json.loads((folder / "meta.json").read_text()))
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(folder.iterdir()):
            zf.writestr(p.name, json.dumps(meta) if p.name == "meta.json" else p.read_bytes())
    return zip_path


def test_bad_bundles_through_the_api_are_one_line_errors(server, service, tmp_path):
    folder = service.generate(GenerateRequest(PROMPT, seed=7, steps=1)).result.save(tmp_path / "run")
    cases = {
        "list.zip": (lambda m: [], r"list\.zip is not a readable crossattn-sd result \(meta\.json is \[\]"),
        "settings.zip": (lambda m: {**m, "settings": ["x"]}, r"settings is \[\"x\"\]; expected an object"),
        "tokens.zip": (lambda m: {**m, "alignments": [{**m["alignments"][0], "special_indices": {"end": [40]}}]},
                       r"prompt 0's token index 40 is outside the maps' 16 tokens"),
    }
    client = Client(server, verbose=False)
    for name, (edit, message) in cases.items():
        with pytest.raises(Exception, match=message) as info:
            client.predict(handle_file(crafted(folder, tmp_path / name, edit)), "red", api_name="/heatmap")
        assert "\n" not in str(info.value) and tempfile.gettempdir() not in str(info.value)
    image, _, _ = client.predict(PROMPT, seed=1, steps=1, api_name="/generate")
    assert pixels(image).shape == (32, 32, 3)


def test_compare_works_with_the_outputs_folder_anywhere(server, service, outputs):
    assert service.outputs == outputs
    client = Client(server, verbose=False)
    summary, a, b, diff, word, gallery = client.predict(prompt=PROMPT, seed=5, processor="reweight",
                                                        weights="square:0", api_name="/compare")
    assert "**A** = capture, **B** = reweight" in summary and len(gallery) == 2
    assert not np.array_equal(pixels(a), pixels(b))
    assert len(list(outputs.iterdir())) >= 2  # both runs saved there


def test_sigterm_removes_the_work_folder():
    """SIGTERM (systemd, docker stop, kill) shuts `serve` down as Ctrl-C does, and its work folder goes (without
    the handler, Python's default SIGTERM ends the process with no cleanup at all). In this process, so that no
    second interpreter has to load torch and Gradio: the signal is sent to ourselves once the server listens."""
    from crossattn_sd.ui import serve

    service = AttentionService(PRESET, pipe=tiny_sd_pipeline(0))
    service.png_file(Image.new("RGB", (4, 4)))
    assert any(service.workdir.rglob("*.png"))
    port = free_port()

    def terminate_when_up():
        def up():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(up, "the server to listen")
        os.kill(os.getpid(), signal.SIGTERM)

    old = signal.getsignal(signal.SIGTERM)
    killer = threading.Thread(target=terminate_when_up, daemon=True)
    killer.start()
    try:
        assert serve(port=port, service=service) == 0
    finally:
        signal.signal(signal.SIGTERM, old)
    killer.join()
    assert not service.workdir.exists()


def test_auth_is_required_and_uploads_are_bounded(service, tmp_path, monkeypatch):
    from crossattn_sd import ui

    monkeypatch.setattr(ui, "MAX_UPLOAD_BYTES", 4096)  # `launch` passes it to Gradio as max_file_size
    demo = ui.build_demo(service)
    _, url, _ = ui.launch(demo, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                          quiet=True, auth=("user", "secret"))
    try:
        with pytest.raises(urllib.error.HTTPError, match="401"):
            call_raw(url, "generate", [PROMPT])
        client = Client(url, auth=("user", "secret"), verbose=False)
        big = tmp_path / "big.zip"
        big.write_bytes(bytes(8192))
        with pytest.raises(Exception, match="413|too large|exceeds"):
            client.predict(handle_file(big), "red", api_name="/heatmap")
        image, _, _ = client.predict(PROMPT, steps=1, api_name="/generate")
        assert pixels(image).shape == (32, 32, 3)
    finally:
        demo.close()


def test_the_server_listens_on_loopback_unless_told():
    from crossattn_sd.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.share, args.auth, args.allow_any_model) == ("127.0.0.1", False, None, False)
